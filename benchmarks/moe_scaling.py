"""Sparse MoE scaling on one device: cost per token against total and active parameters.

    python benchmarks/moe_scaling.py                      # gpt-mini shape, dense and Switch E = 2..32, fp32
    python benchmarks/moe_scaling.py --capacity-factor 0  # the same with no capacity limit: no token dropped
    python benchmarks/moe_scaling.py --quick              # gpt-tiny shape, a smoke test of a few seconds
    python benchmarks/moe_scaling.py --experts 0 32 --interleave --rounds 5 --steps 1   # one process, alternating

The dense model (``model.moe.experts=0``) is compared with Switch (top-1) models that put an MoE in
every block (``model.moe.every=1``) whose experts are as wide as the dense MLP, so a token meets the
same matmul weights in both (plus the router's d·E): total parameters grow with E, active ones do not.

Each step is forward + backward + AdamW on random tokens (the data pipeline is not measured), timed
as the median over ``--steps`` after ``--warmup``; forward+backward and the optimizer (clip + AdamW
step + zero_grad) are timed separately too, since AdamW touches every parameter, active or not.
Every configuration runs in a fresh subprocess, whose peak resident memory (``ru_maxrss``) is reported
with its growth over the process's RSS after imports; "state" is parameters + gradients + AdamW's two
moments, 16 bytes per fp32 parameter. "dropped" is the fraction of routed tokens over expert capacity
(random tokens and a fresh router: an untrained model's routing); a dropped token skips its expert's
matmuls, so with drops the MoE does less work than the dense model, and ``--capacity-factor 0`` is the
like-for-like comparison. "CPU use" is the process's CPU time over wall time × threads: a run that
other processes slowed down shows under 100% and is run again (``--min-cpu-use``, ``--retries``);
``--rounds`` repeats every configuration round-robin and keeps its fastest run.
On a shared machine, ``--interleave`` builds every configuration in one process and alternates them
step by step, so that a burst of load elsewhere falls on all of them; "vs dense" is then the median of
the ratios measured in the same round (their spread is printed), and RSS is not per configuration.
With more than one thread on an oversubscribed machine, OpenMP threads that spin at each parallel
region's barrier while their partner is descheduled make every kernel launch expensive; the MoE step
launches many more (small) kernels than the dense one, so it suffers more: run with ``--threads 1``
or ``OMP_WAIT_POLICY=PASSIVE`` there (the JSON records which).
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from loom.train.metrics import cpu_model


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Config:
    """One configuration built in this process: its model, optimizer and batch, stepped on demand."""

    def __init__(self, preset: str, seq: int, batch: int, experts: int, capacity_factor: float):
        from loom.config import load_config
        from loom.models import build_model, count_params, materialize
        from loom.models.common import moe_layers
        from loom.train.optim import build_optimizer

        overrides = [f"model={preset}", f"model.block_size={seq}", "train.precision=fp32",
                     f"model.moe.experts={experts}"]
        if experts:
            overrides += ["model.moe.every=1", "model.moe.router=switch", "model.moe.top_k=1",
                          f"model.moe.capacity_factor={capacity_factor}"]
        self.cfg = load_config(None, overrides)
        self.seq, self.batch, self.experts, self.capacity_factor = seq, batch, experts, capacity_factor
        self.model = materialize(build_model(self.cfg.model), torch.device("cpu"), seed=0)
        self.model.train()
        self.params = count_params(self.model)
        self.opt = build_optimizer(self.model, self.cfg.train)
        self.layers = [m for _, m in moe_layers(self.model)]
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, self.cfg.model.vocab_size, (batch, seq + 1), generator=g)
        self.step_times, self.fb_times, self.opt_times, self.cpu_times = [], [], [], []
        self.assigned = self.dropped = 0.0

    def step(self, record: bool) -> float:
        """One training step; its times join the figures when ``record``. -> its wall time."""
        from loom.models.common import STAT_FIELDS
        from loom.tasks import lm_loss

        model, x = self.model, self.x
        c0, t0 = time.process_time(), time.perf_counter()
        logits = model(x[:, :-1])
        lm_loss(logits, x[:, 1:]).backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t2, c2 = time.perf_counter(), time.process_time()
        for m in self.layers:  # the trainer collects these every step; so do we, outside the timed region
            if m.stats:
                row = torch.stack(m.stats).sum(0)[-len(STAT_FIELDS):]
                if record:
                    self.assigned += float(row[0])
                    self.dropped += float(row[1])
            m.stats = []
        if record:
            self.step_times.append(t2 - t0)
            self.fb_times.append(t1 - t0)
            self.opt_times.append(t2 - t1)
            self.cpu_times.append(c2 - c0)
        return t2 - t0

    def row(self) -> dict:
        """The row of the table: medians over the recorded steps."""
        from loom.models import flops_per_token, matmul_params

        cfg, experts = self.cfg, self.experts
        step_s = statistics.median(self.step_times)
        threads = torch.get_num_threads()
        return {
            "experts": experts,
            "router": "switch" if experts else "dense",
            "capacity_factor": self.capacity_factor if experts else None, "n_layer": cfg.model.n_layer,
            "n_embd": cfg.model.n_embd, "ffn": cfg.model.expert_ffn if experts else cfg.model.ffn,
            "seq": self.seq, "batch": self.batch, "precision": "fp32", "threads": threads,
            "params": self.params, "active_params": matmul_params(cfg.model),
            "flops_per_token": flops_per_token(cfg.model, self.seq), "state_mib": 16 * self.params / 2**20,
            "step_s": step_s, "fwd_bwd_s": statistics.median(self.fb_times),
            "optim_s": statistics.median(self.opt_times), "step_times_s": list(self.step_times),
            # CPU time of this process's threads over wall time × threads: well under 1 when other processes
            # took the cores (OpenMP threads spinning while they wait count as busy, so not far under)
            "cpu_util": statistics.median(c / (t * threads) for c, t in zip(self.cpu_times, self.step_times)),
            "tokens_per_s": self.batch * self.seq / step_s,
            "dropped_frac": self.dropped / self.assigned if self.assigned else 0.0,
        }


def bench(preset: str, seq: int, batch: int, experts: int, capacity_factor: float, steps: int, warmup: int,
          threads: int | None) -> dict:
    """One configuration, in this process: the row of the table."""
    if threads:
        torch.set_num_threads(threads)
    base_rss = rss_mib()
    c = Config(preset, seq, batch, experts, capacity_factor)
    for i in range(warmup + steps):
        c.step(record=i >= warmup)
    peak = rss_mib()
    return {**c.row(), "preset": preset, "rss_base_mib": base_rss, "rss_peak_mib": peak,
            "rss_growth_mib": peak - base_rss}


def interleaved(args: argparse.Namespace) -> list[dict]:
    """Every configuration built in this one process and stepped in turn, ``--steps`` steps each per
    round, so that a slow stretch of a shared machine falls on all of them alike. Each row also gets
    its ratio to the dense model round by round (median, min and max over rounds). Peak RSS is the
    process's, not a configuration's, and is left out."""
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {e: Config(args.preset, args.seq, args.batch_size, e, args.capacity_factor) for e in args.experts}
    for c in configs.values():
        for _ in range(args.warmup):
            c.step(record=False)
    round_s: dict[int, list[float]] = {e: [] for e in args.experts}
    for k in range(args.rounds):
        for e, c in configs.items():
            t = statistics.median(c.step(record=True) for _ in range(args.steps))
            round_s[e].append(t)
            print(f"  round {k + 1}, experts={e}: step {t:.3f} s ({args.batch_size * args.seq / t:.0f} tokens/s), "
                  f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows = []
    for e, c in configs.items():
        row = {**c.row(), "preset": args.preset, "rss_base_mib": None, "rss_peak_mib": None,
               "rss_growth_mib": None, "round_step_s": round_s[e]}
        if 0 in configs:  # tokens/s over the dense model's in the same round
            ratios = [d / m for d, m in zip(round_s[0], round_s[e])]
            row.update(round_ratio_median=statistics.median(ratios), round_ratio_min=min(ratios),
                       round_ratio_max=max(ratios))
        rows.append(row)
    return rows


def run_subprocess(args: argparse.Namespace, experts: int) -> dict:
    """One configuration in a fresh interpreter, so that its peak RSS is its own."""
    import loom

    env = dict(os.environ)
    root = str(Path(loom.__file__).resolve().parents[1])  # loom importable in the child however it was here
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, __file__, "--worker", "--experts", str(experts), "--preset", args.preset,
           "--seq", str(args.seq), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--capacity-factor", str(args.capacity_factor)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fresh_processes(args: argparse.Namespace) -> list[dict]:
    """Every configuration in its own process, round-robin; each one's fastest run."""
    runs: dict[int, list[dict]] = {e: [] for e in args.experts}
    for k in range(args.rounds):  # round-robin, so that a burst of load elsewhere hits one round of a configuration
        for e in args.experts:
            for attempt in range(1 + args.retries):
                r = run_subprocess(args, e)
                runs[e].append(r)
                print(f"  round {k + 1}, experts={e}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_s']:.3f} s, "
                      f"CPU use {100 * r['cpu_util']:.0f}%", file=sys.stderr, flush=True)
                if r["cpu_util"] >= args.min_cpu_use:
                    break
    rows = []
    for e in args.experts:  # the fastest run: other processes can only slow a run down
        best = dict(min(runs[e], key=lambda r: r["step_s"]))
        best["runs_step_s"] = [r["step_s"] for r in runs[e]]
        best["runs_cpu_util"] = [r["cpu_util"] for r in runs[e]]
        rows.append(best)
    dense = next((r for r in rows if r["experts"] == 0), None)
    for r in rows:
        r["relative_to_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense else None
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model shape (default gpt-mini; gpt-tiny with --quick)")
    p.add_argument("--experts", type=int, nargs="+", default=None,
                   help="experts per MoE layer; 0 is the dense model (default 0 2 4 8 16 32; 0 2 4 8 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 256; 64 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; 8 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default 7; 3 with --quick); per round with --interleave")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 with --quick)")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, round-robin, and report each one's fastest run")
    p.add_argument("--min-cpu-use", type=float, default=0.9,
                   help="run a configuration again (up to --retries times) when its threads got less than this "
                        "share of the CPU: other processes took the cores")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--interleave", action="store_true",
                   help="build every configuration in this process and alternate them, --steps steps each per "
                        "round (for a shared machine: load spikes hit all alike); reports each one's ratio to dense "
                        "round by round, and no per-configuration RSS")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that takes seconds")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/out/moe_scaling[-quick].json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one configuration, JSON on stdout
    args = p.parse_args()

    quick = args.quick
    defaults = dict(preset=("gpt-tiny", "gpt-mini"), seq=(64, 256), batch_size=(8, 16), steps=(3, 7), warmup=(1, 2))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.experts is None:
        args.experts = [0, 2, 4, 8] if quick else [0, 2, 4, 8, 16, 32]
    if args.out is None:
        args.out = "benchmarks/out/moe_scaling-quick.json" if quick else "benchmarks/out/moe_scaling.json"

    if args.worker:
        row = bench(args.preset, args.seq, args.batch_size, args.experts[0], args.capacity_factor, args.steps,
                    args.warmup, args.threads)
        print(json.dumps(row))
        return

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs: other processes will distort "
              "the timings", file=sys.stderr)
    if args.interleave:
        rows = interleaved(args)
        for r in rows:  # the median of the same-round ratios: what a load spike in one round moves least
            r["relative_to_dense"] = r.get("round_ratio_median")
    else:
        rows = fresh_processes(args)

    threads = rows[0]["threads"]
    name = f"CPU ({threads} threads, {cpu_model()})"
    r0 = rows[0]
    print(f"device: {name}, torch {torch.__version__}")
    print(f"shape: {args.preset}, {r0['n_layer']} layers, d={r0['n_embd']}, ffn={r0['ffn']}, seq {args.seq}, "
          f"batch {args.batch_size}, fp32; Switch top-1 in every block, capacity factor {args.capacity_factor}")
    print(f"{'experts':>7s} {'params':>9s} {'active':>9s} {'state MiB':>9s} {'step s':>7s} {'fwd+bwd':>7s} "
          f"{'optim':>7s} {'tokens/s':>9s} {'vs dense':>8s} {'dropped':>7s} {'RSS MiB':>8s} {'growth':>7s} "
          f"{'CPU use':>7s}")
    for r in rows:
        rel = f"{r['relative_to_dense']:.2f}x" if r["relative_to_dense"] is not None else "-"
        label = str(r["experts"]) if r["experts"] else "dense"
        rss = (f"{r['rss_peak_mib']:8.0f} {r['rss_growth_mib']:7.0f}" if r["rss_peak_mib"] is not None
               else f"{'-':>8s} {'-':>7s}")
        print(f"{label:>7s} {r['params'] / 1e6:8.2f}M {r['active_params'] / 1e6:8.2f}M {r['state_mib']:9.0f} "
              f"{r['step_s']:7.3f} {r['fwd_bwd_s']:7.3f} {r['optim_s']:7.3f} {r['tokens_per_s']:9.0f} {rel:>8s} "
              f"{100 * r['dropped_frac']:6.1f}% {rss} {100 * r['cpu_util']:6.0f}%")
    if args.interleave and any("round_ratio_min" in r for r in rows):
        print("vs dense, round by round (median, min-max over rounds): " + ", ".join(
            f"{r['experts'] or 'dense'}: {r['round_ratio_median']:.2f} ({r['round_ratio_min']:.2f}-"
            f"{r['round_ratio_max']:.2f})" for r in rows if r["experts"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "interleave": args.interleave, "device": name,
            "torch": torch.__version__,
            "host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_s": time.perf_counter() - t_start}
    out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
