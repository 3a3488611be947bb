"""A picture of one plan (``loom plan --png``): the memory of each pipeline rank against the device's,
and the pipeline schedule's timeline as the cost model's times predict it.

The timeline comes from a small event simulation (:func:`simulate_schedule`), not from a drawing by hand:
each pipeline rank runs its list of operations in the schedule's order, a forward of micro-batch i on
stage k waits for the forward of i on stage k-1, a backward waits for its own forward and for the
backward of i on stage k+1; the bubbles are whatever idle time those dependencies leave. Transfers
between stages take no time in it (the cost model's ``pp_p2p`` term is not drawn).

Schedules (the order each rank runs its operations in):

gpipe        all forwards, then all backwards.
1f1b         ``pp - rank - 1`` forwards to warm up, then one forward and one backward in turn, then the
             remaining backwards (PipeDream-Flush).
interleaved  interleaved 1F1B (Megatron-LM's order, as torch's ScheduleInterleaved1F1B runs it):
             ``virtual_stages`` chunks per rank in a loop (chunk c of rank r is stage c·pp + r), each
             taking 1/v of the rank's time; the micro-batches go in rounds of g (``pp`` when their number
             is a multiple of it), each round through chunk 0, then chunk 1, ...; ``2·(pp - rank - 1) +
             (v - 1)·g`` forwards warm up.
zero-bubble  drawn as ZB-H1 (Qi et al. 2024): the 1F1B order with each backward split into B (input
             gradient, half of it) and W (weight gradient, the other half). W waits until the rank has
             nothing else ready, so it fills the gaps, or until rank r holds more than r of them (so no
             rank keeps more than pp micro-batches' activations, as under 1F1B). One chunk per rank:
             loom runs ZB-V (two stages per rank in a V), which this does not draw.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import NamedTuple

from loom.planner.cost import MEMORY_HEADROOM, Estimate
from loom.planner.hardware import Cluster
from loom.planner.search import SCHEDULES

KINDS = ("weights", "grads", "optimizer", "activations")
BLUE, ORANGE, GREEN, RED, PURPLE = "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"
MEMORY_COLORS = {"weights": BLUE, "grads": ORANGE, "optimizer": GREEN, "activations": PURPLE}
OP_COLORS = {"F": BLUE, "B": ORANGE, "W": GREEN}  # as benchmarks/pipeline_timeline.py draws them


def _shade(color: str, chunk: int, chunks: int) -> str:
    """``color`` for chunk 0, mixed with more white for later chunks (up to 60% for the last)."""
    f = 0.6 * chunk / (chunks - 1) if chunks > 1 else 0.0
    rgb = [int(color[k:k + 2], 16) for k in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * f):02x}" for c in rgb)


class Op(NamedTuple):
    """One operation of the schedule: pipeline ``rank`` runs ``kind`` ('F' forward, 'B' backward (its
    input-gradient half under zero-bubble), 'W' weight gradient (zero-bubble only)) of ``microbatch``
    for its ``chunk``-th stage (0 but for interleaved) from ``start`` to ``end``."""

    rank: int
    kind: str
    microbatch: int
    chunk: int
    start: float
    end: float


# --------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------


def _round_size(pp: int, m: int) -> int:
    """Micro-batches per round of the interleaved schedule (torch's ScheduleInterleaved1F1B: ``m // pp``
    rounds, so ``pp`` when ``m`` is a multiple of it); raises ValueError where the rounds are uneven."""
    rounds = max(1, m // pp)
    if m % rounds:
        raise ValueError(f"the interleaved schedule runs the micro-batches in {rounds} rounds of equal size, "
                         f"which {m} micro-batches on pp={pp} cannot make; use a multiple of {pp}")
    return m // rounds


def _order(pp: int, m: int, schedule: str, v: int, rank: int) -> list[tuple[str, int, int]]:
    """The (kind, micro-batch, chunk) operations ``rank`` runs, in order (no W: those are deferred)."""
    if schedule == "gpipe":
        return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    if schedule == "interleaved" and v > 1:
        g = _round_size(pp, m)
        groups = [range(k, k + g) for k in range(0, m, g)]
        fwd = [(i, c) for grp in groups for c in range(v) for i in grp]
        bwd = [(i, v - 1 - c) for grp in groups for c in range(v) for i in grp]
        warm = min(len(fwd), 2 * (pp - rank - 1) + (v - 1) * g)
    else:  # 1f1b, and zero-bubble's F/B order
        fwd = [(i, 0) for i in range(m)]
        bwd = list(fwd)
        warm = min(m, pp - rank - 1)
    order = [("F", i, c) for i, c in fwd[:warm]]
    for k in range(len(fwd) - warm):
        order += [("F", *fwd[warm + k]), ("B", *bwd[k])]
    return order + [("B", i, c) for i, c in bwd[len(fwd) - warm:]]


def simulate_schedule(pp: int, microbatches: int, schedule: str = "1f1b", virtual_stages: int = 1,
                      t_fwd: float = 1.0, t_bwd: float = 2.0) -> list[Op]:
    """The operations of one step of ``schedule`` on ``pp`` ranks with ``microbatches`` micro-batches, as
    :class:`Op` (rank, kind, microbatch, chunk, start, end) sorted by start time. ``t_fwd`` and
    ``t_bwd``: one micro-batch's forward and backward time on one rank (all its chunks together: a chunk
    of an interleaved schedule takes 1/``virtual_stages`` of them; zero-bubble's B and W half of
    ``t_bwd`` each). ``virtual_stages`` counts only for ``interleaved``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if pp < 1 or microbatches < 1 or virtual_stages < 1 or t_fwd <= 0 or t_bwd <= 0:
        raise ValueError(f"need pp, microbatches, virtual_stages >= 1 and positive times, got pp={pp}, "
                         f"microbatches={microbatches}, virtual_stages={virtual_stages}, t_fwd={t_fwd}, "
                         f"t_bwd={t_bwd}")
    v = virtual_stages if schedule == "interleaved" and pp > 1 else 1
    split = schedule == "zero-bubble"
    last = pp * v - 1  # stages are numbered c·pp + r: chunk c of rank r (a loop)
    duration = {"F": t_fwd / v, "B": (t_bwd / 2 if split else t_bwd / v), "W": t_bwd / 2}
    orders = [_order(pp, microbatches, schedule, v, r) for r in range(pp)]
    end: dict[tuple[str, int, int], float] = {}  # (kind, micro-batch, stage) -> end time

    def deps(kind: str, i: int, stage: int) -> list[tuple[str, int, int]]:
        if kind == "F":
            return [("F", i, stage - 1)] if stage > 0 else []
        if kind == "W":
            return [("B", i, stage)]
        return [("F", i, stage)] + ([("B", i, stage + 1)] if stage < last else [])

    clock = [0.0] * pp  # when each rank is free
    nxt = [0] * pp  # its next operation in ``orders``
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(pp)]
    version = [0] * pp  # of each rank's entry in ``queue``; older entries are stale
    queue: list[tuple[float, int, str, int]] = []  # (time, rank, 'next' | 'W', version): next actions
    inf = float("inf")

    def plan(r: int) -> None:
        """Queue rank r's next action: its next operation once it is ready, or a deferred W now when that
        operation is not ready yet (or rank r holds more than r of them: ZB-H1's bound, so no rank keeps
        more than pp micro-batches' activations). A rank waiting on an operation not yet placed queues
        nothing; placing that operation (on a neighbouring rank) plans it again."""
        version[r] += 1
        ready = inf
        if nxt[r] < len(orders[r]):
            kind, i, c = orders[r][nxt[r]]
            ds = deps(kind, i, c * pp + r)
            if all(d in end for d in ds):
                ready = max((end[d] for d in ds), default=0.0)
        if len(pending_w[r]) > r or (pending_w[r] and ready > clock[r]):
            heapq.heappush(queue, (clock[r], r, "W", version[r]))
        elif ready < inf:
            heapq.heappush(queue, (max(ready, clock[r]), r, "next", version[r]))

    # an event simulation: the earliest action runs first, so no later-placed operation could have been
    # ready before it (a W never takes a slot its rank's next forward or backward was ready for)
    ops: list[Op] = []
    for r in range(pp):
        plan(r)
    while queue:
        t, r, what, ver = heapq.heappop(queue)
        if ver != version[r]:
            continue
        if what == "W":
            kind, (i, c) = "W", pending_w[r].pop(0)
        else:
            kind, i, c = orders[r][nxt[r]]
            nxt[r] += 1
        t1 = t + duration[kind]
        end[(kind, i, c * pp + r)] = t1
        clock[r] = t1
        ops.append(Op(r, kind, i, c, t, t1))
        if split and kind == "B":
            pending_w[r].append((i, c))
        for q in {r, (r - 1) % pp, (r + 1) % pp}:  # the ranks whose next operation may depend on this one
            plan(q)
    if any(nxt[r] < len(orders[r]) for r in range(pp)):  # cannot happen for the orders above
        raise RuntimeError(f"schedule {schedule!r} deadlocks with pp={pp}, microbatches={microbatches}, v={v}")
    return sorted(ops, key=lambda o: (o.start, o.rank))


