"""Causal language modelling: predict every next token of random windows of the corpus.

A batch is ``{"input_ids": (B, T), "labels": (B, T)}``, ``labels`` being ``input_ids`` shifted by one
token; the loss is the mean next-token cross-entropy over the batch's tokens; evaluation scores
consecutive, non-overlapping windows from the start of the held-out split (each token once) and
reports the token-weighted loss and its perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from loom.data import BatchSampler, eval_batches
from loom.errors import ConfigError
from loom.models.common.numerics import at_least_fp32
from loom.tasks.base import Batch, Task

# tokens per piece of a bf16/fp16 loss: each piece's fp32 copy of its logits lives only while it is computed
LOSS_CHUNK_TOKENS = 1024


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in at least fp32 (float64 stays float64); logits (B, T, V),
    targets (B, T).

    Logits in bf16/fp16 (mixed precision) are not copied to fp32 whole: the loss is summed over
    pieces of :data:`LOSS_CHUNK_TOKENS` tokens, each cast to fp32 inside an activation checkpoint, so
    one piece's fp32 copy and log-softmax exist at a time (forward, and again in backward) instead of
    the whole batch's. Distributed (vocabulary-parallel) logits take torch's loss as they are."""
    rows, flat = logits.flatten(0, 1), targets.flatten()  # (B·T, V), (B·T,)
    if at_least_fp32(rows) is rows or type(rows) is not torch.Tensor or rows.size(0) <= LOSS_CHUNK_TOKENS:
        return F.cross_entropy(at_least_fp32(rows), flat)
    from torch.utils.checkpoint import checkpoint

    total = sum(checkpoint(_loss_sum, rows[i:i + LOSS_CHUNK_TOKENS], flat[i:i + LOSS_CHUNK_TOKENS],
                           use_reentrant=False)
                for i in range(0, rows.size(0), LOSS_CHUNK_TOKENS))
    return total / (flat != -100).sum()  # F.cross_entropy's mean: over the targets it does not ignore


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def lm_metrics(loss_sum: float, tokens: int) -> dict:
    """The evaluation record from the token-weighted loss sum over ``tokens`` scored tokens."""
    if tokens == 0:
        raise ValueError("evaluation saw no tokens: the validation split is shorter than one sequence")
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}


class CausalLM(Task):
    name = "causal_lm"

    def __init__(self, train: np.ndarray, val: np.ndarray, block_size: int, batch_size: int, seed: int):
        need = block_size + 1
        for split, tokens in (("train", train), ("val", val)):
            if len(tokens) < need:
                raise ConfigError(f"the {split} split holds {len(tokens)} tokens, fewer than one sequence of "
                                  f"model.block_size+1={need}; use more data or a smaller model.block_size")
        self.val, self.block_size, self.batch_size = val, block_size, batch_size
        self.sampler = BatchSampler(train, block_size, batch_size, seed)

    def train_batch(self, step: int, rows: slice) -> Batch:
        x, y = self.sampler.batch(step, rows=rows)
        return {"input_ids": x, "labels": y}

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        for x, y in eval_batches(self.val, self.block_size, self.batch_size, max_batches):
            yield {"input_ids": x, "labels": y}

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch["input_ids"],)

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch["labels"]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(outputs, targets)

    def units(self, batch: Batch) -> int:
        return batch["labels"].numel()

    def metrics(self, loss_sum: float, units: int) -> dict:
        return lm_metrics(loss_sum, units)
