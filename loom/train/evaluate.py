"""Validation loss and perplexity over a fixed, deterministic stretch of held-out tokens."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loom.data import eval_batches
from loom.models.moe import at_least_fp32
from loom.train.precision import autocast


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in at least fp32 (float64 stays float64); logits (B, T, V),
    targets (B, T)."""
    return F.cross_entropy(at_least_fp32(logits).flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int,
             device: torch.device, precision: str = "fp32") -> dict:
    """Token-weighted mean loss over the first ``max_batches`` batches of ``tokens``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, block_size, batch_size, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = model(x)
        total += lm_loss(logits, y).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return val_record(total, count)


def val_record(loss_sum: float, tokens: int) -> dict:
    """The evaluation record from the token-weighted loss sum over ``tokens`` scored tokens."""
    if tokens == 0:
        raise ValueError("evaluation saw no tokens: the validation split is shorter than one sequence")
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}
