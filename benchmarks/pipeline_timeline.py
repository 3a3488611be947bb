"""A pipeline timeline from a real run: when each micro-batch's forward and backward ran on each rank.

    python benchmarks/pipeline_timeline.py            # writes docs/img/parallel-pipeline-timeline.png

Trains a small GPT (4 blocks) on 2 gloo processes on this machine with ``parallel.pp=2`` under each
schedule, wraps the pipeline stages' ``forward_one_chunk`` / ``backward_one_chunk`` /
``backward_weight_one_chunk`` to record wall-clock start and end times, times the last of a few
training steps and draws one Gantt chart per schedule (rows: ranks; boxes: F, B, or for zero-bubble
I (input gradient) and W (weight gradient), per micro-batch; gaps: the bubble).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "parallel-pipeline-timeline.png"
MODEL = ["model=gpt-tiny", "model.n_layer=4", "model.block_size=32", "model.n_embd=256", "model.n_head=4"]
COMMON = ["parallel.pp=2", "parallel.microbatches=4", "train.batch_size=32", "train.device=cpu",
          "train.progress=none", "train.steps=10"]
# (title, overrides)
SCHEDULES = [
    ("gpipe", ["parallel.schedule=gpipe"]),
    ("1f1b", ["parallel.schedule=1f1b"]),
    ("interleaved, virtual_stages=2", ["parallel.schedule=interleaved", "parallel.virtual_stages=2"]),
    ("zero-bubble (ZB-V)", ["parallel.schedule=zero-bubble", "parallel.virtual_stages=2"]),
]
STEPS = 10  # the first infers shapes and warms up; the fastest of the others is drawn (the least disturbed)


def _data(vocab: int = 512, n: int = 50_000) -> SimpleNamespace:
    tokens = np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16)
    return SimpleNamespace(train=tokens[: n - 5000], val=tokens[n - 5000:], meta={})


def _record(events: list, stage: int, kind, fn):
    """``fn`` (a stage method taking the micro-batch index first), appending (stage, kind, mb, t0, t1)."""

    @functools.wraps(fn)
    def run(chunk, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(chunk, *args, **kwargs)
        k = kind(kwargs) if callable(kind) else kind
        events.append((stage, k, chunk, t0, time.perf_counter()))
        return out

    return run


def _timeline(overrides: list[str]) -> list[list]:
    """On every rank: train a few steps under ``overrides``; return each step's events but the first."""
    from loom.config import load_config
    from loom.parallel.launch import Process
    from loom.parallel.plan import resolve_plan
    from loom.train.trainer import Trainer

    cfg = load_config(None, [*MODEL, *COMMON, *overrides])
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = Trainer(cfg, resolve_plan(cfg, world), None, _data(), process=Process(rank, world, rank),
                      device=torch.device("cpu"))
    schedule = trainer.model.pipeline.schedule
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    events: list = []
    for st in stages:
        st.forward_one_chunk = _record(events, st.stage_index, "F", st.forward_one_chunk)
        st.backward_one_chunk = _record(events, st.stage_index, lambda kw: "B" if kw.get("full_backward", True)
                                        else "I", st.backward_one_chunk)
        st.backward_weight_one_chunk = _record(events, st.stage_index, "W", st.backward_weight_one_chunk)
    steps = []
    for step in range(STEPS):
        events.clear()
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(step)
        steps.append([(s, k, mb, t0 - start, t1 - start) for s, k, mb, t0, t1 in events])
    return steps[1:]


def _all_timelines() -> dict:
    return {title: _timeline(o) for title, o in SCHEDULES}


def measure(world: int = 2) -> list[dict]:
    """Per rank: {schedule title: [(stage, kind, micro-batch, start s, end s), ...]} of the fastest step."""
    from loom.parallel.launch import run_on_ranks

    ranks = run_on_ranks(world, _all_timelines, threads=1)
    fastest = {title: min(range(STEPS - 1), key=lambda i: max(t1 for r in ranks for *_, t1 in r[title][i]))
               for title, _ in SCHEDULES}
    return [{title: r[title][i] for title, i in fastest.items()} for r in ranks]


COLORS = {"F": "#4c72b0", "B": "#dd8452", "I": "#dd8452", "W": "#55a868"}


def plot(ranks: list[dict], out: Path = OUT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    titles = list(ranks[0])
    fig, axes = plt.subplots(len(titles), 1, figsize=(11, 1.35 * len(titles) + 1.2), sharex=True)
    longest = max(t1 for r in ranks for events in r.values() for *_, t1 in events)
    for ax, title in zip(axes, titles):
        end = max(t1 for r in ranks for *_, t1 in r[title])
        for rank, r in enumerate(ranks):
            for stage, kind, mb, t0, t1 in r[title]:
                ms0, ms1 = 1e3 * t0, 1e3 * t1
                hatch = "//" if title.startswith(("interleaved", "zero")) and stage >= len(ranks) else None
                ax.barh(rank, ms1 - ms0, left=ms0, height=0.8, color=COLORS[kind], edgecolor="black",
                        linewidth=0.5, hatch=hatch)
                if ms1 - ms0 > 0.025 * 1e3 * longest:  # too narrow for a label otherwise
                    ax.text((ms0 + ms1) / 2, rank, f"{kind}{mb}", ha="center", va="center", fontsize=7,
                            color="white", fontweight="bold")
        busy = [sum(t1 - t0 for *_, t0, t1 in r[title]) for r in ranks]
        idle = 1 - sum(busy) / (len(ranks) * end)
        ax.set_title(f"{title}: {1e3 * end:.0f} ms, ranks idle {100 * idle:.0f}% of it (bubble, transfers, loss)",
                     fontsize=9, loc="left")
        ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in range(len(ranks))])
        ax.set_ylim(len(ranks) - 0.5, -0.5)
        ax.set_xlim(0, 1e3 * longest * 1.01)
        ax.tick_params(labelsize=8, labelbottom=True)
    axes[-1].set_xlabel("ms since the step started")
    handles = [Patch(color=COLORS["F"], label="F: forward"),
               Patch(color=COLORS["B"], label="B: backward (I: input-gradient part)"),
               Patch(color=COLORS["W"], label="W: weight-gradient part"),
               Patch(facecolor="white", edgecolor="black", hatch="//", label="second stage on the rank")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Pipeline schedules, pp=2, 4 micro-batches: one training step of a 4-block GPT on 2 CPU processes",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main() -> int:
    print(plot(measure()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
