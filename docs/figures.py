"""Draw the pictures of docs/parallelism.md (docs/img/parallel-*.png) and docs/architecture.md.

    python docs/figures.py             # all of them (the pipeline timeline trains on 2 processes, ~30 s)
    python docs/figures.py --static    # all but the pipeline timeline

The first four are diagrams; the pipeline timeline is measured (benchmarks/pipeline_timeline.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Patch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
BLUE, ORANGE, GREEN, GREY, RED = "#4c72b0", "#dd8452", "#55a868", "#c8c8c8", "#c44e52"


def box(ax, x, y, w, h, text="", color="white", fontsize=9, **kw):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                                edgecolor=kw.pop("edgecolor", "black"), linewidth=kw.pop("linewidth", 1), **kw))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, x0, y0, x1, y1, text="", color="black", **kw):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="-|>", color=color, lw=1.2, **kw))
    if text:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, text, ha="center", va="bottom", fontsize=8, color=color)


def canvas(w, h, figsize):
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_xlim(0, w)
    ax.set_ylim(0, h)
    ax.axis("off")
    return fig, ax


def save(fig, name: str) -> Path:
    out = IMG / name
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(out)
    return out


# --------------------------------------------------------------------------------------------


def mesh():
    """8 ranks as pp=2 × dp=2 × tp=2 in the default order [pp, dp, tp]: rank = 4·pp + 2·dp + tp."""
    fig, ax = canvas(12, 6.4, (11, 5.9))
    for pp in range(2):
        x0 = 0.6 + pp * 6
        ax.text(x0 + 2.3, 6.05, f"pipeline stage pp={pp}", ha="center", fontsize=11, fontweight="bold")
        for dp in range(2):
            y0 = 3.3 - dp * 2.9
            box(ax, x0 - 0.25, y0 - 0.35, 4.9, 2.2, color="#eef3fb", edgecolor=BLUE, linewidth=1.5, linestyle="--")
            ax.text(x0 + 2.2, y0 - 0.22, f"one node / fast link (NVLink): the tp group of pp={pp}, dp={dp}",
                    ha="center", va="center", fontsize=8, color=BLUE)
            for tp in range(2):
                rank = 4 * pp + 2 * dp + tp
                box(ax, x0 + tp * 2.6, y0, 1.8, 1.3, f"rank {rank}\npp={pp} dp={dp} tp={tp}", color="white",
                    fontsize=9)
            ax.annotate("", xy=(x0 + 2.6, y0 + 0.65), xytext=(x0 + 1.8, y0 + 0.65),
                        arrowprops=dict(arrowstyle="<|-|>", color=BLUE, lw=1.4))
            ax.text(x0 + 2.2, y0 + 0.75, "tp", ha="center", fontsize=9, color=BLUE)
        for tp in range(2):  # dp: same pp and tp, across nodes
            x = x0 + tp * 2.6 + 0.9
            ax.annotate("", xy=(x, 3.3), xytext=(x, 1.7),
                        arrowprops=dict(arrowstyle="<|-|>", color=GREEN, lw=1.4, linestyle=":"))
        ax.text(x0 + 2.15, 2.5, "dp", ha="center", fontsize=9, color=GREEN)
    for dp in range(2):  # pp: same dp and tp, between stages
        y = 3.3 - dp * 2.9 + 0.65
        arrow(ax, 5.35, y, 6.35, y, color=ORANGE)
        ax.text(5.85, y + 0.12, "pp", ha="center", fontsize=9, color=ORANGE)
    ax.text(6, -0.45, "tp (innermost, neighbouring ranks): all-reduce in every layer      dp: gradients once per "
            "step      pp: activations point to point", ha="center", fontsize=9)
    ax.set_ylim(-0.7, 6.4)
    fig.suptitle("parallel.mesh_order=[pp, dp, tp]: 8 ranks, rank = pp·(dp·tp) + dp·tp + tp", fontsize=11)
    return save(fig, "parallel-mesh.png")


def zero():
    """What each of 4 dp ranks holds while a step computes, fp32 AdamW: 4 + 4 + 8 bytes per parameter."""
    rows = [("zero=0 (DDP)", 1, 1, 1), ("zero=1", 1, 1, 4), ("zero=2", 1, 4, 4), ("zero=3", 4, 4, 4),
            ("zero=3, shard_group=2 (hybrid: sharded within ranks 0-1 and 2-3, replicated across)", 2, 2, 2)]
    parts = [("parameters", 4, BLUE), ("gradients", 4, ORANGE), ("optimizer states", 8, GREEN)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 7.2), sharex=True)
    for ax, (title, *split) in zip(axes, rows):
        for rank in range(4):
            x = 0.0
            for (name, size, color), s in zip(parts, split):
                # every rank's bar is the full size; its own shard is coloured, the rest is what it does not hold
                for k in range(s):
                    own = s == 1 or k == rank % s
                    ax.barh(rank, size / s, left=x, color=color if own else "white", edgecolor=color,
                            linewidth=0.8, height=0.7, alpha=1 if own else 0.6)
                    x += size / s
        held = sum(size / s for (_, size, _), s in zip(parts, split))
        ax.set_yticks(range(4), [f"rank {r}" for r in range(4)], fontsize=8)
        ax.set_ylim(3.6, -0.6)
        ax.set_title(f"{title}: {held:g} bytes per parameter on each rank", fontsize=9, loc="left")
        ax.set_xlim(0, 16)
    axes[-1].set_xlabel("bytes per parameter (fp32 weights 4, gradients 4, Adam moments 8); "
                        "white: held by another rank")
    handles = [Patch(color=c, label=n) for n, _, c in parts]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle("ZeRO over 4 data-parallel ranks: what each rank holds during forward and backward", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save(fig, "parallel-zero.png")


def tensor_parallel():
    """An MLP over tp=2: fc column-parallel, proj row-parallel; then the sequence-parallel variant."""
    fig, axes = plt.subplots(2, 1, figsize=(12, 7.4))
    for ax in axes:
        ax.set_xlim(0, 14)
        ax.set_ylim(0, 4.2)
        ax.axis("off")
    ax = axes[0]
    ax.set_title("tensor parallel (parallel.tp=2): fc split by columns (colwise), proj by rows (rowwise)",
                 fontsize=10, loc="left")
    for r, y in enumerate((2.4, 0.4)):
        ax.text(0.1, y + 0.5, f"rank {r}", fontsize=9, fontweight="bold", va="center")
        box(ax, 0.9, y, 1.9, 1.0, "X (B,T,C)\nwhole", GREY)
        box(ax, 3.4, y, 2.2, 1.0, f"fc: X·A{r}\nA{r}: C × ffn/2", "#c9d7ef")
        box(ax, 6.2, y, 1.4, 1.0, "GELU\n(local)", "white")
        box(ax, 8.2, y, 2.2, 1.0, f"proj: ·B{r}\nB{r}: ffn/2 × C\npartial Y{r}", "#f3d3bd")
        arrow(ax, 2.8, y + 0.5, 3.4, y + 0.5)
        arrow(ax, 5.6, y + 0.5, 6.2, y + 0.5)
        arrow(ax, 7.6, y + 0.5, 8.2, y + 0.5)
        arrow(ax, 10.4, y + 0.5, 11.1, y + 0.5)
        box(ax, 12.3, y, 1.6, 1.0, "Y = Y0 + Y1\nwhole", GREY)
    box(ax, 11.1, 0.4, 0.9, 3.0, "all-\nreduce", "#f6d6d7", edgecolor=RED)
    arrow(ax, 12.0, 2.9, 12.3, 2.9)
    arrow(ax, 12.0, 0.9, 12.3, 0.9)
    ax.text(4.5, 3.75, "A = [A0 | A1]", ha="center", fontsize=9)
    ax.text(9.3, 3.75, "B = [B0 ; B1]", ha="center", fontsize=9)
    ax.text(7.0, 3.75, "no communication in between", ha="center", fontsize=8, style="italic")

    ax = axes[1]
    ax.set_title("with sequence parallel (parallel.sp=true): LayerNorm and dropout on sequence shards",
                 fontsize=10, loc="left")
    for r, y in enumerate((2.4, 0.4)):
        ax.text(0.1, y + 0.5, f"rank {r}", fontsize=9, fontweight="bold", va="center")
        half = "first" if r == 0 else "second"
        box(ax, 0.7, y, 1.9, 1.0, f"X: {half}\nT/2 positions", "#e2ecd9")
        box(ax, 3.0, y, 1.6, 1.0, "LayerNorm\non T/2", "#e2ecd9")
        box(ax, 6.1, y, 2.1, 1.0, f"fc ·A{r}, GELU,\nproj ·B{r}\nwhole sequence", "#c9d7ef")
        box(ax, 10.0, y, 1.6, 1.0, "dropout,\nresidual on T/2", "#e2ecd9")
        arrow(ax, 2.6, y + 0.5, 3.0, y + 0.5)
        arrow(ax, 4.6, y + 0.5, 5.0, y + 0.5)
        arrow(ax, 5.7, y + 0.5, 6.1, y + 0.5)
        arrow(ax, 8.2, y + 0.5, 8.6, y + 0.5)
        arrow(ax, 9.4, y + 0.5, 10.0, y + 0.5)
        arrow(ax, 11.6, y + 0.5, 12.1, y + 0.5)
        box(ax, 12.1, y, 1.8, 1.0, f"Y: {half}\nT/2 positions", "#e2ecd9")
    box(ax, 5.0, 0.4, 0.7, 3.0, "all-\ngather", "#f6d6d7", edgecolor=RED, fontsize=8)
    box(ax, 8.6, 0.4, 0.8, 3.0, "reduce-\nscatter", "#f6d6d7", edgecolor=RED, fontsize=8)
    ax.text(7.0, 3.75, "green: activations split along the sequence (1/tp of the memory)", ha="center", fontsize=8,
            style="italic")
    fig.tight_layout()
    return save(fig, "parallel-tensor.png")


def recompute():
    """Which of a block's forward results stay in memory for backward (sizes for ffn = 4C)."""
    ops = [("block input x", 1, "keep"), ("ln_1", 1, "cheap"), ("q, k, v projections", 3, "matmul"),
           ("attention: softmax(QKᵀ)V, dropout", 1, "cheap"), ("out_proj", 1, "matmul"),
           ("ln_2", 1, "cheap"), ("fc", 4, "matmul"), ("GELU", 4, "cheap"), ("proj", 1, "matmul")]
    modes = [("none", lambda k: True), ("selective", lambda k: k in ("keep", "matmul")),
             ("full", lambda k: k == "keep")]
    fig, ax = plt.subplots(figsize=(10, 4.6))
    for col, (mode, kept) in enumerate(modes):
        for row, (name, size, kind) in enumerate(ops):
            k = kept(kind)
            ax.add_patch(Rectangle((col * 1.1, row), size / 4, 0.8, facecolor=BLUE if k else "white",
                                   edgecolor=BLUE, hatch=None if k else "///", linewidth=1))
        ax.text(col * 1.1 + 0.5, -0.45, f"recompute={mode}", ha="center", fontsize=10, fontweight="bold")
    ax.set_yticks([r + 0.4 for r in range(len(ops))],
                  [f"{n} ({s} B·T·C)" if s > 1 else f"{n} (B·T·C)" for n, s, _ in ops], fontsize=9)
    ax.set_xlim(-0.05, 3.3)
    ax.set_ylim(len(ops), -0.9)
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.legend(handles=[Patch(facecolor=BLUE, label="kept from forward to backward"),
                       Patch(facecolor="white", edgecolor=BLUE, hatch="///", label="recomputed during backward")],
              loc="lower center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9, frameon=False)
    ax.set_title("Results of one Transformer block's forward operations (schematic; width: size, B·T·C = 1)",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, "parallel-recompute.png")


def architecture():
    """The layers of loom (each imports only from those below it) and the flow of one job through them."""
    fig, ax = canvas(12, 8.4, (12, 8.4))
    layers = [
        ("cli", "loom train | plan | describe | generate | eval | export | plot | calibrate", GREY),
        ("planner", "cost model (shape, time, comm, memory), search, auto: a Plan", ORANGE),
        ("infer", "load a run, generate (KV cache), evaluate, export", GREY),
        ("train", "job (processes, run dir, data)  ·  trainer (loop, eval, save/resume)  ·  step", GREEN),
        ("parallel", "plan  ·  mesh  ·  pipeline  ·  tensor  ·  expert  ·  recompute  ·  data  ·  parallelize",
         BLUE),
        ("config", "typed dataclasses, presets, checks", GREY),
        ("tasks", "causal_lm: batches, loss, metrics, data checks", GREEN),
        ("models", "spec · registry · costs · common/ · gpt/ · pangu/   |   data   |   plot", BLUE),
        ("errors, files", "one-line errors, atomic writes", GREY),
    ]
    h = 0.72
    for i, (name, what, color) in enumerate(layers):
        y = 8.0 - (i + 1) * (h + 0.12)
        box(ax, 0.2, y, 1.6, h, name, color=color, fontsize=10, alpha=0.9)
        box(ax, 1.95, y, 6.4, h, what, fontsize=8.5)
    ax.text(0.2, 8.05, "layers (import-linter contract in pyproject.toml): imports only go down",
            fontsize=10, weight="bold")
    flow = [("config", 7.3), ("Plan (resolved once)", 6.3), ("build on meta\n(the family's spec)", 5.2),
            ("parallelize(model, plan,\nmesh, loss_fn)", 4.0), ("init or load\n(by name, any layout)", 2.8),
            ("train: step, eval,\ncheckpoints", 1.6)]
    ax.text(9.0, 8.05, "one job", fontsize=10, weight="bold")
    for j, (text, y) in enumerate(flow):
        box(ax, 8.9, y - 0.35, 2.9, 0.7, text, color="#f3f3f3", fontsize=8.5)
        if j:
            arrow(ax, 10.35, flow[j - 1][1] - 0.36, 10.35, y + 0.36)
    return save(fig, "architecture.png")


def pipeline_timeline():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pipeline_timeline as pt

    out = pt.plot(pt.measure())
    print(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--static", action="store_true", help="skip the measured pipeline timeline")
    args = p.parse_args(argv)
    mesh()
    zero()
    tensor_parallel()
    recompute()
    architecture()
    if not args.static:
        pipeline_timeline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
