"""benchmarks/planner_accuracy.py stays runnable: its layouts are valid 4-process plans, the plan the cost
model reads splits the batch as the engine does, and its statistics are right."""

import importlib.util
import statistics
from pathlib import Path

import pytest

from loom.config import load_config
from loom.parallel.plan import check_plan

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "planner_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("planner_accuracy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_at_least_ten_valid_layouts_of_four_processes(bench):
    assert len(bench.LAYOUTS) >= 10
    kinds = set()
    for name, layout in bench.LAYOUTS.items():
        cfg = load_config(None, bench.overrides(layout, bench.MODEL))
        plan, batch, seq = bench.to_plan(layout, bench.MODEL)
        check_plan(plan, cfg, bench.NPROC)
        assert plan.dp * plan.tp * plan.pp * plan.ep == bench.NPROC, name
        assert plan.micro_batch(batch) * plan.dp * plan.ep * plan.grad_accum * plan.microbatches == batch, name
        assert plan.grad_accum == cfg.train.grad_accum and seq == cfg.model.block_size
        kinds |= {k for k in ("dp", "tp", "pp") if getattr(plan, k) > 1}
    assert kinds == {"dp", "tp", "pp"}


def test_spearman(bench):
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) against (1, 3, 2, 4): 1 - 6·Σd²/(n(n²-1)) = 1 - 6·2/60
    assert bench.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties share their mean rank
    assert bench.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, rel=1e-6)


def test_report_statistics(bench, capsys):
    rows = [{"layout": str(i), "step_s": s, "pred_step_s": p, "rss_mib": 100.0, "pred_rss_mib": m}
            for i, (s, p, m) in enumerate([(1.0, 1.1, 110.0), (2.0, 1.5, 90.0), (3.0, 3.3, 100.0)])]
    stats = bench.report(rows)
    assert stats["median_abs_step_error"] == pytest.approx(statistics.median([0.1, 0.25, 0.1]))
    assert stats["max_abs_memory_error"] == pytest.approx(0.1)
    assert stats["spearman_step"] == pytest.approx(1.0)
    assert "| 1 | 2.000 | 1.500 | -25% |" in capsys.readouterr().out
