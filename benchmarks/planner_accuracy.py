"""The planner's cost model against measured runs: step time and peak memory per rank of a tiny GPT
trained under many layouts on 4 gloo processes of this machine, next to what ``loom.planner.cost``
predicts for them with this machine's ``loom calibrate`` profile.

    python benchmarks/planner_accuracy.py                     # calibrate, measure every layout, compare
    python benchmarks/planner_accuracy.py --profile PATH      # use an existing calibration profile
    python benchmarks/planner_accuracy.py --predict-only OUT  # re-predict a saved run (no measuring)

Each layout runs in fresh processes (so that each rank's peak resident set is its own), trains a few
warm-up steps and then ``--steps`` timed optimizer steps (random tokens, fp32, AdamW); a step's time is
the slowest rank's, from a barrier to the end of ``Trainer.train_step``, and the table shows the
median. Memory is each rank's peak resident set (``ru_maxrss``, as ``loom train`` reports it); the
table compares the fullest rank. Prints the table, Spearman's rank correlation and the median
absolute error, and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from loom.config import load_config
from loom.parallel.launch import run_on_ranks
from loom.parallel.plan import Plan, resolve_plan
from loom.planner.calibrate import main_calibrate
from loom.planner.cost import estimate
from loom.planner.hardware import parse_cluster

NPROC = 4
MODEL = ["model=gpt-tiny", "model.n_layer=8", "model.n_head=4", "model.n_embd=128", "model.block_size=128",
         "model.vocab_size=512"]
COMMON = ["train.batch_size=16", "train.device=cpu", "train.precision=fp32", "train.progress=none",
          "train.warmup_steps=2"]
# name -> overrides (4 processes each)
LAYOUTS: dict[str, list[str]] = {
    "dp4": ["parallel.dp=4"],
    "dp4 zero1": ["parallel.dp=4", "parallel.zero=1"],
    "dp4 zero3": ["parallel.dp=4", "parallel.zero=3"],
    "dp4 recompute=full": ["parallel.dp=4", "parallel.recompute=full"],
    "dp4 accum4": ["parallel.dp=4", "train.grad_accum=4"],
    "tp2 dp2": ["parallel.tp=2", "parallel.dp=2"],
    "tp2 dp2 sp": ["parallel.tp=2", "parallel.dp=2", "parallel.sp=true"],
    "tp4": ["parallel.tp=4"],
    "pp2 dp2 1f1b": ["parallel.pp=2", "parallel.dp=2", "parallel.microbatches=4"],
    "pp4 1f1b": ["parallel.pp=4", "parallel.microbatches=8"],
    "pp4 gpipe": ["parallel.pp=4", "parallel.schedule=gpipe", "parallel.microbatches=8"],
    "pp4 interleaved v2": ["parallel.pp=4", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
                           "parallel.microbatches=8"],
    "tp2 pp2": ["parallel.tp=2", "parallel.pp=2", "parallel.microbatches=4"],
}


def synthetic_data(vocab: int, n: int = 100_000) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    return SimpleNamespace(train=rng.integers(0, vocab, n).astype(np.uint16),
                           val=rng.integers(0, vocab, n // 10).astype(np.uint16), meta={})


def overrides(layout: list[str], model: list[str] | None = None) -> list[str]:
    return [*(MODEL if model is None else model), *COMMON, *layout]


def _measure(model: list[str], layout: list[str], warmup: int, steps: int) -> dict:
    """On every rank: build the trainer, train, time each step (from a barrier) and read the peak RSS."""
    import torch.distributed as dist

    from loom.parallel.launch import Process
    from loom.train.trainer import Trainer

    cfg = load_config(None, overrides(layout, model))
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = Trainer(cfg, resolve_plan(cfg, world), None, synthetic_data(cfg.model.vocab_size),
                      process=Process(rank, world, rank), device=torch.device("cpu"))
    times, cpu = [], []
    for step in range(warmup + steps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(step)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(name: str, layout: list[str], warmup: int, steps: int, rounds: int, model: list[str]) -> dict:
    """The layout's median step over ``steps`` steps, in each of ``rounds`` fresh jobs; the fastest round
    counts (other work on the machine only ever slows a round down)."""
    per_round = []
    for _ in range(rounds):
        ranks = run_on_ranks(NPROC, _measure, model, layout, warmup, steps, threads=1)
        per_step = [max(r["times"][i] for r in ranks) for i in range(steps)]
        per_round.append({"step_times_s": per_step, "step_s": statistics.median(per_step),
                          "cpu_s_per_rank": [statistics.median(r["cpu"]) for r in ranks],
                          "rss_mib_per_rank": [r["peak_rss_mib"] for r in ranks],
                          "load_average": os.getloadavg()[0]})
    best = min(per_round, key=lambda r: r["step_s"])
    return {"layout": name, "overrides": layout, **best, "rss_mib": max(best["rss_mib_per_rank"]),
            "rounds": per_round}


def to_plan(layout: list[str], model: list[str]) -> tuple[Plan, int, int]:
    """The plan a benchmark layout trains with (the engine's own, which the cost model reads as it is),
    its global batch and sequence length."""
    cfg = load_config(None, overrides(layout, model))
    return resolve_plan(cfg, NPROC), cfg.train.batch_size, cfg.model.block_size


def predict(row: dict, profile: Path, model: list[str]) -> dict:
    cfg = load_config(None, overrides(row["overrides"], model)).model
    plan, batch, seq = to_plan(row["overrides"], model)
    est = estimate(cfg, plan, parse_cluster(f"{NPROC}xcpu", profile=profile), batch, seq)
    return {**row, "pred_step_s": est.step_time_s, "pred_rss_mib": est.memory_gb_per_device * 1024,
            "pred_time_s": est.time_s, "pred_memory_gb": est.memory_gb, "plan": est.describe()}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(x):  # ties share their mean rank
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def report(rows: list[dict]) -> dict:
    for r in rows:
        r["step_error"] = r["pred_step_s"] / r["step_s"] - 1
        r["rss_error"] = r["pred_rss_mib"] / r["rss_mib"] - 1
    print("| layout | measured step (s) | predicted (s) | error | measured MiB/rank | predicted MiB | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['step_s']:.3f} | {r['pred_step_s']:.3f} | {100 * r['step_error']:+.0f}% "
              f"| {r['rss_mib']:.0f} | {r['pred_rss_mib']:.0f} | {100 * r['rss_error']:+.1f}% |")
    stats = {
        "spearman_step": spearman([r["step_s"] for r in rows], [r["pred_step_s"] for r in rows]),
        "median_abs_step_error": statistics.median(abs(r["step_error"]) for r in rows),
        "max_abs_step_error": max(abs(r["step_error"]) for r in rows),
        "max_abs_memory_error": max(abs(r["rss_error"]) for r in rows),
        "median_abs_memory_error": statistics.median(abs(r["rss_error"]) for r in rows),
    }
    print(f"\nstep time: Spearman rank correlation {stats['spearman_step']:.2f}, median |error| "
          f"{100 * stats['median_abs_step_error']:.0f}% (max {100 * stats['max_abs_step_error']:.0f}%); "
          f"peak memory per rank: max |error| {100 * stats['max_abs_memory_error']:.1f}%")
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", type=Path, default=None,
                   help="a `loom calibrate` profile (default: calibrate now and save it next to --out)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help="names of the layouts to run")
    p.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"overrides of the tiny model (default: {' '.join(MODEL)})")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="fresh jobs per layout; the fastest counts")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/planner_accuracy.json"))
    p.add_argument("--predict-only", type=Path, default=None, metavar="JSON",
                   help="predict the measurements saved in this output of an earlier run again")
    args = p.parse_args()

    t0 = time.perf_counter()
    model = [*MODEL, *args.model]
    if args.predict_only:
        saved = json.loads(args.predict_only.read_text())
        measured, model = saved["results"], saved["model"]
        profile = args.profile or Path(saved["profile"])
    else:
        profile = args.profile
        if profile is None:
            profile = args.out.with_name(args.out.stem + "-calibration.json")
            main_calibrate(profile, nproc=NPROC)
        measured = {}
        for r in range(args.rounds):  # round after round, so that a busy spell hits one round of a layout
            for name in args.layouts:
                row = measure(name, LAYOUTS[name], args.warmup, args.steps, 1, model)
                print(f"round {r + 1}: {name:24s} {row['step_s']:.3f} s  {row['rss_mib']:.0f} MiB  "
                      f"(load {row['load_average']:.1f})", file=sys.stderr, flush=True)
                if name in measured:
                    rounds = measured[name]["rounds"] + row["rounds"]
                    row = row if row["step_s"] < measured[name]["step_s"] else measured[name]
                    row["rounds"] = rounds
                measured[name] = row
        measured = list(measured.values())
    rows = [predict(r, profile, model) for r in measured]
    print(f"\n{NPROC} gloo processes × 1 thread on {platform.machine()} ({torch.get_num_threads()} cores), "
          f"torch {torch.__version__}; model {' '.join(model)}, batch 16 × 128 tokens, fp32\n")
    stats = report(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"host": platform.node(), "torch": torch.__version__, "nproc": NPROC,
                                    "model": model, "common": COMMON, "profile": str(profile),
                                    "calibration": json.loads(Path(profile).read_text()),
                                    "stats": stats, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
