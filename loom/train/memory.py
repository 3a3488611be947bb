"""Will it fit? The memory a training state needs, against what the device has free.

Checked before any data is read or weight allocated, so a model too large for the machine is one
clear line instead of an out-of-memory kill minutes later. Activations are not counted here: they
depend on the batch and are what `train.batch_size` / `train.grad_accum` trade against.
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
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
    need, free = per_device * (local_processes if device.type == "cpu" else 1), available_bytes(device)
    if free is not None and need > free:
        raise ConfigError(
            f"model={cfg.model.preset} has {n / 1e9:.2f}B parameters: its weights, gradients and "
            f"optimizer state need {need / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB free on "
            f"{device}; choose a smaller model (loom describe --list)")


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
