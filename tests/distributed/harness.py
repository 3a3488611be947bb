"""Run a function on N gloo processes on this machine and collect what each rank returns.

One start-up serves a whole list of layouts: the worker functions take the list and loop over it,
so the cost of spawning processes and importing torch is paid once per world size.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, fn, *args) -> list:
    """``fn(*args)`` on ``world_size`` processes with a gloo process group; returns each rank's
    result (anything ``torch.save`` can write). ``fn`` must be importable (a module-level function)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(world_size, free_port(), fn, args, out), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
