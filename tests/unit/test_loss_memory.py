"""A bf16 loss keeps no fp32 copy of the logits for backward: lm_loss computes it in pieces inside
activation checkpoints, so what the loss keeps alive after its forward is the bf16 logits it was given,
not their whole fp32 copy and log-softmax (measured as in test_activation_memory), with the same loss
and gradient as the whole-batch computation."""

from __future__ import annotations

from unittest import mock

import torch

from loom.tasks import causal_lm
from tests.unit.test_activation_memory import _Created

B, T, V = 4, 512, 1024  # 2048 tokens: two pieces of LOSS_CHUNK_TOKENS


def _loss_and_kept(chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(0)
    logits = torch.randn(B, T, V).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    created = _Created()
    with mock.patch.object(causal_lm, "LOSS_CHUNK_TOKENS", chunk), created:
        loss = causal_lm.lm_loss(logits, targets)
    kept = created.alive_bytes({logits.untyped_storage().data_ptr(), loss.untyped_storage().data_ptr()})
    loss.backward()
    return loss.detach(), logits.grad, kept


def test_bf16_loss_keeps_no_fp32_logits():
    loss, grad, kept = _loss_and_kept(causal_lm.LOSS_CHUNK_TOKENS)
    whole_loss, whole_grad, whole_kept = _loss_and_kept(10**9)
    fp32_logits = B * T * V * 4
    assert whole_kept >= fp32_logits  # the whole-batch loss keeps (at least) an fp32 copy
    assert kept < fp32_logits / 100  # the pieces keep next to nothing
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, whole_grad, rtol=0, atol=0)
