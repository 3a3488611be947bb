"""Pictures of a run: the training and validation loss against the step, and for a Mixture-of-Experts
model how the router spreads tokens over the experts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loom.errors import RunError  # noqa: E402
from loom.files import read_json  # noqa: E402
from loom.files import read_jsonl as read_metrics  # noqa: E402

MAX_HEATMAPS = 8  # MoE layers drawn as heatmaps; a deeper model shows evenly spaced ones


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Draw every picture of a run from ``metrics.jsonl``: ``loss.png`` (or ``out``) and, when the
    model has MoE layers, ``expert_load.png`` beside it (see :func:`expert_load_path`). Returns the
    files written, the loss curve first."""
    loss = plot_loss(run_dir, out)
    load = plot_expert_load(run_dir, expert_load_path(run_dir, out))
    return [loss] if load is None else [loss, load]


def expert_load_path(run_dir: Path, loss_out: Path | None = None) -> Path:
    """Where the expert-load picture goes: ``RUN_DIR/expert_load.png``, or beside a loss curve drawn
    to ``loss_out`` as ``<its stem>_expert_load.png``."""
    if loss_out is None:
        return Path(run_dir) / "expert_load.png"
    loss_out = Path(loss_out)
    return loss_out.with_name(f"{loss_out.stem}_expert_load.png")


def _records(run_dir: Path) -> list[dict]:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise RunError(f"{str(run_dir)!r} has no metrics.jsonl yet: nothing to plot")
    return read_metrics(run_dir / "metrics.jsonl")


