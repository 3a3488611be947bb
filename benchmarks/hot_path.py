"""Before and after of the training step's hot-path changes, measured side by side in one process.

    python benchmarks/hot_path.py                 # gpt-mini's shape, 5 interleaved rounds
    python benchmarks/hot_path.py --rounds 9 --out benchmarks/out/hot_path.json

Each row times one piece of the step two ways, alternating them round by round (a shared machine's
slow stretches hit both), and reports the medians, the spread over rounds and the ratio:

``grad norm + clip``  the global gradient norm and clipping of gpt-mini's gradients: a Python loop of
                      one reduction and one multiply per parameter (before) against
                      ``ParallelModel.clip_grads_`` (``torch._foreach_norm`` / ``_foreach_mul_``);
``MoE step``          forward + backward + AdamW of a 32-expert Switch model of gpt-mini's shape: the
                      experts as a loop of two matmuls each (before) against two grouped GEMMs;
``dense step``        the same step of the dense model, for the MoE/dense ratio;
``MoE dispatch``      the same 32-expert step with capacity factor 1.25 (tokens dropped): the layer as it
                      was (two sorts, a boolean selection per vector, gathers whose backward is a
                      sorting ``index_put``, a second ``bincount`` for the statistics) against one
                      sort, one selection and ``index_select`` gathers;
``fp32 loss``         cross-entropy forward + backward of fp32 logits (batch 8 × 256 tokens × 4096):
                      torch's loss of the whole batch (before) against lm_loss's cache-sized pieces
                      whose gradient is made in the forward, in place (after);
``fp32 loss (124m)``  the same at GPT-2 small's shape (4 × 1024 tokens × 50304);
``bf16 loss``         the same of bf16 logits (gpt-mini's shape): the whole fp32 copy (before) against
                      the pieces;
``bf16 products``     forward + backward of gpt-mini's MLP up-projection (8 × 256 tokens, 192 -> 768)
                      under bf16 autocast: torch's own bf16 kernels (before) against loom's autocast,
                      which on a CPU without bf16 instructions computes the products with fp32 kernels
                      (``Fp32Products``; on a CPU with them the two rows run the same kernels).

Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from loom.config import load_config
from loom.models import build_model, spec_of
from loom.models.common import moe as moe_module
from loom.parallel.parallelize import parallelize
from loom.parallel.plan import Plan
from loom.tasks import causal_lm, lm_loss
from loom.train import precision
from loom.train.step import build_optimizers

SEQ, BATCH = 256, 8


def _model(experts: int, capacity_factor: float = 0.0):
    over = ["model=gpt-mini", "model.dropout=0.0", f"model.block_size={SEQ}"]
    if experts:
        over += [f"model.moe.experts={experts}", "model.moe.every=1", "model.moe.router=switch", "model.moe.top_k=1",
                 f"model.moe.capacity_factor={capacity_factor}"]
    cfg = load_config(None, over)
    pm = parallelize(build_model(cfg.model), Plan(), None, spec=spec_of(cfg.model), loss_fn=lm_loss,
                     device=torch.device("cpu"), seed=0)
    return cfg, pm, build_optimizers(pm, cfg.train)[0]


def _data(vocab: int):
    x = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return (x[:, :-1],), x[:, 1:]


def loop_clip(params, max_norm: float) -> torch.Tensor:
    """The loop the fused version replaced (main before this change, one process)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        total += p.grad.detach().float().pow(2).sum().double()
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef)
    return norm


def old_moe_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer's forward before the one-sort dispatch (main before this change)."""
    b, t, c = x.shape
    flat = x.reshape(b * t, c)
    route = self.router(flat, group_size=t)
    n, k = route.experts.shape
    e_count, groups, group_size = self.n_experts, b, t
    expert = route.experts.reshape(-1)
    token = torch.arange(n).repeat_interleave(k)
    choice = torch.arange(k).repeat(n)
    gate = route.gates.reshape(-1)
    if not route.all_active:
        active = route.active.reshape(-1)
        expert, token, choice, gate = expert[active], token[active], choice[active], gate[active]
    group, pos = token // group_size, token % group_size
    key = ((group * e_count + expert) * k + choice) * group_size + pos
    order = key.argsort()
    segment = (group * e_count + expert)[order]
    seg_counts = torch.bincount(segment, minlength=groups * e_count)
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel()) - (seg_counts.cumsum(0) - seg_counts)[segment]
    keep = place < self.capacity(group_size)
    dropped = (~keep).sum()
    expert, token, choice, gate, group, pos = (v[keep] for v in (expert, token, choice, gate, group, pos))
    order = (((expert * groups + group) * k + choice) * group_size + pos).argsort()
    expert, token, gate = expert[order], token[order], gate[order]
    counts = torch.bincount(expert, minlength=e_count)
    w = self.experts
    offs = counts.cumsum(0).to(torch.int32)
    rows = torch.repeat_interleave(torch.arange(e_count), counts, output_size=token.numel())
    h = torch._grouped_mm(flat[token], w.w1, offs=offs) + w.b1[rows]
    y = torch._grouped_mm(F.gelu(h, approximate="tanh"), w.w2, offs=offs) + w.b2[rows]
    out = self.drop(torch.zeros_like(flat).index_add_(0, token, y * gate[:, None]).view(b, t, c))
    with torch.no_grad():  # the statistics, as _record kept them
        routed = route.experts.reshape(-1) if route.all_active else route.experts[route.active]
        f64 = torch.float64
        load = torch.bincount(routed, minlength=e_count).to(f64)
        extra = torch.stack([torch.tensor(float(routed.numel()), dtype=f64), dropped.to(f64),
                             route.aux_loss.detach().to(f64) * groups, route.z_loss.detach().to(f64) * groups,
                             torch.tensor(float(groups), dtype=f64)])
        self.stats.append(torch.cat([load, extra]))
    return moe_module._AuxLossGrad.apply(out, route.aux_loss + route.z_loss, self.aux_grad_scale)