def makespan(ops: list[Op]) -> float:
    return max(o.end for o in ops) - min(o.start for o in ops)


def bubble_fraction(ops: list[Op]) -> float:
    """The share of ranks × step time that is idle."""
    ranks = len({o.rank for o in ops})
    return 1 - sum(o.end - o.start for o in ops) / (ranks * makespan(ops))


def drawn_microbatches(pp: int, microbatches: int, schedule: str) -> int:
    """How many micro-batches the timeline draws: all of them, or ``2·pp + 8`` when there are more (for
    interleaved a multiple of ``pp``, as its rounds need; also when ``microbatches`` makes uneven rounds)."""
    n = min(microbatches, 2 * pp + 8)
    if schedule == "interleaved" and pp > 1 and n > pp:
        if n == microbatches and n % max(1, n // pp) == 0:
            return n
        n = min(-(-n // pp) * pp, microbatches // pp * pp)
    return n


# --------------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------------


def plot_plan(estimate: Estimate, cluster: Cluster, out: Path, title: str = "") -> Path:
    """Draw ``estimate`` into one PNG at ``out``: left, each pipeline rank's memory per device by kind
    (GiB) against the device's memory and the share a plan may fill (``MEMORY_HEADROOM``); right, the
    pipeline schedule's timeline at the predicted forward and backward times. Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = estimate.plan
    pp = L.pp
    fig_h = max(4.8, min(12.0, 2.2 + 0.3 * pp))
    fig, (ax_mem, ax_t) = plt.subplots(1, 2, figsize=(16, fig_h), gridspec_kw={"width_ratios": [1, 2.6]})
    _memory_panel(ax_mem, estimate, cluster)
    texts = _timeline_panel(ax_t, estimate)
    acc = cluster.accelerator
    summary = (f"step {estimate.step_time_s:.3g} s, {estimate.tflops_per_device:.0f} TFLOP/s per device, "
               f"MFU {100 * estimate.mfu:.1f}%, {estimate.memory_gb_per_device:.1f} GiB on the fullest device "
               f"({'fits' if estimate.fits else 'does NOT fit'} {acc.name})")
    head = title or f"{L.describe()} on {cluster.devices} × {acc.name}"
    fig.suptitle(f"{head}\n{summary}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _label_boxes(fig, ax_t, texts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _memory_panel(ax, est: Estimate, cluster: Cluster) -> None:
    from matplotlib.transforms import offset_copy

    stages = est.memory_per_stage_gb or [est.memory_gb]
    x = list(range(len(stages)))
    bottom = [0.0] * len(stages)
    for kind in KINDS:
        heights = [s.get(kind, 0.0) for s in stages]
        ax.bar(x, heights, bottom=bottom, width=0.8, color=MEMORY_COLORS[kind], label=kind, linewidth=0)
        bottom = [b + h for b, h in zip(bottom, heights)]
    device = cluster.accelerator.memory_bytes / 2**30
    ax.axhline(device, color=RED, linewidth=1.5, label=f"device memory ({device:.0f} GiB)")
    ax.axhline(device * MEMORY_HEADROOM, color=RED, linestyle="--", linewidth=1.2,
               label=f"usable ({100 * MEMORY_HEADROOM:.0f}%: {device * MEMORY_HEADROOM:.1f} GiB)")
    fullest = max(range(len(stages)), key=lambda s: bottom[s])
    ax.annotate(f"{bottom[fullest]:.1f}", (fullest, bottom[fullest]), ha="center", va="bottom", fontsize=7,
                xytext=(0, 2), textcoords="offset points")
    step = max(1, -(-len(stages) // 16))
    ax.set_xticks(x[::step])
    ax.set_xlim(-0.6, len(stages) - 0.4)
    ax.set_ylim(0, max(device, max(bottom)) * 1.1)
    v = est.plan.virtual_stages if est.plan.schedule in ("interleaved", "zero-bubble") else 1
    ax.set_xlabel("the one stage (no pipeline)" if len(stages) == 1 else
                  f"pipeline rank (each holds {v} stages)" if v > 1 else "pipeline rank (= stage)")
    ax.set_ylabel("GiB per device")
    ax.set_title("memory per device, by pipeline rank", fontsize=9, loc="left")
    ax.grid(axis="y", alpha=0.3)
    below = offset_copy(ax.transAxes, fig=ax.figure, y=-30, units="points")  # under the x label
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=3, frameon=False)


def _timeline_panel(ax, est: Estimate) -> list[tuple[float, float, int, str, str]]:
    """Draw the timeline; returns the boxes' (x0, x1, rank, label, text colour) for :func:`_label_boxes`."""
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy

    L = est.plan
    pp, m = L.pp, max(1, est.microbatches)
    schedule = L.schedule if pp > 1 else "1f1b"
    v = L.virtual_stages if schedule == "interleaved" else 1
    t_mb = sum(est.time_s.get(k, 0.0) for k in ("compute", "recompute", "tp", "ep")) / m
    if t_mb <= 0:
        t_mb = est.step_time_s / m if est.step_time_s > 0 else 1.0
    scale, unit = (1e3, "ms") if t_mb < 1 else (1.0, "s")
    t_f, t_b = t_mb / 3, 2 * t_mb / 3
    n = drawn_microbatches(pp, m, schedule)
    ops = simulate_schedule(pp, n, schedule, v, t_f, t_b)

    boxes: dict[tuple[int, str, int], list[tuple[float, float]]] = {}
    texts = []
    for o in ops:
        boxes.setdefault((o.rank, o.kind, o.chunk), []).append((o.start * scale, (o.end - o.start) * scale))
        texts.append((o.start * scale, o.end * scale, o.rank, str(o.microbatch),
                      "white" if o.chunk <= (v - 1) / 2 else "black"))
    span = makespan(ops) * scale
    narrow = t_f / v * scale / span * 700 < 5  # a forward box under ~5 points wide: white hairlines between
    for (rank, kind, chunk), spans in boxes.items():
        ax.broken_barh(spans, (rank - 0.4, 0.8), facecolors=_shade(OP_COLORS[kind], chunk, v),
                       edgecolor="white" if narrow else "black", linewidth=0.2 if narrow else 0.4)
    ax.set_xlim(0, span * 1.01)
    ax.set_ylim(pp - 0.5, -0.5)
    step = max(1, -(-pp // 16))
    ax.set_yticks(range(0, pp, step), [f"rank {r}" for r in range(0, pp, step)], fontsize=8)
    ax.set_xlabel(f"predicted time ({unit}); per micro-batch and stage: forward {t_f * scale:.3g} {unit}, "
                  f"backward {t_b * scale:.3g} {unit}")

    names = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": f"interleaved 1F1B, {v} chunks per rank",
             "zero-bubble": "zero-bubble drawn as ZB-H1 (loom runs ZB-V)"}
    if pp == 1:
        what = f"no pipeline: {m} micro-batch{'es' if m > 1 else ''} one after another"
        drawn = "" if n == m else f"; the first {n} drawn"
    else:
        what = f"pp={pp}, {names[schedule]}"
        drawn = f"; all {m} micro-batches" if n == m else f"; drawn with {n} of its {m} micro-batches (a shorter " \
            "steady state)"
    bubble = f"ranks idle {100 * bubble_fraction(ops):.1f}% of the time drawn"
    if pp > 1:
        full = est.time_s.get("pp_bubble", 0.0) / (est.time_s.get("pp_bubble", 0.0) + t_mb * m)
        bubble += f"; the cost model's bubble for the whole step: {100 * full:.1f}%"
    bubble += " (transfers between stages not drawn)" if pp > 1 else ""
    ax.set_title(f"{what}{drawn}\n{bubble}", fontsize=9, loc="left")

    if v > 1:  # a shade per chunk
        handles = [Patch(color=_shade(OP_COLORS[k], c, v), label=f"{k}: {name}, chunk {c} (stage {c}·pp + rank)")
                   for k, name in (("F", "forward"), ("B", "backward")) for c in range(v)]
    elif schedule == "zero-bubble":
        handles = [Patch(color=OP_COLORS["F"], label="F: forward"),
                   Patch(color=OP_COLORS["B"], label="B: backward, input gradient"),
                   Patch(color=OP_COLORS["W"], label="W: backward, weight gradient")]
    else:
        handles = [Patch(color=OP_COLORS["F"], label="F: forward"), Patch(color=OP_COLORS["B"], label="B: backward")]
    below = offset_copy(ax.transAxes, fig=ax.figure, y=-30, units="points")  # under the x label
    ax.legend(handles=handles, fontsize=7, loc="upper right", bbox_to_anchor=(1, 0), bbox_transform=below,
              ncol=v if v > 1 else len(handles), frameon=False)
    return texts


def _label_boxes(fig, ax, texts: list[tuple[float, float, int, str, str]]) -> None:
    """Write the micro-batch number inside the boxes wide and tall enough for it (after the layout is
    fixed, so the sizes in points are known)."""
    box = ax.get_position()
    width_pt = box.width * fig.get_figwidth() * 72
    height_pt = box.height * fig.get_figheight() * 72
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    row_pt = 0.8 * height_pt / abs(y0 - y1)
    size = min(7.0, 0.6 * row_pt)
    if size < 6:
        return
    for a, b, rank, label, color in texts:
        fits = min(size, ((b - a) / (x1 - x0) * width_pt - 4) / (0.62 * len(label)))  # a digit: ~0.6 em
        if fits >= 6:
            ax.text((a + b) / 2, rank, label, ha="center", va="center", fontsize=fits, color=color,
                    fontweight="bold", clip_on=True)
