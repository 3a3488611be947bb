"""Recomputation saves what the planner says: the tensors a block keeps alive from its forward to its
backward, measured on a tiny GPT, against the planner's count of (b, s, h)-sized fp32 tensors per block
(:func:`loom.planner.memory.fp32_saved_per_layer`).

Measured: every storage an operator of the forward creates (a ``TorchDispatchMode`` sees each one,
torch.utils.checkpoint's recomputation contexts included), kept by weak reference; what is still
alive after the forward, less the parameters and the logits, is what autograd and the checkpoints
hold for backward. One block's share is the difference between a 4-block and a 2-block model.

What the formula leaves out, and the tolerance: ``none`` measures 16.125 tensors against 17 planned.
The formula's 17 (LayerNorm inputs and outputs 4, q/k/v 3, attention output and its re-laid-out copy
2, the MLP's 4h before and after GELU 8) is one (b, s, h) tensor more than the block keeps (two of
them share a storage), and omits SDPA's log-sum-exp (b·heads·s floats, 1/8 tensor here); within 6%.
``selective`` (10) and ``full`` (1) are exact. Korthikanti et al.'s 34·s·b·h bytes in 2-byte
activations are the same 17 tensors; their 5·a·s²·b bytes of attention scores are not saved by SDPA's
fused attention, which the mixed-precision estimate still counts (an over-estimate on GPUs).

The check can fail: with recomputation made a no-op, selective and full keep the 16 tensors of
``none`` (:func:`test_recompute_as_a_no_op_is_caught`)."""

from __future__ import annotations

import weakref
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loom.config import load_config
from loom.models import build_model
from loom.parallel import recompute
from loom.parallel.plan import Plan
from loom.planner.memory import fp32_saved_per_layer

H, S, B, HEADS = 64, 32, 2, 4
TOLERANCE = {"none": 0.06, "selective": 1e-9, "full": 1e-9}


class _Created(TorchDispatchMode):
    """Remembers (weakly) the storage of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.storages = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.storages += [weakref.ref(t.untyped_storage()) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def alive_bytes(self, exclude: set[int]) -> int:
        alive = {}
        for ref in self.storages:
            st = ref()
            if st is not None and st.nbytes() and st.data_ptr() not in exclude:
                alive[st.data_ptr()] = st.nbytes()
        return sum(alive.values())


def kept_for_backward(n_layer: int, mode: str) -> int:
    """Bytes a ``n_layer``-block GPT keeps from its forward for its backward under ``mode``."""
    cfg = load_config(None, ["model=gpt-tiny", f"model.n_layer={n_layer}", f"model.n_embd={H}",
                             f"model.n_head={HEADS}", f"model.block_size={S}", "model.dropout=0.0"]).model
    torch.manual_seed(0)
    model = build_model(cfg).to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    recompute.apply_recompute(model.layers, mode)
    created = _Created()
    with created:
        logits = model(torch.randint(0, cfg.vocab_size, (B, S)))
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} | {logits.untyped_storage().data_ptr()}
    return created.alive_bytes(exclude)


def tensors_per_block(mode: str) -> float:
    """One block's share, in fp32 (b, s, h) tensors."""
    return (kept_for_backward(4, mode) - kept_for_backward(2, mode)) / 2 / (B * S * H * 4)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_saved_activations_match_the_planner(mode):
    planned = fp32_saved_per_layer(Plan(recompute=mode), mode)
    assert tensors_per_block(mode) == pytest.approx(planned, rel=TOLERANCE[mode])


def test_recompute_as_a_no_op_is_caught():
    with mock.patch.object(recompute, "apply_recompute", lambda blocks, mode, every=1: None):
        for mode in ("selective", "full"):
            planned = fp32_saved_per_layer(Plan(recompute=mode), mode)
            assert tensors_per_block(mode) != pytest.approx(planned, rel=TOLERANCE[mode])