def plot_loss(run_dir: Path, out: Path | None = None) -> Path:
    """Draw ``RUN_DIR/loss.png`` (or ``out``) from ``metrics.jsonl``; returns the file written."""
    run_dir = Path(run_dir)
    records = _records(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        raise RunError(f"{run_dir / 'metrics.jsonl'} holds no finite loss yet: nothing to plot")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5, markersize=4)
    entropy = read_json(run_dir / "data.json").get("unigram_entropy_nats")
    if entropy:
        ax.axhline(entropy, color="gray", linestyle="--", linewidth=1, label=f"unigram entropy ({entropy:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def moe_history(records: list[dict]) -> tuple[list[int], dict[str, list[dict]]]:
    """The logged steps that carry MoE statistics, in order (a step logged twice, as after a resume,
    keeps its last record), and per MoE layer, in model order, its record at each of those steps."""
    by_step: dict[int, dict[str, dict]] = {}
    layers: dict[str, None] = {}  # an ordered set
    for r in records:
        if r.get("moe") and r.get("step") is not None:
            by_step[r["step"]] = {m["layer"]: m for m in r["moe"]}
            layers.update(dict.fromkeys(by_step[r["step"]]))
    steps = sorted(by_step)
    return steps, {name: [by_step[s].get(name) for s in steps] for name in layers}


def _pick_layers(names: list[str], limit: int = MAX_HEATMAPS) -> list[str]:
    """All of ``names`` if there are at most ``limit``, else ``limit`` evenly spaced ones, first and last included."""
    if len(names) <= limit:
        return names
    return [names[i] for i in sorted({round(x) for x in np.linspace(0, len(names) - 1, limit)})]


def _edges(steps: list[int]) -> np.ndarray:
    """Cell edges around each logged step: halfway to its neighbours (the log interval may change on resume)."""
    x = np.asarray(steps, dtype=float)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _step_ticks(ax, steps: list[int]) -> None:
    if len(steps) <= 8:
        ax.set_xticks(steps)  # a short run: a tick at every logged step
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def plot_expert_load(run_dir: Path, out: Path | None = None) -> Path | None:
    """Draw ``RUN_DIR/expert_load.png`` (or ``out``) for a Mixture-of-Experts run: per MoE layer (up to
    :data:`MAX_HEATMAPS` of them) a heatmap of each expert's share of the routed assignments over the
    logged steps, then load max/mean (1 = balanced) and the fraction of assignments dropped for
    capacity, per layer. Returns the file written, or None when the metrics hold no MoE statistics
    (a dense model)."""
    run_dir = Path(run_dir)
    steps, history = moe_history(_records(run_dir))
    if not steps:
        return None
    names = list(history)
    shown = _pick_layers(names)
    n_experts = max(len(m["load"]) for rows in history.values() for m in rows if m is not None)
    loads = {}
    for name in shown:  # experts × steps; a step that lacks the layer stays blank
        grid = np.full((n_experts, len(steps)), np.nan)
        for j, m in enumerate(history[name]):
            if m is not None:
                grid[: len(m["load"]), j] = m["load"]
        loads[name] = grid
    vmax = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for g in loads.values()) or 1.0

    cols = min(len(shown), 4)
    rows = -(-len(shown) // cols)
    fig = plt.figure(figsize=(max(3.2 * cols, 8) + 1, 2.8 * rows + 3.2), dpi=120)
    outer = fig.add_gridspec(2, 1, height_ratios=[2.8 * rows, 2.6], hspace=0.35)
    top = outer[0].subgridspec(rows, cols + 1, width_ratios=[1] * cols + [0.05], wspace=0.25, hspace=0.45)
    xe, ye = _edges(steps), np.arange(n_experts + 1) - 0.5
    mesh = None
    for i, name in enumerate(shown):
        ax = fig.add_subplot(top[i // cols, i % cols])
        mesh = ax.pcolormesh(xe, ye, np.ma.masked_invalid(loads[name]), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(n_experts - 0.5, -0.5)  # expert 0 on top
        _step_ticks(ax, steps)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("expert", fontsize=8)
        if i + cols >= len(shown):  # nothing below it
            ax.set_xlabel("step", fontsize=8)
    cbar = fig.colorbar(mesh, cax=fig.add_subplot(top[:, cols]))
    cbar.set_label(f"share of routed assignments\n(balanced: 1/{n_experts} = {1 / n_experts:.3g})", fontsize=8)
    cbar.ax.tick_params(labelsize=7)

    bottom = outer[1].subgridspec(1, 2, wspace=0.25)
    ax_load, ax_drop = fig.add_subplot(bottom[0]), fig.add_subplot(bottom[1])
    colors = plt.get_cmap("tab10")
    marker = "." if len(steps) <= 30 else None  # a few logged steps still show as points
    for i, name in enumerate(shown):
        pts = [(s, m) for s, m in zip(steps, history[name]) if m is not None]
        x = [s for s, _ in pts]
        ax_load.plot(x, [m["load_max_mean"] for _, m in pts], color=colors(i % 10), linewidth=1.1, marker=marker,
                     label=name)
        ax_drop.plot(x, [100 * m["dropped"] for _, m in pts], color=colors(i % 10), linewidth=1.1, marker=marker,
                     label=name)
    if len(shown) < len(names):  # the layers not drawn still count in the worst case
        for ax, key, scale in [(ax_load, "load_max_mean", 1), (ax_drop, "dropped", 100)]:
            worst = [max((scale * layer[j][key] for layer in history.values() if layer[j] is not None),
                         default=np.nan) for j in range(len(steps))]
            ax.plot(steps, worst, "k--", linewidth=1, marker=marker, label=f"max over all {len(names)} layers")
    ax_load.axhline(1, color="gray", linestyle=":", linewidth=1)
    ax_load.set_ylabel("load max/mean (1 = balanced)", fontsize=8)
    ax_drop.set_ylabel("assignments dropped (%)", fontsize=8)
    ax_drop.set_ylim(bottom=0)
    for ax in (ax_load, ax_drop):
        _step_ticks(ax, steps)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    ax_load.legend(fontsize=7, ncol=2 if len(shown) > 4 else 1)
    fig.suptitle(f"{run_dir.name}: expert load, {len(names)} MoE layer{'s' * (len(names) > 1)} × {n_experts} experts"
                 + (f" ({len(shown)} shown)" if len(shown) < len(names) else ""), fontsize=10)
    out = Path(out) if out is not None else run_dir / "expert_load.png"
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
