"""A bf16 loss keeps no fp32 copy of the logits for backward: lm_loss computes it in fp32 pieces and
makes each piece's gradient in the forward, so what it keeps alive after its forward is one bf16
gradient the size of the logits, not their whole fp32 copy and log-softmax (measured as in
test_activation_memory), with the loss and, to bf16 rounding, the gradient of the whole-batch
computation."""

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
    with mock.patch.object(causal_lm, "LOSS_CHUNK_TOKENS", chunk), \
            mock.patch.object(causal_lm, "LOSS_WHOLE_FP32_MAX_BYTES", 0), created:
        loss = causal_lm.lm_loss(logits, targets)
    kept = created.alive_bytes({logits.untyped_storage().data_ptr(), loss.untyped_storage().data_ptr()})
    loss.backward()
    return loss.detach(), logits.grad, kept


def test_bf16_loss_keeps_no_fp32_logits():
    loss, grad, kept = _loss_and_kept(causal_lm.LOSS_CHUNK_TOKENS)
    whole_loss, whole_grad, whole_kept = _loss_and_kept(10**9)
    fp32_logits = B * T * V * 4
    assert whole_kept >= fp32_logits  # the whole-batch loss keeps (at least) an fp32 copy
    assert kept <= fp32_logits / 2 * 1.01  # the pieces keep a bf16 gradient, half of it
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, whole_grad, rtol=1.6e-2, atol=1e-8)  # bf16 rounding
