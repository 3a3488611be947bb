"""The plan picture: the pipeline schedule simulation behind its timeline, and the PNG itself."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest

from loom.planner.report import bubble_fraction, drawn_microbatches, makespan, simulate_schedule

CASES = [(pp, m) for pp in (1, 2, 4, 8) for m in (1, 3, 4, 8, 12, 16)]


def _check_valid(ops, pp, m, schedule, v):
    """Every operation once, no rank runs two at a time, and every dependency ends before its user starts."""
    split = schedule == "zero-bubble"
    v = v if schedule == "interleaved" and pp > 1 else 1
    kinds = ("F", "B", "W") if split else ("F", "B")
    end = {}
    for o in ops:
        key = (o.kind, o.microbatch, o.chunk * pp + o.rank)  # the stage: chunk c of rank r is c·pp + r
        assert key not in end, f"{key} runs twice"
        assert o.end > o.start
        end[key] = (o.start, o.end)
    last = pp * v - 1
    assert set(end) == {(k, i, s) for k in kinds for i in range(m) for s in range(last + 1)}
    for (kind, i, s), (start, _) in end.items():
        if kind == "F" and s > 0:
            assert end[("F", i, s - 1)][1] <= start + 1e-12
        if kind == "B":
            assert end[("F", i, s)][1] <= start + 1e-12
            if s < last:
                assert end[("B", i, s + 1)][1] <= start + 1e-12
        if kind == "W":
            assert end[("B", i, s)][1] <= start + 1e-12
    by_rank = defaultdict(list)
    for o in ops:
        by_rank[o.rank].append((o.start, o.end))
    for spans in by_rank.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:])), "a rank runs two operations at once"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp,m", CASES)
def test_gpipe_and_1f1b_makespan_and_bubble(schedule, pp, m):
    t_f, t_b = 1.0, 2.0
    ops = simulate_schedule(pp, m, schedule, 1, t_f, t_b)
    _check_valid(ops, pp, m, schedule, 1)
    assert makespan(ops) == pytest.approx((m + pp - 1) * (t_f + t_b))
    assert bubble_fraction(ops) == pytest.approx((pp - 1) / (m + pp - 1))


@pytest.mark.parametrize("pp,m", [(4, 8), (8, 8), (8, 12)])
def test_unequal_times_keep_the_formula(pp, m):
    ops = simulate_schedule(pp, m, "1f1b", 1, 0.3, 0.7)
    assert makespan(ops) == pytest.approx((m + pp - 1) * 1.0)


def test_1f1b_keeps_at_most_pp_minus_rank_microbatches_in_flight():
    pp, m = 4, 12
    for schedule, limit in (("1f1b", lambda r: pp - r), ("gpipe", lambda r: m)):
        ops = simulate_schedule(pp, m, schedule, 1, 1.0, 2.0)
        for r in range(pp):
            live = peak = 0
            for o in sorted((o for o in ops if o.rank == r), key=lambda o: o.start):
                live += 1 if o.kind == "F" else -1
                peak = max(peak, live)
            assert peak == limit(r)


@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("pp,m", [(2, 4), (4, 4), (4, 8), (4, 16), (8, 16), (8, 12), (3, 2)])
def test_interleaved_is_valid_and_has_a_smaller_bubble(pp, m, v):
    t_f, t_b = 1.0, 2.0
    ops = simulate_schedule(pp, m, "interleaved", v, t_f, t_b)
    _check_valid(ops, pp, m, "interleaved", v)
    assert {o.chunk for o in ops} == set(range(v))
    one_f_one_b = simulate_schedule(pp, m, "1f1b", 1, t_f, t_b)
    assert makespan(ops) < makespan(one_f_one_b)
    assert bubble_fraction(ops) < bubble_fraction(one_f_one_b)
    if m % pp == 0:  # Narayanan et al. 2021: the bubble shrinks by the number of chunks
        assert makespan(ops) == pytest.approx((m + (pp - 1) / v) * (t_f + t_b))


def test_interleaved_needs_even_rounds():
    with pytest.raises(ValueError, match="rounds"):
        simulate_schedule(4, 17, "interleaved", 2)
    assert drawn_microbatches(4, 17, "interleaved") == 16  # what the picture draws instead


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 4), (4, 8), (8, 16), (8, 20)])
def test_zero_bubble_fills_the_bubble_with_weight_gradients(pp, m):
    t_f, t_b = 1.0, 2.0  # F, B and W take the same time: the bubble is a third of 1F1B's (ZB-H1)
    ops = simulate_schedule(pp, m, "zero-bubble", 1, t_f, t_b)
    _check_valid(ops, pp, m, "zero-bubble", 1)
    assert makespan(ops) == pytest.approx(m * (t_f + t_b) + (pp - 1) * t_f)
    assert bubble_fraction(ops) < bubble_fraction(simulate_schedule(pp, m, "1f1b", 1, t_f, t_b))
    for r in range(pp):  # no rank holds more activations than the first does under 1F1B
        live = peak = 0
        for o in sorted((o for o in ops if o.rank == r), key=lambda o: o.start):
            live += {"F": 1, "B": 0, "W": -1}[o.kind]
            peak = max(peak, live)
        assert peak <= pp


def test_no_pipeline_is_one_busy_row():
    ops = simulate_schedule(1, 5, "1f1b", 1, 1.0, 2.0)
    assert {o.rank for o in ops} == {0}
    assert [o.kind for o in ops] == ["F", "B"] * 5
    assert bubble_fraction(ops) == pytest.approx(0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        simulate_schedule(2, 4, "pipedream")
    with pytest.raises(ValueError):
        simulate_schedule(0, 4)


def test_drawn_microbatches():
    assert drawn_microbatches(16, 64, "1f1b") == 40  # 2·pp + 8
    assert drawn_microbatches(16, 64, "interleaved") == 48  # whole rounds of pp
    assert drawn_microbatches(4, 6, "1f1b") == 6
    assert drawn_microbatches(1, 280, "1f1b") == 10


# --------------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pangu():
    from loom.config import load_config
    from loom.planner.hardware import parse_cluster
    from loom.planner.shape import model_shape

    cfg = load_config(None, ["model=pangu-200b"]).model
    return cfg, model_shape(cfg, 1024), parse_cluster("2048xascend910")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("layout_kw", [
    dict(dp=16, tp=8, pp=16, sp=True, zero=1, recompute="selective", micro_batch=1),
    dict(dp=256, tp=8, pp=1, sp=True, zero=3, recompute="full", micro_batch=1),
], ids=["pp16-1f1b", "pp1"])
def test_plot_plan_writes_a_png(pangu, tmp_path, layout_kw):
    from loom.planner.cost import estimate, plan_for_batch
    from loom.planner.report import plot_plan

    cfg, shape, cluster = pangu
    est = estimate(cfg, plan_for_batch(1024, **layout_kw), cluster, 1024, 1024, shape=shape)
    out = plot_plan(est, cluster, tmp_path / "sub" / "plan.png", title="PanGu-200B")
    assert out == tmp_path / "sub" / "plan.png"
    width, height = _png_size(out)
    assert width > 1000 and height > 400


def test_plot_plan_other_schedules(pangu, tmp_path):
    """An estimate that carries no per-stage memory draws the fullest device's as one bar; an interleaved
    schedule with its chunks."""
    from loom.planner.cost import estimate, plan_for_batch
    from loom.planner.report import plot_plan

    cfg, shape, cluster = pangu
    for i, (schedule, v) in enumerate((("zero-bubble", 2), ("interleaved", 2))):
        est = estimate(cfg, plan_for_batch(1024, dp=64, tp=8, pp=4, sp=True, zero=1, recompute="full",
                                           schedule=schedule, virtual_stages=v), cluster, 1024, 1024, shape=shape)
        if i == 0:
            est = replace(est, memory_per_stage_gb=[])
        _png_size(plot_plan(est, cluster, tmp_path / f"{schedule}.png"))
