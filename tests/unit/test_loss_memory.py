"""lm_loss on a CPU computes the cross-entropy in cache-sized pieces and makes each piece's gradient in
the forward, in place of the piece's working copy:

- bf16 logits: what it keeps alive after its forward is one bf16 gradient the size of the logits, not
  their whole fp32 copy and log-softmax (measured as in test_activation_memory);
- fp32 logits: its backward makes nothing the size of the logits (it scales the kept gradient in place),
  where torch's whole-batch loss makes two (the NLL's and the log-softmax's gradients);

each with the loss and gradient of the whole-batch computation (to bf16 rounding for bf16). The
"whole" runs patch the piece size past the batch, which sends lm_loss to torch's loss: the assertions
on them are what shows each measurement can tell the two apart."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loom.tasks import causal_lm
from tests.unit.test_activation_memory import _Created

B, T, V = 4, 512, 1024  # 2048 tokens of 4 KiB (fp32): two pieces of LOSS_CPU_PIECE_BYTES
WHOLE = 2**40  # piece bytes past the batch: torch's loss


class _Made(TorchDispatchMode):
    """Sums the bytes of every new storage an operator returns (not its inputs', as in-place ones do)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.bytes += sum(t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                          if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given)
        return out


def _logits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    targets = torch.randint(0, V, (B, T))
    targets[0, :7] = -100  # ignored, as by F.cross_entropy
    return torch.randn(B, T, V).to(dtype).requires_grad_(), targets


def _bf16_loss_and_kept(piece_bytes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    logits, targets = _logits(torch.bfloat16)
    created = _Created()
    with mock.patch.object(causal_lm, "LOSS_CPU_PIECE_BYTES", piece_bytes), created:
        loss = causal_lm.lm_loss(logits, targets)
    kept = created.alive_bytes({logits.untyped_storage().data_ptr(), loss.untyped_storage().data_ptr()})
    loss.backward()
    return loss.detach(), logits.grad, kept


def test_bf16_loss_keeps_no_fp32_logits():
    loss, grad, kept = _bf16_loss_and_kept(causal_lm.LOSS_CPU_PIECE_BYTES)
    whole_loss, whole_grad, whole_kept = _bf16_loss_and_kept(WHOLE)
    fp32_logits = B * T * V * 4
    assert whole_kept >= fp32_logits  # the whole-batch loss keeps (at least) an fp32 copy
    assert kept <= fp32_logits / 2 * 1.01  # the pieces keep a bf16 gradient, half of it
    torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, whole_grad, rtol=1.6e-2, atol=1e-8)  # bf16 rounding


def _fp32_loss_and_backward_bytes(piece_bytes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    logits, targets = _logits(torch.float32)
    with mock.patch.object(causal_lm, "LOSS_CPU_PIECE_BYTES", piece_bytes):
        loss = causal_lm.lm_loss(logits, targets)
    made = _Made()
    with made:
        (loss * 0.5).backward()
    return loss.detach(), logits.grad, made.bytes


def test_fp32_loss_backward_makes_nothing_the_size_of_the_logits():
    loss, grad, made = _fp32_loss_and_backward_bytes(causal_lm.LOSS_CPU_PIECE_BYTES)
    whole_loss, whole_grad, whole_made = _fp32_loss_and_backward_bytes(WHOLE)
    fp32_logits = B * T * V * 4
    assert whole_made >= 2 * fp32_logits
    assert made < fp32_logits / 100
    torch.testing.assert_close(loss, whole_loss)
    torch.testing.assert_close(grad, whole_grad)


def test_the_kept_gradient_cannot_be_used_twice():
    logits, targets = _logits(torch.float32)
    loss = causal_lm.lm_loss(logits, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        loss.backward()
