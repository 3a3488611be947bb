"""Throughput and model FLOPs utilization (MFU), and the metrics file of a run.

MFU follows PaLM (Chowdhery et al. 2022, appendix B): model FLOPs per token × tokens per second ÷
the device's peak FLOP/s. The peak comes from a table of known accelerators; on a CPU, where no
datasheet figure applies, it is the best rate of a large matrix multiply over a few measurements
(cached), raised to any rate the training itself reaches, so that MFU never reads above 100%.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loom.data.dataset import cache_root
from loom.files import read_jsonl, write_text_atomic
from loom.train.precision import autocast, param_dtype, runs_fp32_products

# Dense peak FLOP/s from vendor datasheets, by a substring of torch.cuda.get_device_name().
# Order matters: the first match wins ("H100 PCIe" before "H100").
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12}),  # SXM; fp32 means TF32
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("V100", {"bf16": 125e12, "fp16": 125e12, "fp32": 15.7e12}),  # no bf16 units: fp16 figure
    ("4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
]


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak dense FLOP/s of ``device`` for ``precision`` (fp32 | bf16 | fp16)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_FLOPS:
            if key in name and precision in peaks:
                return peaks[precision]
        return measure_matmul_flops(device, precision)
    return cpu_peak_flops(precision)


CPU_PEAK_MEASUREMENTS = 3


def cpu_peak_flops(precision: str) -> float:
    """The CPU's matmul rate for ``precision``: the best of the first few measurements on this machine
    and thread count (runs on other days, under other loads), then cached. One measurement taken while
    the machine was busy would understate the peak for good, and MFU would read above 100%."""
    path, key = _peak_cache(precision)
    table = _read_peaks(path)
    best, count = table.get(key, (0.0, 0))
    if count < CPU_PEAK_MEASUREMENTS:
        best, count = max(best, measure_matmul_flops(torch.device("cpu"), precision)), count + 1
        _write_peak(path, key, best, count)
    return best


def raise_cpu_peak(precision: str, flops: float) -> None:
    """A rate the training itself reached: the peak is at least that (the cache learns it)."""
    path, key = _peak_cache(precision)
    best, count = _read_peaks(path).get(key, (0.0, 0))
    if flops > best:
        _write_peak(path, key, flops, count)


def _peak_cache(precision: str) -> tuple[Path, str]:
    key = f"{platform.machine()}|{cpu_model()}|threads={torch.get_num_threads()}|{precision}"
    if runs_fp32_products(torch.device("cpu"), precision):  # not the rate of torch's emulated kernels,
        key += "|fp32 products"  # which an older loom measured and cached for this key
    return cache_root(None) / "peak_flops.json", key


def _read_peaks(path: Path) -> dict[str, tuple[float, int]]:
    try:
        raw = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    # {key: [best FLOP/s, measurements]}; a bare number is one measurement (the older format)
    return {k: (float(v), 1) if isinstance(v, (int, float)) else (float(v[0]), int(v[1])) for k, v in raw.items()}


def _write_peak(path: Path, key: str, best: float, count: int) -> None:
    table = {k: list(v) for k, v in _read_peaks(path).items()}
    table[key] = [best, count]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(table, indent=1))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure_matmul_flops(device: torch.device, precision: str, n: int | None = None, seconds: float = 0.5) -> float:
    """Best FLOP/s of an n×n by n×n ``F.linear`` on inputs of the weights' dtype under the autocast
    that training uses for ``precision``: the rate the model's own matrix multiplies can reach."""
    n = n or (4096 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)  # leave the global RNG alone
    a = torch.randn(n, n, device=device, generator=gen, dtype=param_dtype(precision))
    b = torch.randn(n, n, device=device, generator=gen, dtype=param_dtype(precision))
    best, end = 0.0, time.perf_counter() + seconds
    with autocast(device, precision):
        while time.perf_counter() < end or best == 0.0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(4):
                F.linear(a, b)  # the op of nn.Linear; CPU fp16 `mm` alone is ~50x slower
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


class MetricsFile:
    """``metrics.jsonl``: one JSON object per logged step, appended and flushed as it comes."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.is_file():
            # a resumed run repeats the steps after its checkpoint: drop their old records
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= truncate_after_step]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = path.open("a")

    def write(self, record: dict) -> None:
        """Append ``record``; inf and NaN (a diverged loss, a skipped fp16 step's gradient norm)
        are written as null, since JSON has neither."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# metrics.jsonl keys written to TensorBoard as scalars, under these tags (and every val_* metric)
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "loss_scale": "train/loss_scale"}


class TensorBoardWriter:
    """TensorBoard event files (``torch.utils.tensorboard``) of the scalars of each logged step:
    loss, learning rate, gradient norm, tokens/s, MFU and the validation metrics (``val/...``)."""

    def __init__(self, log_dir: Path, purge_after_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run writes

        # a resumed run repeats the steps after its checkpoint: TensorBoard hides their old events
        self._w = SummaryWriter(str(log_dir), purge_step=purge_after_step + 1 if purge_after_step else None)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            tag = TENSORBOARD_TAGS.get(key) or (f"val/{key[4:]}" if key.startswith("val_") else None)
            if tag and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._w.add_scalar(tag, value, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a line torn by a crash mid-write is skipped."""
    return read_jsonl(path)
