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
# ... used where the whole fp32 copy would be larger than this: below it torch's fused loss is faster
# (benchmarks/hot_path.py measured the pieces 1.5× slower at 8 × 256 tokens × 4096 on a CPU)
LOSS_WHOLE_FP32_MAX_BYTES = 256 * 2**20


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in at least fp32 (float64 stays float64); logits (B, T, V),
    targets (B, T).

    Logits in bf16/fp16 (mixed precision) whose fp32 copy would exceed :data:`LOSS_WHOLE_FP32_MAX_BYTES`
    are not copied to fp32 whole: :class:`_PiecewiseCrossEntropy` takes :data:`LOSS_CHUNK_TOKENS` tokens
    at a time in fp32 and computes each piece's gradient with its loss, so backward keeps a gradient in
    the logits' own dtype instead of an fp32 log-softmax. Distributed (vocabulary-parallel) logits take
    torch's loss as they are."""
    rows, flat = logits.flatten(0, 1), targets.flatten()  # (B·T, V), (B·T,)
    if at_least_fp32(rows) is rows or type(rows) is not torch.Tensor or rows.size(0) <= LOSS_CHUNK_TOKENS \
            or rows.numel() * 4 <= LOSS_WHOLE_FP32_MAX_BYTES:
        return F.cross_entropy(at_least_fp32(rows), flat)
    return _PiecewiseCrossEntropy.apply(rows, flat, LOSS_CHUNK_TOKENS)


class _PiecewiseCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of low-precision logits (N, V), computed in fp32 piece by piece; the gradient
    (softmax − one-hot) / count is made in the forward, piece by piece, and kept in the logits' dtype
    (the fused cross-entropy of Liger-Kernel and others, in plain PyTorch). Targets of -100 are ignored,
    as by ``F.cross_entropy``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = targets != -100
        count = valid.sum().clamp_min(1).float()
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for i in range(0, logits.size(0), chunk):
            x, t, keep = logits[i:i + chunk].float(), targets[i:i + chunk].clamp_min(0), valid[i:i + chunk]
            lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (n, 1)
            total += ((lse.squeeze(1) - x.gather(1, t[:, None]).squeeze(1)) * keep).sum()
            p = x.sub_(lse).exp_()  # softmax, in place of the fp32 copy
            p.scatter_add_(1, t[:, None], -torch.ones_like(p[:, :1]))
            grad[i:i + chunk] = p.mul_((keep / count)[:, None])
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


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
