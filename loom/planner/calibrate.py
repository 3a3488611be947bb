"""``loom calibrate``: what this machine achieves, measured, saved as a profile the planner uses.

N processes are started on this machine (gloo, one intra-op thread each unless the cores allow more),
as ``loom train --nproc N`` starts them, and all N measure at the same time. Work is timed in
*processor* seconds of one process (what it costs when the process has a core to itself; the cost
model then accounts for N processes sharing C cores, see :mod:`loom.planner.cost`), communication in
wall seconds (it is mostly waiting):

matmul       FLOP/s of ``torch.mm`` at tiny-model sizes and at 1024³; the best is the peak.
block        forward + backward of one Transformer block of the model code at widths 64…512, fitted as
             ``t = t₀ + FLOPs / (R · h / (h + n₀))``: a rate that grows with the width h (a block's
             element-wise work is ∝ h per token, its matmuls ∝ h²); also, at a negligible size, the
             extra cost of selective and of full recomputation.
trainer      real training steps (``Trainer``'s forward + backward, then clipping + AdamW) of models
             of 1 and 3 blocks with negligible FLOPs: plain, data parallel over N (FSDP) and tensor
             parallel over 2 (distributed tensors). Their differences are the fixed costs per block
             (Python, autograd, hooks, distributed-tensor dispatch, which dominate a tiny model), per
             micro-batch (embedding, head, loss) and per parameter tensor of the optimizer; a wider
             model gives the cost per parameter.
collectives  all-reduce, all-gather, reduce-scatter, all-to-all (all N ranks) and send/recv (pairs)
             from 4 bytes to 4 MiB, each fitted as ``t = latency + bytes / bandwidth`` in the cost
             model's convention (bus bandwidth: a ring all-reduce moves 2(n−1)/n of the buffer, the
             others (n−1)/n; the latency counts once per ring step).
memory       the peak resident set of a process after a small model's training steps: the runtime's
             own memory (Python, torch, gloo), which a CPU's per-rank peak memory starts from.

The profile (JSON, ``$LOOM_CACHE/calibration.json`` by default) holds an ``accelerator`` section (fields
of :class:`loom.planner.hardware.Accelerator`, applied by :func:`loom.planner.hardware.apply_profile`:
``loom plan --cluster 4xcpu --profile PATH``), the fits and the raw measurements.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from loom.parallel.launch import run_on_ranks
from loom.planner.fit import fit_block, fit_collective

PROFILE_VERSION = 1
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def default_profile_path() -> Path:
    """``$LOOM_CACHE/calibration.json`` (``~/.cache/loom/calibration.json`` by default)."""
    from loom.data.dataset import cache_root

    return cache_root(None) / "calibration.json"


# --------------------------------------------------------------------------------------------
# Measurements (on every rank at once)
# --------------------------------------------------------------------------------------------


def _cpu_seconds(fn: Callable[[], object], min_seconds: float, bursts: int = 5) -> tuple[float, float]:
    """(processor seconds, wall seconds) of one ``fn()``, every rank starting together after one warm-up
    call: averaged over bursts of calls that each fill ``min_seconds / bursts`` of processor time, and
    of those the least disturbed (least processor time per call: other work on the machine only ever
    adds to it). Processor time is this process's own work, whatever else shares the cores; the wall
    time is what the same burst took while the other ranks did the same."""
    fn()
    dist.barrier()
    best = (math.inf, math.inf)
    for _ in range(bursts):
        c0, t0, calls = time.process_time(), time.perf_counter(), 0
        while calls == 0 or time.process_time() - c0 < min_seconds / bursts:
            fn()
            calls += 1
        best = min(best, ((time.process_time() - c0) / calls, (time.perf_counter() - t0) / calls))
    return best


def _undisturbed(values: Sequence[float]) -> float:
    """A typical time of a repeated measurement that other work on the machine can only lengthen: the
    median of the faster half."""
    ordered = sorted(values)
    return statistics.median(ordered[: max(1, (len(ordered) + 1) // 2)])


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs after one warm-up, all ranks starting together
    (for collectives: their time is waiting as much as work)."""
    fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_data(vocab: int, n: int = 50_000, seed: int = 0):
    """Random tokens in the shape the trainer takes (no corpus, no tokenizer)."""
    from types import SimpleNamespace

    import numpy as np

    rng = np.random.default_rng(seed)
    return SimpleNamespace(train=rng.integers(0, vocab, n).astype(np.uint16),
                           val=rng.integers(0, vocab, n // 10).astype(np.uint16), meta={})


def _tiny_overrides(layers: int, width: int, seq: int, heads: int = 2, vocab: int = 512) -> list[str]:
    return ["model=gpt-tiny", f"model.n_layer={layers}", f"model.n_embd={width}", f"model.n_head={heads}",
            f"model.block_size={seq}", f"model.vocab_size={vocab}", "train.device=cpu", "train.precision=fp32",
            "train.progress=none", "train.warmup_steps=1"]


def _measure_matmul(sizes: Sequence[tuple[int, int, int]], min_seconds: float) -> list[dict]:
    out = []
    for m, k, n in sizes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        c = torch.empty(m, n)
        cpu, wall = _cpu_seconds(lambda: torch.mm(a, b, out=c), min_seconds)
        out.append({"m": m, "k": k, "n": n, "flops": 2.0 * m * k * n, "cpu_s": cpu, "wall_s": wall})
    return out


def _block_flops(width: int, seq: int, tokens: int) -> float:
    """Forward FLOPs of one GPT block on ``tokens`` tokens (the cost model's count)."""
    return (2.0 * (4 * width * width + 2 * width * 4 * width) + 4.0 * width * seq) * tokens


def _measure_blocks(shapes: Sequence[tuple[int, int, int]], min_seconds: float) -> list[dict]:
    """Forward + backward of one block of the model code, width h, on (b, s) inputs; for the first
    (negligible) shape also under selective and full recomputation."""
    from torch import nn

    from loom.config import load_config
    from loom.models.common import Block
    from loom.parallel.recompute import apply_recompute

    out = []
    for i, (width, seq, batch) in enumerate(shapes):
        cfg = load_config(None, _tiny_overrides(1, width, seq, heads=max(1, width // 32)))
        row = {"width": width, "seq": seq, "batch": batch, "flops": _block_flops(width, seq, batch * seq)}
        for mode in ("none", "selective", "full") if i == 0 else ("none",):
            torch.manual_seed(0)
            blocks = nn.ModuleDict({"0": Block(cfg.model)})
            apply_recompute(blocks, mode)
            x = torch.randn(batch, seq, width, requires_grad=True)
            grad = torch.randn(batch, seq, width)
            cpu, wall = _cpu_seconds(lambda: blocks["0"](x).backward(grad), min_seconds)  # noqa: B023
            row.update({f"cpu_s_{mode}": cpu, f"wall_s_{mode}": wall})
        row["cpu_s"], row["wall_s"] = row["cpu_s_none"], row["wall_s_none"]
        out.append(row)
    return out


def _measure_trainer(layout: list[str], layers: Sequence[int], width: int, steps: int) -> list[dict]:
    """Processor seconds of real training steps of models with negligible FLOPs (one per entry of
    ``layers``, their steps taken in turn so that they see the same conditions) under ``layout``:
    forward + backward of a step of one micro-batch and of a step of two (the gradients synchronized
    after the second only, as in gradient accumulation), and gradient clipping + optimizer step."""
    from loom.config import load_config
    from loom.parallel.launch import Process
    from loom.parallel.plan import resolve_plan
    from loom.tasks import to_device
    from loom.train.trainer import Trainer

    n = dist.get_world_size()
    world = 1 if not layout else n
    rank = dist.get_rank()
    process = Process(rank, world, rank) if world > 1 else Process()
    trainers = []
    for depth in layers:
        cfg = load_config(None, [*_tiny_overrides(depth, width, 8), f"train.batch_size={2 * n}", *layout])
        trainers.append(Trainer(cfg, resolve_plan(cfg, world), None, synthetic_data(cfg.model.vocab_size),
                                process=process, device=torch.device("cpu")))

    def optimizer_step(trainer):
        trainer.model.clip_grads_(1.0)
        for o in trainer.optimizers:
            o.step()
            o.zero_grad(set_to_none=True)

    times = [{"fb1": [], "fb2": [], "opt": []} for _ in trainers]
    for step in range(steps + 2):
        for trainer, t in zip(trainers, times):
            model = trainer.model
            batch = to_device(trainer.task.train_batch(step, trainer.step.rows(0)), torch.device("cpu"))
            x, y = trainer.task.inputs(batch), trainer.task.targets(batch)
            dist.barrier()
            c0 = time.process_time()
            model.forward_backward(x, y, lambda v: v)
            model.after_backward()
            c1 = time.process_time()
            optimizer_step(trainer)
            c2 = time.process_time()
            half = max(1, y.shape[0] // 2)
            dist.barrier()
            c3 = time.process_time()
            model.forward_backward(tuple(t[:half] for t in x), y[:half], lambda v: v, last_micro_step=False)
            model.forward_backward(tuple(t[-half:] for t in x), y[-half:], lambda v: v, last_micro_step=True)
            model.after_backward()
            c4 = time.process_time()
            optimizer_step(trainer)
            if step >= 2:
                t["fb1"].append(c1 - c0)
                t["opt"].append(c2 - c1)
                t["fb2"].append(c4 - c3)
    return [{"layout": layout, "layers": depth, "width": width, "fwd_bwd_cpu_s": _undisturbed(t["fb1"]),
             "two_fwd_bwd_cpu_s": _undisturbed(t["fb2"]), "optimizer_cpu_s": _undisturbed(t["opt"]),
             "tensors": len(list(trainer.model.parameters())),
             "params": sum(p.numel() for p in trainer.model.parameters())}
            for depth, trainer, t in zip(layers, trainers, times)]


def _measure_trainers(steps: int, parallel: bool = True) -> dict:
    """Fixed costs of the training step around the FLOPs: per block (plain, under data parallelism,
    under tensor parallelism: models of 1 and of 3 blocks), per micro-batch, per parameter tensor and
    per parameter. The peak resident set after the first trainer is the runtime's memory.
    ``parallel=False`` measures the plain trainer only (the first step of a distributed one costs
    seconds: caches being filled)."""
    import loom.parallel.pipeline  # noqa: F401  (every module a layout may load counts in the runtime memory)
    import loom.parallel.tensor  # noqa: F401

    n = dist.get_world_size()
    tp = ["parallel.tp=2", f"parallel.dp={n // 2}"]
    layouts = {"dp": [f"parallel.dp={n}"], "tp": tp, "sp": [*tp, "parallel.sp=true"]} if parallel else {}
    runs = {}
    for name, layout in {**layouts, "plain": []}.items():
        for row in _measure_trainer(layout, (1, 3), 16, steps):
            row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            runs[f"{name}{row['layers']}"] = row
            runs.setdefault("runtime_bytes", row["peak_rss_bytes"])
    runs["wide"] = _measure_trainer([], (2,), 256, steps)[0]
    return runs


def _collective(kind: str, numel: int, group_size: int) -> Callable[[], None]:
    rank = dist.get_rank()
    if kind == "all_reduce":
        x = torch.ones(numel)
        return lambda: dist.all_reduce(x)
    if kind == "all_gather":
        x, out = torch.ones(numel // group_size), torch.empty(numel)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: fn(out, x)
    if kind == "reduce_scatter":
        x, out = torch.ones(numel), torch.empty(numel // group_size)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: fn(out, x)
    if kind == "all_to_all":
        x, out = torch.ones(numel), torch.empty(numel)
        return lambda: dist.all_to_all_single(out, x)
    if kind == "send_recv":  # pairs (0,1), (2,3), ...: one message each way; half the round trip counts
        x = torch.ones(numel)
        peer = rank ^ 1
        if peer >= group_size:
            return lambda: None

        def ping_pong():
            if rank % 2 == 0:
                dist.send(x, peer)
                dist.recv(x, peer)
            else:
                dist.recv(x, peer)
                dist.send(x, peer)
        return ping_pong
    raise ValueError(kind)


def _measure_collectives(sizes_bytes: Sequence[int], repeat: int) -> dict:
    n = dist.get_world_size()
    out = {}
    for kind in COLLECTIVES:
        rows = []
        for nbytes in sizes_bytes:
            numel = max(n, nbytes // 4 // n * n)
            t = _timed(_collective(kind, numel, n), repeat)
            rows.append({"bytes": numel * 4, "seconds": t / 2 if kind == "send_recv" else t})
        out[kind] = rows
    return out


def _worker(settings: dict) -> dict:
    """Everything measured on one rank; :func:`_combine` merges the ranks."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    result, took = {}, {}
    for name, fn in (("trainers", lambda: _measure_trainers(settings["trainer_steps"], settings["parallel"])),
                     ("collectives", lambda: _measure_collectives(settings["collective_bytes"], settings["repeat"])),
                     ("matmul", lambda: _measure_matmul(settings["matmul_sizes"], settings["min_seconds"])),
                     ("blocks", lambda: _measure_blocks(settings["block_shapes"], settings["min_seconds"]))):
        t0 = time.perf_counter()
        result[name] = fn()
        took[name] = time.perf_counter() - t0
    result["seconds"] = took
    return result


SETTINGS = {
    "repeat": 7,
    "min_seconds": 0.15,
    "trainer_steps": 16,
    "parallel": True,
    "collective_bytes": [4, 1 << 12, 1 << 16, 1 << 18, 1 << 20, 1 << 22],
    # (m, k, n): tiny-model matmuls (tokens × width × 4·width) and a large one (the peak)
    "matmul_sizes": [(512, 64, 256), (512, 128, 512), (512, 256, 1024), (1024, 1024, 1024)],
    # (width, seq, batch): a spread of widths for the fit; the first, negligible, is the fixed cost
    "block_shapes": [(16, 8, 1), (64, 64, 4), (128, 128, 4), (256, 128, 2), (512, 64, 2)],
}
QUICK = {
    "repeat": 3,
    "min_seconds": 0.02,
    "trainer_steps": 3,
    "parallel": False,
    "collective_bytes": [4, 1 << 12, 1 << 16],
    "matmul_sizes": [(128, 64, 256), (256, 256, 256)],
    "block_shapes": [(16, 8, 1), (64, 16, 2), (128, 16, 2)],
}


def _median_rows(rows_per_rank: list[list[dict]], keys: Sequence[str]) -> list[dict]:
    return [{**row, **{k: statistics.median(r[i][k] for r in rows_per_rank) for k in keys if k in row}}
            for i, row in enumerate(rows_per_rank[0])]


def _combine(ranks: list[dict]) -> dict:
    """One figure per measurement: processor times are the median over ranks; a collective ends with its
    slowest rank (the maximum); memory is the fullest rank's."""
    first = ranks[0]
    out = {"collectives": {k: [{"bytes": row["bytes"],
                                "seconds": max(r["collectives"][k][i]["seconds"] for r in ranks)}
                               for i, row in enumerate(v)] for k, v in first["collectives"].items()}}
    out["matmul"] = _median_rows([r["matmul"] for r in ranks], ("cpu_s", "wall_s"))
    for row in out["matmul"]:
        row["flops_per_s"] = row["flops"] / row["cpu_s"]
        row["flops_per_s_concurrent"] = row["flops"] / row["wall_s"]
    out["blocks"] = _median_rows([r["blocks"] for r in ranks],
                                 [f"{w}_s{m}" for w in ("cpu", "wall") for m in ("", "_none", "_selective", "_full")])
    trainers = {}
    for key, row in first["trainers"].items():
        if key == "runtime_bytes":
            trainers[key] = max(r["trainers"][key] for r in ranks)
        else:
            trainers[key] = {**row, **{k: statistics.median(r["trainers"][key][k] for r in ranks)
                                       for k in ("fwd_bwd_cpu_s", "two_fwd_bwd_cpu_s", "optimizer_cpu_s")},
                             "peak_rss_bytes": max(r["trainers"][key].get("peak_rss_bytes", 0) for r in ranks)}
    out["trainers"] = trainers
    out["seconds"] = first["seconds"]
    return out


def build_profile(raw: dict, nproc: int, device: str = "cpu") -> dict:
    """The profile from combined measurements: the fits, and the accelerator fields they give."""
    fits = {kind: fit_collective(kind, nproc if kind != "send_recv" else 2, [r["bytes"] for r in rows],
                                 [r["seconds"] for r in rows])
            for kind, rows in raw["collectives"].items()}
    peak = max(row["flops_per_s"] for row in raw["matmul"])
    blocks = raw["blocks"]
    block_fit = fit_block([(3 * b["flops"], b["width"], b["cpu_s"]) for b in blocks])
    tiny = blocks[0]
    tr = raw["trainers"]
    kinds = [k for k in ("plain", "dp", "tp", "sp") if f"{k}1" in tr]

    def slope(key: str, kind: str) -> float:  # per block: models of 1 and 3 blocks
        return (tr[f"{kind}3"][key] - tr[f"{kind}1"][key]) / 2

    # per block and step of one micro-batch; of a micro-batch without gradient synchronization
    per_block = {k: slope("fwd_bwd_cpu_s", k) for k in kinds}
    per_block_mb = {k: slope("two_fwd_bwd_cpu_s", k) - per_block[k] for k in kinds}
    for k, default in (("dp", "plain"), ("tp", "dp"), ("sp", "tp")):
        per_block.setdefault(k, per_block[default])
        per_block_mb.setdefault(k, per_block_mb[default])
    tensors_per_block = (tr["plain3"]["tensors"] - tr["plain1"]["tensors"]) / 2
    opt_per_block = {k: (tr[f"{k}3"]["optimizer_cpu_s"] - tr[f"{k}1"]["optimizer_cpu_s"]) / 2
                     for k in kinds if k != "tp"}
    opt_per_block.setdefault("dp", opt_per_block["plain"])
    per_tensor = max(0.0, opt_per_block["plain"] / tensors_per_block)
    wide = tr["wide"]
    per_param = max(0.0, (wide["optimizer_cpu_s"] - per_tensor * wide["tensors"]) / wide["params"])
    overheads = {
        # a whole model's backward is one call: a block's own fixed cost is the trainer's, per block (the
        # block fit's intercept also holds the cost of starting a backward)
        "layer_overhead_s": max(0.0, per_block["plain"]),
        "selective_overhead_s": max(0.0, tiny["cpu_s_selective"] - tiny["cpu_s_none"]),
        "full_overhead_s": max(0.0, tiny["cpu_s_full"] - tiny["cpu_s_none"]),
        "microbatch_overhead_s": max(0.0, tr["plain1"]["fwd_bwd_cpu_s"] - per_block["plain"]),
        # data parallelism: FSDP's hooks in every micro-batch, and the gradient synchronization per block
        "dp_layer_overhead_s": max(0.0, per_block_mb["dp"] - per_block_mb["plain"]),
        "dp_sync_layer_overhead_s": max(0.0, per_block["dp"] - per_block["plain"]
                                        - max(0.0, per_block_mb["dp"] - per_block_mb["plain"])),
        "tp_layer_overhead_s": max(0.0, per_block["tp"] - per_block["dp"]),
        "sp_layer_overhead_s": max(0.0, per_block["sp"] - per_block["tp"]),
        "optimizer_tensor_s": per_tensor,
        "dtensor_tensor_s": max(0.0, (opt_per_block["dp"] - opt_per_block["plain"]) / tensors_per_block),
        "optimizer_param_s": per_param,
    }
    cores = os.cpu_count() or 1
    try:  # the processes share the machine's memory
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / nproc
    except (ValueError, OSError, AttributeError):
        memory = None
    accelerator = {
        "peak_flops": peak,
        **({"memory_bytes": memory} if memory else {}),
        "matmul_efficiency": min(1.0, block_fit["rate"] / peak),
        "matmul_half_width": block_fit["half_width"],
        "intra_node_bw": fits["all_reduce"]["bandwidth"],
        "intra_latency_s": fits["all_reduce"]["latency_s"],
        "collectives": {k: [f["latency_s"], f["bandwidth"]] for k, f in fits.items()},
        "cores_per_node": cores,
        **overheads,
        "runtime_bytes": tr["runtime_bytes"],
        # what tensor parallelism's machinery adds (the peak after the tensor-parallel trainers)
        "tp_runtime_bytes": max(0.0, tr["tp3"]["peak_rss_bytes"] - tr["dp3"]["peak_rss_bytes"]) if "tp3" in tr else 0.0,
        "precision": "fp32",
    }
    return {
        "version": PROFILE_VERSION,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": f"{platform.machine()}, {cores} cores",
        "torch": torch.__version__,
        "device": device,
        "nproc": nproc,
        "threads_per_process": max(1, cores // nproc),
        "accelerator": accelerator,
        "fits": {"collectives": fits, "block": block_fit, "trainer_per_block_cpu_s": per_block,
                 "trainer_per_block_and_microbatch_cpu_s": per_block_mb,
                 "trainer_optimizer_per_block_cpu_s": opt_per_block},
        "raw": raw,
    }


def calibrate(nproc: int = 4, quick: bool = False, settings: dict | None = None) -> dict:
    """Measure this machine with ``nproc`` concurrent gloo processes; returns the profile (not saved)."""
    s = dict(QUICK if quick else SETTINGS)
    s.update(settings or {})
    if nproc < 2 or nproc % 2:
        raise ValueError(f"calibration needs an even number of processes (at least 2), not {nproc}: collectives "
                         "are measured between them and tensor parallelism over pairs")
    ranks = run_on_ranks(nproc, _worker, s)
    return build_profile(_combine(ranks), nproc)


def save_profile(profile: dict, path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    tmp.replace(path)
    return path


def load_profile(path: str | Path | None = None) -> dict:
    return json.loads(Path(path or default_profile_path()).expanduser().read_text())


def summary(profile: dict) -> str:
    """A few lines for the terminal."""
    a, f = profile["accelerator"], profile["fits"]
    us = 1e6
    lines = [f"{profile['nproc']} gloo processes on {profile['machine']} (torch {profile['torch']}); "
             f"processor time of one process, measured while all {profile['nproc']} run:",
             f"  matmul peak        {a['peak_flops'] / 1e9:8.1f} GFLOP/s",
             f"  Transformer block  {f['block']['rate'] / 1e9:8.1f} GFLOP/s × h/(h + {a['matmul_half_width']:.0f}) "
             f"+ {a['layer_overhead_s'] * us:.0f} µs fixed per forward+backward",
             f"  fixed costs        {a['microbatch_overhead_s'] * us:8.0f} µs per micro-batch; per block "
             f"+{a['dp_layer_overhead_s'] * us:.0f} µs under dp (+{a['dp_sync_layer_overhead_s'] * us:.0f} µs "
             f"per step), +{a['tp_layer_overhead_s'] * us:.0f} µs under tp (+{a['sp_layer_overhead_s'] * us:.0f} "
             "µs with sp), "
             f"+{a['selective_overhead_s'] * us:.0f} / +{a['full_overhead_s'] * us:.0f} µs recomputing "
             "selectively / fully",
             f"  optimizer          {a['optimizer_tensor_s'] * us:8.0f} µs per tensor "
             f"(+{a['dtensor_tensor_s'] * us:.0f} distributed) + {a['optimizer_param_s'] * 1e9:.1f} ns per parameter",
             f"  runtime memory     {a['runtime_bytes'] / 2**20:8.0f} MiB per process "
             f"(+{a['tp_runtime_bytes'] / 2**20:.0f} MiB under tensor parallelism)",
             f"  cores              {a['cores_per_node']:8d} (shared by the processes)"]
    for kind, fit in f["collectives"].items():
        lines.append(f"  {kind:18s} {fit['latency_s'] * us:8.0f} µs latency, {fit['bandwidth'] / 1e9:6.2f} GB/s")
    return "\n".join(lines)


def main_calibrate(out: str | Path | None = None, nproc: int = 4, quick: bool = False) -> dict:
    """``loom calibrate``: measure, save the profile to ``out`` (default :func:`default_profile_path`),
    print a summary; returns the profile (its ``path`` key says where it went)."""
    t0 = time.perf_counter()
    profile = calibrate(nproc, quick=quick)
    path = save_profile(profile, out or default_profile_path())
    print(summary(profile))
    print(f"saved {path} ({time.perf_counter() - t0:.0f} s); use it with: loom plan --cluster {nproc}xcpu "
          f"--profile {path}")
    return {**profile, "path": str(path)}
