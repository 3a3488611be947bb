"""Where the time of an MoE training step goes, against the dense model's: torch.profiler per step.

    OMP_NUM_THREADS=1 python benchmarks/moe_profile.py --threads 1 --rounds 3

Builds the dense model and the 32-expert Switch models (capacity factor 1.25 and none) of
``benchmarks/moe_scaling.py`` at its shape in one process, profiles one training step of each in
turn for ``--rounds`` rounds, and prints each one's self CPU time per step (ms) by kind of aten
operator. Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_scaling import Config  # noqa: E402

KINDS = [  # (label, substrings of aten operator names), first match wins
    ("matrix multiplies", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention", ("flash_attention",)),
    ("loss (log-softmax, NLL)", ("log_softmax", "nll_loss")),
    ("GELU", ("gelu",)),
    ("AdamW", ("_fused_adamw_",)),
    ("gradient norm + clipping", ("linalg_vector_norm", "aten::mul_")),
    ("dispatch and combine", ("index", "sort", "bincount", "scatter", "repeat_interleave", "nonzero", "cumsum",
                              "arange")),
    ("router", ("topk", "softmax", "logsumexp", "one_hot")),
    ("zeros / fill / copies", ("fill_", "zero_", "copy_")),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-mini")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/out/moe_profile.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {"dense": Config(args.preset, args.seq, args.batch_size, 0, 1.25),
               f"{args.experts} experts, capacity 1.25": Config(args.preset, args.seq, args.batch_size, args.experts,
                                                               1.25),
               f"{args.experts} experts, no limit": Config(args.preset, args.seq, args.batch_size, args.experts, 0.0)}
    for c in configs.values():
        c.step(record=False)
    self_us = {k: collections.Counter() for k in configs}
    wall = collections.Counter()
    for _ in range(args.rounds):
        for name, c in configs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                wall[name] += c.step(record=False)
            for e in prof.key_averages():
                kind = next((label for label, subs in KINDS if any(s in e.key for s in subs)), "other")
                self_us[name][kind] += e.self_cpu_time_total
    labels = [label for label, _ in KINDS] + ["other"]
    table = {name: {label: self_us[name][label] / 1e3 / args.rounds for label in labels} for name in configs}
    print(f"ms per step, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"{'':28s}" + "".join(f"{name:>30s}" for name in configs))
    for label in labels:
        print(f"{label:28s}" + "".join(f"{table[name][label]:30.0f}" for name in configs))
    print(f"{'total (self times)':28s}" + "".join(f"{sum(table[n].values()):30.0f}" for n in configs))
    print(f"{'wall (profiled)':28s}" + "".join(f"{wall[n] * 1e3 / args.rounds:30.0f}" for n in configs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rounds": args.rounds,
                                          "load_average": os.getloadavg(), "ms_per_step": table,
                                          "wall_ms": {n: wall[n] * 1e3 / args.rounds for n in configs}}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
