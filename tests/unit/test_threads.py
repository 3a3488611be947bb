"""One CPU-process policy: each of N local processes gets cores // N intra-op threads (at least one),
in training (``loom train --nproc N``, whose elastic launcher does not set it), calibration and the
test harness alike, unless OMP_NUM_THREADS is set."""

from __future__ import annotations

import os
from unittest import mock

import torch

from loom.parallel import launch


def _threads_after_init(env: dict) -> int:
    before = torch.get_num_threads()
    try:
        with mock.patch.dict(os.environ, env, clear=False), \
                mock.patch.object(launch.dist, "is_initialized", lambda: True), \
                mock.patch.object(launch.dist, "get_rank", lambda: 0), \
                mock.patch.object(launch.dist, "get_world_size", lambda: 4), \
                mock.patch.object(launch.os, "cpu_count", lambda: 8):
            if "OMP_NUM_THREADS" not in env:
                os.environ.pop("OMP_NUM_THREADS", None)
            launch.init_process("cpu")
            return torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_each_training_process_gets_its_share_of_the_cores():
    assert _threads_after_init({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}) == 2
    assert launch.threads_per_process(16) == max(1, (os.cpu_count() or 1) // 16)


def test_omp_num_threads_wins():
    torch.set_num_threads(1)
    assert _threads_after_init({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}) == 1
