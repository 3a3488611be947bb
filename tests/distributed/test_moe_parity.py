"""Expert parallelism gives one process's training: the same losses, routing, dropped tokens and
auxiliary losses at every step, and the same parameters at the end (float64, relative 1e-10).

Two sparse models: Switch (top-1, an MoE layer in each of 4 blocks, 8 experts) and GLaM-style top-2
(an MoE layer in every other block; random routing off, since its draws, like dropout's, come from
each rank's generator). Routing statistics per step and per MoE layer are the counts of tokens each
expert was sent, the assignments routed and dropped for capacity, and the summed auxiliary and
z-losses: integers must be equal, the losses within 1e-5."""

from __future__ import annotations

import functools

import pytest
import torch

from loom.models.common import STAT_FIELDS
from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import RTOL, STEPS, assert_matches, merge_ranks, train_layouts, train_single

TWO_RANKS = {
    "ep2": ["parallel.ep=2"],
    "ep2_accum2": ["parallel.ep=2", "train.grad_accum=2"],
}
FOUR_RANKS = {
    "ep4": ["parallel.ep=4"],
    "ep2_dp2": ["parallel.ep=2", "parallel.dp=2"],
    "ep2_dp2_zero1_recompute": ["parallel.ep=2", "parallel.dp=2", "parallel.zero=1", "parallel.recompute=full"],
    "ep2_dp2_zero3": ["parallel.ep=2", "parallel.dp=2", "parallel.zero=3"],
    "ep2_tp2": ["parallel.ep=2", "parallel.tp=2"],
    "ep2_tp2_sp": ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"],
    "ep2_pp2": ["parallel.ep=2", "parallel.pp=2", "parallel.microbatches=2"],
    "ep_outermost": ["parallel.ep=2", "parallel.dp=2", "parallel.mesh_order=[ep,pp,dp,tp]"],
}
MODELS = ("switch", "glam")
LAYOUTS = {2: TWO_RANKS, 4: FOUR_RANKS}
# top-2 routing shares all the code paths above but the router's: a few layouts keep the suite short
GLAM_LAYOUTS = {"ep2", "ep4", "ep2_tp2_sp", "ep2_pp2"}
N_FIELDS = len(STAT_FIELDS)


@functools.cache
def _reference(model: str, *train_settings: str) -> dict:
    return train_single(model, list(train_settings))


def _cases(world: int) -> list[tuple[str, str, list[str]]]:
    return [(m, name, layout) for m in MODELS for name, layout in LAYOUTS[world].items()
            if m == "switch" or name in GLAM_LAYOUTS]


@functools.cache
def _results(world: int) -> tuple:
    cases = [(m, layout) for m, name, layout in _cases(world)]
    return tuple(run_on_ranks(world, train_layouts, cases))


def _check(model: str, layout: list[str], world: int) -> None:
    ref = _reference(model, *(o for o in layout if not o.startswith("parallel.")))
    got = merge_ranks(list(_results(world)), (model, *layout))
    assert len(got["moe"]) == len(ref["moe"]) == STEPS
    for step, (g, r) in enumerate(zip(got["moe"], ref["moe"])):
        counts = slice(0, g.size(1) - 3)  # load per expert, routed, dropped (integers)
        assert torch.equal(g[:, counts], r[:, counts]), f"step {step}: routing differs\n{g[:, counts]}\n{r[:, counts]}"
        torch.testing.assert_close(g[:, -3:], r[:, -3:], rtol=RTOL, atol=0)  # aux, z-loss sums; groups
    assert_matches(got, ref)


@pytest.mark.parametrize(("model", "name", "layout"), _cases(2), ids=[f"{m}-{n}" for m, n, _ in _cases(2)])
def test_two_rank_expert_parallel_matches_single_process(model, name, layout):
    _check(model, layout, 2)


@pytest.mark.parametrize(("model", "name", "layout"), _cases(4), ids=[f"{m}-{n}" for m, n, _ in _cases(4)])
def test_four_rank_expert_parallel_matches_single_process(model, name, layout):
    _check(model, layout, 4)


@pytest.mark.parametrize("model", MODELS)
def test_the_reference_routes_drops_and_learns(model):
    """The comparison means something: in five steps tokens are dropped for capacity, the loss
    falls by far more than the tolerance, and the expert weights move."""
    ref, start = _reference(model), train_single(model, ["train.lr=1e-12", "train.min_lr=0"])
    stats = torch.stack(ref["moe"])  # (steps, layers, experts + fields)
    assert stats[..., -N_FIELDS + 1].sum() > 0, "no token was ever dropped: capacity is not exercised"
    assert (stats[..., : -N_FIELDS] > 0).all(), "an expert never received a token"
    assert (ref["losses"][0] - ref["losses"][-1]) / ref["losses"][0] > 1e6 * RTOL
    for name, p in ref["params"].items():
        if ".experts.w" in name:
            moved = (p - start["params"][name]).norm() / p.norm()
            assert moved > 1e6 * RTOL, f"{name} moved only {moved:.1e}"
