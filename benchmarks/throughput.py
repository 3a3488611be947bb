"""Single-device training throughput: tokens/s and MFU of full optimizer steps.

    python benchmarks/throughput.py                       # gpt2-124m at seq 1024, gpt-mini and gpt-tiny, fp32
    python benchmarks/throughput.py --precision bf16 --batch-size 8 --device cuda

Each step is forward + backward + AdamW on random tokens (the data pipeline is not measured).
MFU = PaLM model FLOPs per token × tokens/s ÷ the device's peak (a datasheet figure for known GPUs,
a measured matmul rate on a CPU). Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from loom.config import load_config
from loom.models import build_model, count_params, flops_per_token, materialize
from loom.parallel.launch import resolve_device
from loom.tasks import lm_loss
from loom.train.metrics import peak_flops
from loom.train.optim import build_optimizer
from loom.train.precision import LossScaler, autocast


def bench(preset: str, seq: int, batch: int, steps: int, warmup: int, device: torch.device, precision: str) -> dict:
    cfg = load_config(None, [f"model={preset}", f"model.block_size={seq}", f"train.precision={precision}"])
    model = materialize(build_model(cfg.model), device, seed=0)
    opt = build_optimizer(model, cfg.train)
    scaler = LossScaler(device, precision)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            logits = model(x[:, :-1])
        scaler.scale(lm_loss(logits, x[:, 1:])).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step([opt], norm, i)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median
    tokens_per_s = batch * seq / step_s
    fpt = flops_per_token(cfg.model, seq)
    peak = peak_flops(device, precision)
    row = {
        "preset": preset, "params_m": count_params(model) / 1e6, "seq": seq, "batch": batch,
        "precision": precision, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "tflops": fpt * tokens_per_s / 1e12, "peak_tflops": peak / 1e12, "mfu": fpt * tokens_per_s / peak,
    }
    if device.type == "cuda":
        row["mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["gpt2-124m:1024", "gpt-mini:256", "gpt-tiny:64"],
                   help="PRESET:SEQ pairs")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 1 at seq>=1024, else 16)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--out", default="benchmarks/out/throughput.json")
    args = p.parse_args()

    device = resolve_device(args.device)
    rows = []
    for case in args.cases:
        preset, seq = case.split(":")
        batch = args.batch_size or (1 if int(seq) >= 1024 else 16)
        rows.append(bench(preset, int(seq), batch, args.steps, args.warmup, device, args.precision))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'preset':12s} {'params':>8s} {'seq':>5s} {'batch':>5s} {'prec':>5s} {'step s':>8s} "
          f"{'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for r in rows:
        print(f"{r['preset']:12s} {r['params_m']:7.1f}M {r['seq']:5d} {r['batch']:5d} {r['precision']:>5s} "
              f"{r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['tflops']:8.3f} {100 * r['mfu']:5.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "host": platform.node(),
                               "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