def cases():
    cfg, pm, opt = _model(0)
    inputs, targets = _data(cfg.model.vocab_size)
    pm.forward_backward(inputs, targets, lambda v: v)
    params = list(pm.parameters())

    def dense_step():
        pm.forward_backward(inputs, targets, lambda v: v)
        pm.clip_grads_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)

    mcfg, mpm, mopt = _model(32)

    def moe_step(grouped: bool):
        def run():
            with mock.patch.object(moe_module, "_grouped_mm_runs", lambda *a: grouped):
                mpm.forward_backward(inputs, targets, lambda v: v)
            mpm.clip_grads_(1.0)
            mopt.step()
            mopt.zero_grad(set_to_none=False)
        return run

    dcfg, dpm, dopt = _model(32, capacity_factor=1.25)

    def dispatch_step(old: bool):
        def run():
            patch = mock.patch.object(moe_module.MoE, "forward", old_moe_forward) if old else contextlib.nullcontext()
            with patch:
                dpm.forward_backward(inputs, targets, lambda v: v)
            dpm.clip_grads_(1.0)
            dopt.step()
            dopt.zero_grad(set_to_none=False)
            dpm.take_moe_stats()
        return run

    def loss(shape: tuple[int, int, int], dtype: torch.dtype, piece_bytes: int):
        logits = torch.randn(shape).to(dtype)
        labels = torch.randint(0, shape[-1], shape[:2])

        def run():
            x = logits.detach().requires_grad_()
            with mock.patch.object(causal_lm, "LOSS_CPU_PIECE_BYTES", piece_bytes):
                causal_lm.lm_loss(x, labels).backward()
        return run

    def products(torch_kernels: bool):
        gen = torch.Generator().manual_seed(0)
        d = cfg.model.n_embd
        x = torch.randn(BATCH * SEQ, d, generator=gen, requires_grad=True)
        w = torch.randn(4 * d, d, generator=gen, requires_grad=True)
        native = precision._cpu_runs_natively(torch.bfloat16)

        def run():
            with mock.patch.object(precision, "_cpu_runs_natively", lambda dtype: torch_kernels or native):
                with precision.autocast(torch.device("cpu"), "bf16"):
                    F.linear(x, w).float().sum().backward()
        return run

    mini, small, whole, pieces = (BATCH, SEQ, 4096), (4, 1024, 50304), 2**40, causal_lm.LOSS_CPU_PIECE_BYTES
    return {
        "grad norm + clip": (lambda: loop_clip(params, 1.0), lambda: pm.clip_grads_(1.0)),
        "MoE step (32 experts)": (moe_step(False), moe_step(True)),
        "dense step": (dense_step, dense_step),
        "MoE dispatch (32 experts, capacity 1.25)": (dispatch_step(True), dispatch_step(False)),
        "fp32 loss": (loss(mini, torch.float32, whole), loss(mini, torch.float32, pieces)),
        "fp32 loss (124m)": (loss(small, torch.float32, whole), loss(small, torch.float32, pieces)),
        "bf16 loss": (loss(mini, torch.bfloat16, whole), loss(mini, torch.bfloat16, pieces)),
        "bf16 products": (products(True), products(False)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3, help="calls per timing (their median)")
    p.add_argument("--cases", default=None, help="comma-separated names' first words (default: all)")
    p.add_argument("--out", default="benchmarks/out/hot_path.json")
    args = p.parse_args()
    rows = []
    for name, (before, after) in cases().items():
        if args.cases and name.split()[0] not in args.cases.split(","):
            continue
        before(), after()  # warm-up
        times = {"before": [], "after": []}
        for _ in range(args.rounds):
            for label, fn in (("before", before), ("after", after)):
                t = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    fn()
                    t.append(time.perf_counter() - t0)
                times[label].append(statistics.median(t))
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        rows.append({"case": name, "before_s": b, "after_s": a, "speedup": b / a, "rounds": times})
        print(f"{name:24} before {b * 1e3:9.2f} ms ({min(times['before']) * 1e3:.2f}–{max(times['before']) * 1e3:.2f})"
              f"   after {a * 1e3:9.2f} ms ({min(times['after']) * 1e3:.2f}–{max(times['after']) * 1e3:.2f})"
              f"   ×{b / a:.2f}", flush=True)
    moe = next((r for r in rows if r["case"].startswith("MoE")), None)
    dense = next((r for r in rows if r["case"] == "dense step"), None)
    if moe and dense:
        print(f"MoE (32 experts) tokens/s vs dense: before {dense['after_s'] / moe['before_s']:.2f}, "
              f"after {dense['after_s'] / moe['after_s']:.2f}")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "seq": SEQ, "batch": BATCH, "rounds": args.rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
