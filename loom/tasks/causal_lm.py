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

# bytes of fp32 logits per piece of the loss on a CPU: a piece stays in cache while its log-sum-exp,
# softmax and gradient are made in place (benchmarks/hot_path.py: fp32 and bf16 loss rows)
LOSS_CPU_PIECE_BYTES = 4 * 2**20
# elsewhere (accelerators, where each piece costs kernel launches): bf16/fp16 logits whose fp32 copy would
# exceed LOSS_WHOLE_FP32_MAX_BYTES are taken LOSS_CHUNK_TOKENS at a time; fp32 takes torch's fused loss
LOSS_CHUNK_TOKENS = 1024
LOSS_WHOLE_FP32_MAX_BYTES = 256 * 2**20


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in at least fp32 (float64 stays float64); logits (B, T, V),
    targets (B, T).

    Computed piece by piece by :class:`_PiecewiseCrossEntropy` where that is faster or smaller than
    torch's loss: on a CPU always (pieces of :data:`LOSS_CPU_PIECE_BYTES`, which stay in cache), elsewhere
    for bf16/fp16 logits whose fp32 copy would exceed :data:`LOSS_WHOLE_FP32_MAX_BYTES`. Distributed
    (vocabulary-parallel) logits take torch's loss as they are."""
    rows, flat = logits.flatten(0, 1), targets.flatten()  # (B·T, V), (B·T,)
    piece = _piece_rows(rows) if type(rows) is torch.Tensor else None
    if piece is None or rows.size(0) <= piece:
        return F.cross_entropy(at_least_fp32(rows), flat)
    return _PiecewiseCrossEntropy.apply(rows, flat, piece)


def _piece_rows(rows: torch.Tensor) -> int | None:
    """Rows of (N, V) logits per piece of the loss, or None for torch's loss of the whole."""
    if rows.device.type == "cpu":
        return max(1, LOSS_CPU_PIECE_BYTES // (rows.size(1) * 4))
    if at_least_fp32(rows) is rows or rows.numel() * 4 <= LOSS_WHOLE_FP32_MAX_BYTES:
        return None
    return LOSS_CHUNK_TOKENS


class _PiecewiseCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V), computed in at least fp32 ``piece`` rows at a time; the
    gradient (softmax − one-hot) / count is made in the forward, piece by piece, in place of the piece's
    working copy, and kept in the logits' own dtype (the fused cross-entropy of Liger-Kernel and others,
    in plain PyTorch). Nothing the size of the logits is made beyond that gradient: no log-softmax, no
    fp32 copy of bf16 logits, no second gradient in backward (it scales the kept one in place, so this
    loss can be back-propagated once). Targets of -100 are ignored, as by ``F.cross_entropy``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, piece: int) -> torch.Tensor:
        wide = torch.promote_types(logits.dtype, torch.float32)
        valid = targets != -100
        count = valid.sum().clamp_min(1).to(wide)
        scale = valid.to(wide) / count  # each row's weight in the mean
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        scratch = None if logits.dtype == wide else logits.new_empty((min(piece, logits.size(0)), logits.size(1)),
                                                                      dtype=wide)
        total = torch.zeros((), dtype=wide, device=logits.device)
        for i in range(0, logits.size(0), piece):
            x = logits[i:i + piece]
            n, t = x.size(0), targets[i:i + piece].clamp_min(0)[:, None]
            work = scratch[:n] if scratch is not None else grad[i:i + n] if grad is not None else x
            if work is not x:
                work.copy_(x)
            lse = torch.logsumexp(work, dim=-1, keepdim=True)  # (n, 1)
            total += ((lse - work.gather(1, t)).squeeze(1) * scale[i:i + n]).sum()
            if grad is None:
                continue
            work.sub_(lse).exp_().scatter_add_(1, t, torch.full_like(lse, -1.0)).mul_(scale[i:i + n, None])
            if scratch is not None:
                grad[i:i + n].copy_(work)
        ctx.spent = False
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.spent:
            raise RuntimeError("loom's cross-entropy keeps one gradient and scales it in place: it cannot be "
                               "back-propagated twice (retain_graph=True)")
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None


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
