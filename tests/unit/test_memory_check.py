"""The pre-launch memory check counts offload: the state that ``parallel.offload`` keeps in host memory
is checked against the host, not the device (the case offload exists for is accepted, not refused)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from loom.config import ConfigError, load_config
from loom.parallel.plan import Plan
from loom.train import memory

GIB = 2**30


def _check(offload: str, device_free: float, host_free: float) -> None:
    # a short context: activations (which the check also counts) well inside the device's memory
    cfg = load_config(None, ["model=gpt2-1.5b", "model.block_size=128", "train.precision=bf16"])
    plan = Plan(dp=8, zero=3, shard_group=8, offload=offload)
    free = {"cuda": device_free, "cpu": host_free}
    with mock.patch.object(memory, "available_bytes", lambda d: free[d.type]), \
            mock.patch.object(torch.cuda, "device_count", lambda: 8):
        memory.check_training_state_fits(cfg, torch.device("cuda"), plan)


def test_offload_moves_the_sharded_state_off_the_device():
    # 1.56B parameters × 16 bytes / 8 shards ≈ 2.9 GiB of state per device
    with pytest.raises(ConfigError, match="more than the 2.0 GiB free on cuda"):
        _check("none", 2 * GIB, 1000 * GIB)
    _check("params", 2 * GIB, 1000 * GIB)  # the same state in host memory fits


def test_offload_checks_the_host():
    with pytest.raises(ConfigError, match=r"parallel.offload=params keeps [\d.]+ GiB .* in host memory"):
        _check("params", 2 * GIB, 8 * GIB)
