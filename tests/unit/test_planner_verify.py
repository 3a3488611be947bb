"""The dry run (``loom plan --verify``): each rank's parameters counted on the meta device under a fake
process group of the whole world size, against a closed form written here and against the cost model."""

from __future__ import annotations

import pytest

from loom.config import load_config
from loom.parallel.pipeline import stage_ids, stage_layout
from loom.parallel.plan import Plan
from loom.planner.cost import plan_for_batch
from loom.planner.verify import default_ranks, rank_at, verify

Layout = Plan  # a plan seen for its layout alone


def layout_plan(**axes) -> Plan:
    """The plan of ``axes`` with one micro-batch per pipeline stage and ZeRO over the whole dp group."""
    batch = axes.get("dp", 1) * axes.get("ep", 1) * axes.get("pp", 1)
    return plan_for_batch(batch, 1, **axes)


def plan_of(plan: Plan) -> Plan:
    return plan


def _cfg(preset: str, **overrides):
    return load_config(None, [f"model={preset}", *(f"model.{k}={v}" for k, v in overrides.items())]).model


def expected(cfg, layout: Layout, stage: int) -> tuple[list[int], int]:
    """(blocks, parameters before ZeRO) of pipeline rank ``stage`` (tp rank 0), from the shapes alone.

    Tensor parallelism (Megatron's split) divides the q/k/v and fc weights and biases, the out_proj and
    proj weights and the vocabulary rows by tp; the LayerNorms, the out_proj/proj biases, the position
    embeddings (and PanGu's query embedding) and MoE layers are whole on every tp rank, and the experts
    split over ep. The last stage holds ln_f (and PanGu's top query layer) and, on another rank than the
    first, its copy of the tied embedding; FSDP makes two copies of it on a rank holding both stages."""
    h, f, vocab, t, tp = cfg.n_embd, cfg.ffn, cfg.vocab_size, cfg.block_size, layout.tp
    v = layout.virtual_stages if layout.pp > 1 else 1
    specs = stage_layout(cfg, layout.pp * v)
    held = stage_ids(stage, layout.pp, v, layout.schedule) if v > 1 else [stage]
    first, last = 0 in held, len(specs) - 1 in held
    blocks = sorted(i for s in held for i in specs[s].blocks)
    dense = (4 * h * h + 3 * h + 2 * h * f + f) // tp + 6 * h  # a decoder block with a dense MLP
    n = 0
    for i in blocks:
        if cfg.moe.is_moe_block(i):
            e, fe = cfg.moe.experts, cfg.expert_ffn
            n += (4 * h * h + 3 * h) // tp + 5 * h + h * e + e // layout.ep * (2 * h * fe + fe + h)
        else:
            n += dense
    copies = int(first) + int(last and not first) + int(first and last and layout.pp > 1
                                                        and layout.dp * layout.ep > 1)
    n += copies * vocab // tp * h
    if first:
        n += t * h
    if last:
        n += 2 * h + ((t * h + dense) if cfg.arch == "pangu" else 0)
    return blocks, n


def _check(cfg, layout: Layout, rows: list[dict]) -> None:
    for r in rows:
        blocks, n = expected(cfg, layout, r["stage"])
        assert r["blocks"] == blocks, r
        assert r["params_counted"] == n, (r, n)
        assert r["params_sharded"] <= r["params_counted"]
        if not layout.zero:
            assert r["params_sharded"] == r["params_counted"]


# Layouts of the small models: (preset, overrides, layout); 8 or 16 ranks each
def _case(preset: str, overrides: dict, layout: Layout):
    return pytest.param(preset, overrides, layout, id=f"{preset} {layout.describe()}")


SMALL = [
    _case("gpt-tiny", dict(n_layer=4), layout_plan(dp=2, tp=2, pp=2, zero=1)),
    _case("pangu-tiny", dict(n_layer=5), layout_plan(dp=2, tp=2, pp=2, zero=1)),
    _case("switch-tiny", dict(n_layer=4), layout_plan(dp=2, ep=4, zero=1)),
    _case("glam-tiny", {}, layout_plan(dp=2, tp=2, ep=2, pp=2, zero=1, sp=True, recompute="selective")),
]
OTHER_SCHEDULES = [
    _case("gpt-tiny", dict(n_layer=8), layout_plan(dp=2, tp=2, pp=2, zero=3, sp=True, schedule="interleaved",
                                              virtual_stages=2, recompute="full")),
    _case("gpt-tiny", dict(n_layer=8), layout_plan(dp=2, pp=2, zero=2, schedule="zero-bubble", virtual_stages=2)),
    _case("gpt-tiny", dict(n_layer=8), layout_plan(pp=2, schedule="zero-bubble", virtual_stages=2)),
    _case("gpt-tiny", dict(n_layer=4), layout_plan()),
]


