"""Will it fit? The memory a training state needs, against what the device has free.

Checked before any data is read or weight allocated, so a model too large for the machine is one
clear line instead of an out-of-memory kill minutes later. On a CPU "free" is the smaller of the
host's available memory and what the container's cgroup (v2 ``memory.max``, v1
``memory.limit_in_bytes``) still allows: a container's limit is what the kernel kills at (exit 137).
Weights, gradients and optimizer state are counted, and a lower bound of the activations one
micro-batch saves for backward (the (b, s, h) tensors every block keeps and the logits), which is
what ``train.batch_size`` / ``train.grad_accum`` trade against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loom.config import Config, ConfigError
from loom.models import build_model, count_params

# fp32 weights (4) + fp32 gradients (4) + two fp32 optimizer moments (8), for AdamW and LAMB alike
BYTES_PER_PARAM = 16


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes, or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = cgroup_room()
    return room if free is None else free if room is None else min(free, room)


def cgroup_room(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup still allows (its limit less its usage), or None without a
    limit: cgroup v2 (``memory.max``, ``memory.current``), else v1 (``memory.limit_in_bytes``,
    ``memory.usage_in_bytes``). The group's own directory when it is visible, else the mount's root
    (what a container sees of its own group)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":")[1:2] and "memory" in line.split(":")[1].split(",")]
    v1_files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    candidates = [(root / rel.lstrip("/"), "memory.max", "memory.current") for rel in v2] + \
                 [(root, "memory.max", "memory.current")] + \
                 [(root / "memory" / rel.lstrip("/"), *v1_files) for rel in v1] + [(root / "memory", *v1_files)]
    for folder, limit_file, usage_file in candidates:
        try:
            limit = (folder / limit_file).read_text().strip()
        except OSError:
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:  # v1 writes "no limit" as ~2^63
            return None
        try:
            usage = int((folder / usage_file).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return max(0, int(limit) - usage)
    return None


def activation_bytes(cfg: Config, plan=None) -> float:
    """A lower bound of what one micro-batch's forward saves for backward on one device: four whole
    and thirteen tensor-parallel-split (b, s, h) tensors per block (see ``loom.planner.memory``),
    its blocks (1/pp of them), and the logits with their gradient on the last stage."""
    m, t = cfg.model, cfg.train
    tp, pp, dp = (plan.tp, plan.pp, plan.data_parallel) if plan is not None else (1, 1, 1)
    rows = t.batch_size / (t.grad_accum * dp)
    if pp > 1:  # micro-batches of rows / microbatches, up to pp of them in flight on the first stage
        rows = rows / plan.microbatches * min(pp, plan.microbatches)
    width = {"fp64": 8, "fp32": 4}.get(t.precision, 2)
    sbh = rows * m.block_size * m.n_embd
    return sbh * width * (4 + 13 / tp) * m.n_layer / pp + rows * m.block_size * m.vocab_size / tp * 4 * 2


def check_training_state_fits(cfg: Config, device: torch.device, plan=None, local_processes: int = 1) -> None:
    """Raise :class:`ConfigError` when weights, gradients and optimizer state alone exceed the
    device's free memory. Under a parallel ``plan`` each device holds 1/(tp·pp) of the model (its
    experts: 1/(ep·pp)), and
    ZeRO shards the optimizer state (zero>=1), gradients (>=2) and weights (3) over its shard group;
    ``local_processes`` share one host's memory when training on CPUs."""
    model = build_model(cfg.model)  # on the meta device: nothing allocated
    n = count_params(model)
    per_device = n * BYTES_PER_PARAM
    if plan is not None:
        # experts are split over ep (and not over tp), the rest over tp; both over pipeline stages
        n_experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        per_device = 0.0
        for count, split, shard in ((n - n_experts, plan.tp * plan.pp, plan.shard_group * plan.ep),
                                    (n_experts, plan.ep * plan.pp, plan.shard_group)):
            shard = shard if plan.zero else 1
            weights, grads, moments = 4 / split, 4 / split, 8 / split
            moments /= shard
            grads /= shard if plan.zero >= 2 else 1
            weights /= shard if plan.zero == 3 else 1
            per_device += count * (weights + grads + moments)
    if cfg.train.precision == "fp64":
        per_device *= 2  # every one of those bytes in float64
    if plan is not None and plan.offload != "none" and device.type != "cpu":
        per_device = _offloaded(cfg, plan, n, per_device, device)
    state = per_device * (local_processes if device.type == "cpu" else 1)
    activations = activation_bytes(cfg, plan) * (local_processes if device.type == "cpu" else 1)
    free = available_bytes(device)
    if free is not None and state > free:
        raise ConfigError(
            f"model={cfg.model.preset} has {n / 1e9:.2f}B parameters: its weights, gradients and "
            f"optimizer state need {state / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB free on "
            f"{device}{_where(device)}; choose a smaller model (loom describe --list)")
    if free is not None and state + activations > free:
        raise ConfigError(
            f"model={cfg.model.preset} with train.batch_size={cfg.train.batch_size}: training state "
            f"{state / 2**30:,.1f} GiB and activations of at least {activations / 2**30:,.1f} GiB exceed the "
            f"{free / 2**30:,.1f} GiB free on {device}{_where(device)}; raise train.grad_accum (now "
            f"{cfg.train.grad_accum}) or lower train.batch_size")


def _where(device: torch.device) -> str:
    return " (the container's memory limit)" if device.type == "cpu" and cgroup_room() is not None else ""


def _offloaded(cfg: Config, plan, n: int, state: float, device: torch.device) -> float:
    """Device bytes under ``parallel.offload`` (FSDP2's ``CPUOffloadPolicy``, both values): the sharded
    master weights, their gradients and the optimizer state (``state`` bytes in all) live in host
    memory, which must hold them for every local process; the device keeps the gathered working copy
    (under zero=3 without a pipeline a block or two at a time: not counted) and whole gradients where
    FSDP keeps them (a pipeline, zero=1 between accumulation micro-steps)."""
    per_rank = n / (plan.tp * plan.pp)
    host = available_bytes(torch.device("cpu"))
    local = torch.cuda.device_count() if device.type == "cuda" else 1
    if host is not None and state * local > host:
        raise ConfigError(
            f"parallel.offload={plan.offload} keeps {state * local / 2**30:,.1f} GiB of sharded weights, "
            f"gradients and optimizer state in host memory, more than the {host / 2**30:,.1f} GiB free; "
            "raise parallel.dp (more shards) or choose a smaller model")
    work = 2 if cfg.train.precision in ("bf16", "fp16") else 4 * (2 if cfg.train.precision == "fp64" else 1)
    gathered = 0.0 if plan.zero == 3 and plan.pp == 1 else per_rank * work
    whole_grads = plan.pp > 1 or (plan.zero == 1 and plan.grad_accum > 1)
    return gathered + (per_rank * 4 if whole_grads else 0.0)
