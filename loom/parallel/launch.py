"""Starting processes and joining them into one job.

``loom train --nproc N`` starts N local workers through PyTorch's elastic launcher (the machinery
behind ``torchrun``); multi-node jobs start ``torchrun ... -m loom train ...`` on every node. Either
way each worker finds RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in its environment
and joins the default process group here: NCCL when it drives a GPU, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from loom.runs import resolve_device


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process(device_name: str) -> tuple[Process, torch.device]:
    """Join the job described by the environment (if any) and pick this process's device."""
    world = env_world_size()
    if world == 1 and not dist.is_initialized():
        return Process(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return Process(dist.get_rank(), dist.get_world_size(), local_rank), device


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (unchanged on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def launch_local(nproc: int, entrypoint, *args) -> dict:
    """Run ``entrypoint(*args)`` in ``nproc`` local worker processes joined by a local rendezvous;
    returns each local rank's return value. A failed worker raises ``ChildFailedError``."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Ctrl-C reaches the workers straight from the terminal: each finishes its step, they agree to
    # stop after the same one and save a checkpoint. The launcher itself must neither die of it nor
    # pass it on (a second SIGINT would abort the workers' save).
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn", signals_to_handle="SIGTERM,SIGHUP,SIGQUIT")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return elastic_launch(config, entrypoint)(*args)
    finally:
        signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank: int, world_size: int, port: int, fn, args: tuple, out_dir: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10))
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, fn: Callable, *args, threads: int | None = None) -> list:
    """``fn(*args)`` on ``world_size`` fresh processes of this machine joined by a gloo process group
    (measurements, tests); returns what each rank returned (anything ``torch.save`` writes). ``fn`` must
    be importable (a module-level function). ``threads``: intra-op threads per process (default: the
    cores divided among the processes, at least 1, as ``torchrun`` does)."""
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_gloo_entry, args=(world_size, free_port(), fn, args, out, threads),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