@pytest.mark.parametrize("preset,overrides,layout", SMALL + OTHER_SCHEDULES)
def test_counts_what_each_rank_holds(preset, overrides, layout):
    cfg = _cfg(preset, **overrides)
    rows = verify(cfg, layout)
    assert [r["rank"] for r in rows] == default_ranks(plan_of(layout))
    _check(cfg, layout, rows)


def test_every_rank_and_the_zero_shards():
    """All 8 ranks of dp=2 tp=2 pp=2 zero=1: the ranks of a stage hold the same, and the ZeRO shards of
    a dp group add up to the unsharded count."""
    cfg, layout = _cfg("gpt-tiny", n_layer=4), layout_plan(dp=2, tp=2, pp=2, zero=1)
    plan = plan_of(layout)
    rows = {r["rank"]: r for r in verify(cfg, layout, ranks=list(range(8)))}
    _check(cfg, layout, list(rows.values()))
    for stage in range(2):
        for tp in range(2):
            group = [rows[rank_at(plan, pp=stage, tp=tp, dp_shard=d)] for d in range(2)]
            assert sum(r["params_sharded"] for r in group) == group[0]["params_counted"]


def test_plan_and_ranks():
    layout = layout_plan(dp=16, tp=8, pp=16, zero=1, schedule="interleaved", virtual_stages=2)
    plan = plan_of(layout)
    assert plan == Plan(dp=16, tp=8, pp=16, zero=1, shard_group=16, microbatches=16, schedule="interleaved",
                        virtual_stages=2)
    assert plan.world_size == 2048
    assert default_ranks(plan) == [0, 1024, 1920]  # pp is the outermost axis: 128 ranks per stage
    assert rank_at(plan, pp=1, tp=3) == 131
    assert default_ranks(plan_of(layout_plan(dp=2))) == [0]
    with pytest.raises(ValueError, match="outside"):
        verify(_cfg("gpt-tiny"), layout_plan(dp=2), ranks=[2])


def test_isolated_run_counts_the_same():
    """In a subprocess (as when this process already has a process group): the same counts."""
    cfg, layout = _cfg("switch-tiny", n_layer=4), layout_plan(dp=1, tp=2, ep=2, pp=2)
    here, there = verify(cfg, layout), verify(cfg, layout, isolate=True)
    keys = ("rank", "stage", "blocks", "params_counted", "params_sharded", "params_predicted")
    assert [{k: r[k] for k in keys} for r in here] == [{k: r[k] for k in keys} for r in there]


# -- full scale: the 2048 ranks of PanGu-α 200B, the 1024 of GPT-3 175B (seconds: shapes only) -----

# GPT-3's vocabulary padded to a multiple of 128 · tp, as Megatron-LM does: 50257 rows do not split over tp=8
FULL = {
    "pangu-200b/2048": ("pangu-200b", {}, layout_plan(dp=16, tp=8, pp=16, zero=1)),
    "gpt3-175b/1024": ("gpt3-175b", dict(vocab_size=51200), layout_plan(dp=16, tp=8, pp=8, zero=1)),
}


@pytest.fixture(scope="module")
def full_scale():
    out = {}
    for key, (preset, overrides, layout) in FULL.items():
        cfg = _cfg(preset, **overrides)
        plan = plan_of(layout)
        ranks = [0, rank_at(plan, pp=layout.pp - 1)]  # the embedding's stage and the head's
        out[key] = (cfg, layout, verify(cfg, layout, ranks=ranks))
    return out


@pytest.mark.parametrize("key", FULL)
def test_full_scale_dry_run(full_scale, key):
    cfg, layout, rows = full_scale[key]
    assert layout.world_size == {"pangu-200b/2048": 2048, "gpt3-175b/1024": 1024}[key]
    assert [r["stage"] for r in rows] == [0, layout.pp - 1]
    _check(cfg, layout, rows)
    assert all(r["seconds"] < 60 for r in rows)
    assert all(r["params_counted"] > 1.5e9 for r in rows)  # billions of parameters, none allocated


# -- against the cost model -------------------------------------------------------------------------
# The cost model splits the stages as the pipeline does and counts what tensor parallelism keeps whole
# (LayerNorms, row-parallel biases, position embeddings, MoE routers): every rank's count is exact.


@pytest.mark.parametrize("preset,overrides,layout", SMALL)
def test_cost_model_predicts_each_rank(preset, overrides, layout):
    rows = verify(_cfg(preset, **overrides), layout)
    assert [r["blocks_predicted"] for r in rows] == [r["blocks"] for r in rows]
    assert [r["params_predicted"] for r in rows] == [r["params_counted"] for r in rows]


@pytest.mark.parametrize("key", FULL)
def test_cost_model_predicts_full_scale(full_scale, key):
    _, _, rows = full_scale[key]
    assert [r["blocks_predicted"] for r in rows] == [r["blocks"] for r in rows]
    assert [r["params_predicted"] for r in rows] == [r["params_counted"] for r in rows]
