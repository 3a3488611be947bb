"""Layout invariance: the same model, seed and data under every parallel layout give the losses
of one process at every step, and the same parameters at the end (fp32, relative 1e-5).

Each world size starts its processes once and trains every layout of that size in turn."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import STEPS, merge_ranks, train_layouts, train_single

RTOL = 1e-5

TWO_RANKS = {
    "dp2": ["parallel.dp=2"],
    "dp2_zero1": ["parallel.dp=2", "parallel.zero=1"],
    "dp2_zero2": ["parallel.dp=2", "parallel.zero=2"],
    "dp2_zero3": ["parallel.dp=2", "parallel.zero=3"],
    "dp2_zero1_accum2": ["parallel.dp=2", "parallel.zero=1", "train.grad_accum=2"],
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sp=true"],
    "pp2_gpipe": ["parallel.pp=2", "parallel.schedule=gpipe", "parallel.microbatches=2"],
    "pp2_1f1b": ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4"],
    "pp2_interleaved": ["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
                        "parallel.microbatches=4"],
    "pp2_zero_bubble": ["parallel.pp=2", "parallel.schedule=zero-bubble", "parallel.virtual_stages=2",
                        "parallel.microbatches=4"],
    "dp2_zero2_offload": ["parallel.dp=2", "parallel.zero=2", "parallel.offload=optimizer"],
    "dp2_recompute_selective": ["parallel.dp=2", "parallel.recompute=selective"],
    "tp2_recompute_full_every2": ["parallel.tp=2", "parallel.recompute=full", "parallel.recompute_every=2"],
}
FOUR_RANKS = {
    "dp2_tp2": ["parallel.dp=2", "parallel.tp=2"],
    "dp2_tp2_zero1": ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"],
    "dp2_tp2_sp_zero3": ["parallel.dp=2", "parallel.tp=2", "parallel.sp=true", "parallel.zero=3"],
    "dp4_zero3_hybrid": ["parallel.dp=4", "parallel.zero=3", "parallel.shard_group=2"],
    "dp2_tp2_tp_outermost": ["parallel.dp=2", "parallel.tp=2", "parallel.mesh_order=[tp,dp,pp]"],
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "parallel.microbatches=2"],
    "dp2_pp2_zero3": ["parallel.dp=2", "parallel.pp=2", "parallel.zero=3", "parallel.microbatches=2"],
}
# 8 processes on a 2-core machine take a while: marked slow (CI still runs it)
EIGHT_RANKS = {
    "dp2_tp2_pp2_zero1_sp": ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.zero=1", "parallel.sp=true",
                             "parallel.microbatches=2"],
}
MODELS = ("gpt", "pangu")
LAYOUTS = {2: TWO_RANKS, 4: FOUR_RANKS, 8: EIGHT_RANKS}


@functools.cache
def _reference(model: str, *train_settings: str) -> dict:
    return train_single(model, list(train_settings))


@functools.cache
def _results(world: int) -> tuple:
    cases = [(m, layout) for m in MODELS for layout in LAYOUTS[world].values()]
    return tuple(run_on_ranks(world, train_layouts, cases))


def _check(model: str, layout: list[str], world: int) -> None:
    ref = _reference(model, *(o for o in layout if not o.startswith("parallel.")))  # e.g. train.grad_accum
    got = merge_ranks(list(_results(world)), (model, *layout))
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=RTOL, atol=0)
    assert sorted(got["params"]) == sorted(ref["params"]), "a layout lost or renamed parameters"
    for name, p in ref["params"].items():
        if name.endswith("k_proj.bias"):
            # softmax ignores a shift shared by all keys: this bias has no effect on any output, its
            # gradient is 0 up to rounding, and Adam turns that rounding noise into full-size steps
            continue
        # relative to the tensor's norm: Adam divides each gradient element by its own running scale,
        # so the rounding of an element whose gradient is ~0 can move that one weight by ~lr·1e-4
        err = (got["params"][name] - p).norm().item() / p.norm().clamp_min(1e-12).item()
        assert err <= RTOL, f"{name}: relative difference {err:.2e} after {STEPS} steps"
    if ref["val_loss"] is not None:
        assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=RTOL)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_rank_layout_matches_single_process(name, model):
    _check(model, TWO_RANKS[name], 2)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_rank_layout_matches_single_process(name, model):
    _check(model, FOUR_RANKS[name], 4)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", list(EIGHT_RANKS))
def test_eight_rank_layout_matches_single_process(name, model):
    _check(model, EIGHT_RANKS[name], 8)


@pytest.mark.parametrize("model", MODELS)

def test_reference_training_moves_far_more_than_the_tolerance(model):
    """The comparison means something: five steps change the loss and every weight matrix by far
    more than the tolerance the layouts are held to."""
    ref, start = _reference(model), train_single(model, ["train.lr=1e-12", "train.min_lr=0"])
    assert (ref["losses"][0] - ref["losses"][-1]) / ref["losses"][0] > 100 * RTOL
    for name, p in ref["params"].items():
        if p.dim() >= 2:
            moved = (p - start["params"][name]).norm() / p.norm()
            assert moved > 100 * RTOL, f"{name} moved only {moved:.1e}"
