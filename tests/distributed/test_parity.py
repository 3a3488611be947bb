"""Layout invariance: the same model, seed and data under every parallel layout give the losses
of one process at every step, and the same parameters at the end — in float64, to 1e-10 relative,
where two correct layouts differ by ~1e-14 and a real layout error by orders of magnitude more
(a test below breaks two layouts on purpose and watches the check fail). Short fp32 and bf16 checks
per parallel dimension keep the production precisions covered, at tolerances set from their
measured noise (docs/testing.md).

Each world size starts its processes once and trains every layout of that size in turn; the two- and
four-rank layouts run in the session's shared job of that size (tests/distributed/shared_job.py)."""

from __future__ import annotations

import functools

import pytest

from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import (
    RTOL,
    assert_matches,
    assert_matches_roughly,
    merge_ranks,
    train_layouts,
    train_single,
)

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
# Other families and position encodings, each under the layouts that exercise what is new in it (the
# same processes run them): Llama's grouped-query attention split over tp with whole key/value groups
# per rank, RMSNorm under sequence parallelism, its untied output projection on the last pipeline stage;
# GPT's sinusoidal positions sliced by sequence parallelism, its relative position bias split by heads.
MORE_MODELS = {
    "llama": {2: {name: TWO_RANKS[name] for name in ("tp2", "tp2_sp", "pp2_1f1b")},
              4: {"dp2_tp2_zero1": FOUR_RANKS["dp2_tp2_zero1"]}},
    "gpt_sinusoidal": {2: {"tp2_sp": TWO_RANKS["tp2_sp"]}},
    "gpt_relative": {2: {"tp2_sp": TWO_RANKS["tp2_sp"], "pp2_1f1b": TWO_RANKS["pp2_1f1b"]}},
}

