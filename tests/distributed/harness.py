"""Run a function on N gloo processes on this machine and collect what each rank returns.

One start-up serves a whole list of layouts: the worker functions take the list and loop over it,
so the cost of spawning processes and importing torch is paid once per world size.
"""

from __future__ import annotations

from loom.parallel.launch import run_on_ranks as _run_on_ranks


def run_on_ranks(world_size: int, fn, *args) -> list:
    """``fn(*args)`` on ``world_size`` single-threaded processes with a gloo process group; returns each
    rank's result. ``fn`` must be importable (a module-level function)."""
    return _run_on_ranks(world_size, fn, *args, threads=1)
