"""Self-attention's query, key and value projections run as one matrix multiply on whole weights
(``Attention.project``; three parameters, one product) and give the three multiplies' numbers, their
gradients included, in float64 to rounding and under bf16 autocast to its precision; the backward
keeps no concatenated copy of the weights (tests/unit/test_activation_memory.py counts what a block
keeps: a saved copy there is three tensors more than the planner's count). Where the weights are a
tensor-parallel shard or carry LoRA adapters the three multiplies run as before (the parity and LoRA
suites cover those)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from loom.config import load_config
from loom.models import build_model
from loom.models.common import attention
from loom.models.common.attention import Attention, _SideBySide


@pytest.mark.parametrize("bias", [True, False])
def test_the_side_by_side_product_has_three_linears_gradients(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weights = [torch.randn(n, 8, dtype=torch.float64, generator=g, requires_grad=True) for n in (8, 4, 4)]
    biases = [torch.randn(n, dtype=torch.float64, generator=g, requires_grad=True) for n in (8, 4, 4)] if bias else []
    assert torch.autograd.gradcheck(lambda *a: _SideBySide.apply(*a), (x, *weights, *biases))


def _model_grads(arch: str, fused: bool, precision: torch.dtype | None = None):
    cfg = load_config(None, [f"model={arch}", "model.n_layer=2", "model.dropout=0.0"]).model
    torch.manual_seed(0)
    model = build_model(cfg).to_empty(device="cpu")
    model.init_weights(0)
    model = model.double() if precision is None else model
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    calls = mock.patch.object(Attention, "_fusable", lambda self: False) if not fused else mock.patch.object(
        attention._SideBySide, "apply", wraps=attention._SideBySide.apply)
    with calls as spy, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
        out = model(idx)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
    if fused:
        assert spy.call_count == 2, "the projections did not run side by side"
    return out.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt-tiny", "llama-tiny"])
def test_fused_projections_give_the_three_multiplies_numbers(arch):
    out, grads = _model_grads(arch, fused=True)
    ref_out, ref_grads = _model_grads(arch, fused=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-14)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-13, msg=name)


def test_fused_projections_under_bf16_autocast():
    out, grads = _model_grads("gpt-tiny", fused=True, precision=torch.bfloat16)
    ref_out, ref_grads = _model_grads("gpt-tiny", fused=False, precision=torch.bfloat16)
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    for name in (n for n in grads if grads[n].dim() >= 2):  # k_proj.bias's gradient is 0 up to rounding
        rel = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
        assert rel < 2e-2, f"{name}: {rel:.1e}"