# The production precisions, one layout per dimension (data/ZeRO, tensor+sequence, pipeline on GPT; expert
# on Switch), with tolerances ~10x the worst difference measured over these layouts (docs/testing.md:
# fp32 losses 1.6e-7 and weights 3.5e-6; bf16 losses 7.9e-5 and weights 8.7e-3). Under bf16 an MoE
# router's near-ties flip with the rounding, so an expert-parallel bf16 run routes some tokens elsewhere
# than one process: its weights are not compared, its losses are.
SMOKE_LAYOUTS = {
    "dp2_zero3": ("gpt", ["parallel.dp=2", "parallel.zero=3"]),
    "tp2_sp": ("gpt", ["parallel.tp=2", "parallel.sp=true"]),
    "pp2_1f1b": ("gpt", ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"]),
    "ep2": ("switch", ["parallel.ep=2"]),
}
SMOKE_TOLERANCE = {"fp32": dict(loss_rtol=2e-6, matrix_rtol=1e-4), "bf16": dict(loss_rtol=1e-3, matrix_rtol=0.1)}
# Blocks compiled by torch.compile (train.compile) under each kind of layout: FSDP gathering around
# compiled blocks, DTensor operators and selective recomputation inside them, a compiled pipeline stage.
# The aot_eager backend traces the same graphs (dynamo, AOTAutograd's joint forward/backward) without
# generating code, so the comparison stays float64-exact and cheap; inductor's own code is checked once,
# in one process (tests/unit/test_compile.py).
COMPILE = ["train.compile=true", "train.compile_backend=aot_eager"]
COMPILED = {
    "dp2_zero3_compiled": ["parallel.dp=2", "parallel.zero=3", *COMPILE],
    "tp2_sp_recompute_selective_compiled": ["parallel.tp=2", "parallel.sp=true", "parallel.recompute=selective",
                                            *COMPILE],
    "pp2_1f1b_compiled": ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2", *COMPILE],
}
# Two layouts broken on purpose (tests/distributed/parity.py: SABOTAGE): the check must fail on each.
BROKEN = {
    "tp2_bias_on_every_rank": ["parallel.tp=2", "sabotage:bias_on_every_rank"],
    "pp2_dropped_microbatch": ["parallel.pp=2", "parallel.schedule=gpipe", "parallel.microbatches=2",
                               "sabotage:dropped_microbatch"],
}


def _smoke_cases() -> list[tuple[str, list[str]]]:
    return [(model, [*layout, f"train.precision={precision}"])
            for precision in SMOKE_TOLERANCE for model, layout in SMOKE_LAYOUTS.values()]


def _cases(world: int) -> list[tuple[str, list[str]]]:
    cases = [(m, layout) for m in MODELS for layout in LAYOUTS[world].values()]
    cases += [(m, layout) for m, by_world in MORE_MODELS.items() for layout in by_world.get(world, {}).values()]
    if world == 2:  # the same processes also run the precision checks and the broken layouts
        cases += _smoke_cases() + [("gpt", layout) for layout in [*COMPILED.values(), *BROKEN.values()]]
    return cases


LAYOUTS = {2: TWO_RANKS, 4: FOUR_RANKS, 8: EIGHT_RANKS}


@functools.cache
def _reference(model: str, *train_settings: str) -> dict:
    return train_single(model, list(train_settings))


def two_rank_job(tmp_dir: str) -> dict:
    """This suite's two-rank layouts, run in the session's two-rank job (tests/distributed/shared_job.py)."""
    return train_layouts(_cases(2))


def four_rank_job(tmp_dir: str) -> dict:
    """This suite's four-rank layouts, run in the session's four-rank job."""
    return train_layouts(_cases(4))


@functools.cache
def _eight_ranks() -> tuple:
    return tuple(run_on_ranks(8, train_layouts, _cases(8)))


def _results_of(model: str, layout: list[str], world: int, job: dict | None = None) -> tuple[dict, dict]:
    """(the layout's result, the one-process reference with the layout's other settings, e.g.
    train.grad_accum or train.precision); two and four ranks' results come from the session's job of
    that world size (``job``), eight ranks' from a start of their own."""
    ref = _reference(model, *(o for o in layout if not o.startswith(("parallel.", "sabotage:", "train.compile"))))
    ranks = _eight_ranks() if world == 8 else job["test_parity"]
    return merge_ranks(list(ranks), (model, *layout)), ref


def _check(model: str, layout: list[str], world: int, job: dict | None = None) -> None:
    assert_matches(*_results_of(model, layout, world, job))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_rank_layout_matches_single_process(name, model, two_rank_job):
    _check(model, TWO_RANKS[name], 2, two_rank_job)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_rank_layout_matches_single_process(name, model, four_rank_job):
    _check(model, FOUR_RANKS[name], 4, four_rank_job)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", list(EIGHT_RANKS))
def test_eight_rank_layout_matches_single_process(name, model):
    _check(model, EIGHT_RANKS[name], 8)


@pytest.mark.parametrize("model, world, name", [(m, w, n) for m, by_world in MORE_MODELS.items()
                                                 for w, layouts in by_world.items() for n in layouts])
def test_other_family_layout_matches_single_process(model, world, name, two_rank_job, four_rank_job):
    _check(model, MORE_MODELS[model][world][name], world, {2: two_rank_job, 4: four_rank_job}[world])


@pytest.mark.parametrize("precision", list(SMOKE_TOLERANCE))
@pytest.mark.parametrize("name", list(SMOKE_LAYOUTS))
def test_production_precision_layout_matches_single_process(name, precision, two_rank_job):
    model, layout = SMOKE_LAYOUTS[name]
    got, ref = _results_of(model, [*layout, f"train.precision={precision}"], 2, two_rank_job)
    tolerance = dict(SMOKE_TOLERANCE[precision])
    if precision == "bf16" and model == "switch":
        tolerance["matrix_rtol"] = None  # routing near ties follows the rounding: the losses are compared
    assert_matches_roughly(got, ref, **tolerance)


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_layout_matches_eager_single_process(name, two_rank_job):
    _check("gpt", COMPILED[name], 2, two_rank_job)


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_deliberately_broken_layout_fails_the_parity_check(name, two_rank_job):
    got, ref = _results_of("gpt", BROKEN[name], 2, two_rank_job)
    with pytest.raises(AssertionError):
        assert_matches(got, ref)
    # and not by a hair: its weight matrices are off by a million times the tolerance or more
    worst = max(((got["params"][n] - p).norm() / p.norm()).item() for n, p in ref["params"].items() if p.dim() >= 2)
    assert worst > 1e6 * RTOL, f"the broken layout differs by only {worst:.1e}"


@pytest.mark.parametrize("model", [*MODELS, "llama"])
def test_reference_training_moves_far_more_than_the_tolerance(model):
    """The comparison means something: five steps change the loss and every weight matrix by far
    more than the tolerance the layouts are held to."""
    ref, start = _reference(model), train_single(model, ["train.lr=1e-12", "train.min_lr=0"])
    assert (ref["losses"][0] - ref["losses"][-1]) / ref["losses"][0] > 1e6 * RTOL
    for name, p in ref["params"].items():
        if p.dim() >= 2:
            moved = (p - start["params"][name]).norm() / p.norm()
            assert moved > 1e6 * RTOL, f"{name} moved only {moved:.1e}"
