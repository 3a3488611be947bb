"""Pictures of a run: the training and validation loss against the step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from loom.runs import RunError, read_json  # noqa: E402
from loom.train.metrics import read_metrics  # noqa: E402


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw ``RUN_DIR/loss.png`` (or ``out``) from ``metrics.jsonl``; returns the file written."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise RunError(f"{str(run_dir)!r} has no metrics.jsonl yet: nothing to plot")
    records = read_metrics(run_dir / "metrics.jsonl")
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
