"""AdamW's step over the parameters of gpt-mini's shape with 32 Switch experts per block (39M): torch's
foreach implementation against its fused kernel, alternating, in one process; and foreach gradient
clipping for scale. Prints a table and writes JSON.

    python benchmarks/adamw.py --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per kind and round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/out/adamw.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # 4 blocks × (w1, w2) of 32 experts (192 × 768), plus small vectors: 37.7M parameters
    params = [torch.nn.Parameter(torch.randn(32, 192, 768)) for _ in range(8)]
    params += [torch.nn.Parameter(torch.randn(192)) for _ in range(20)]
    for q in params:
        q.grad = torch.randn_like(q)
    def groups():  # fresh dicts for each optimizer: torch writes its settings into them
        return [{"params": params[:8], "weight_decay": 0.1}, {"params": params[8:], "weight_decay": 0.0}]

    opts = {kind: torch.optim.AdamW(groups(), lr=1e-3, **{kind: True}) for kind in ("foreach", "fused")}
    times: dict[str, list[float]] = {"foreach": [], "fused": [], "clip": []}
    for opt in opts.values():
        opt.step()  # the state exists from here on
    for _ in range(args.rounds):
        for kind, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[kind].append((time.perf_counter() - t0) / args.steps)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        times["clip"].append((time.perf_counter() - t0) / args.steps)
    n = sum(q.numel() for q in params)
    print(f"{n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    for kind, ts in times.items():
        print(f"{kind:8s} {1e3 * statistics.median(ts):8.1f} ms  ({1e3 * min(ts):.1f}–{1e3 * max(ts):.1f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"params": n, "threads": torch.get_num_threads(), "seconds": times}, indent=1))


if __name__ == "__main__":
    main()
