"""Run a function on N gloo processes on this machine and collect what each rank returns.

One start-up serves a whole list of layouts: the worker functions take the list and loop over it,
so the cost of spawning processes and importing torch is paid once per world size.
"""

from __future__ import annotations

from loom.parallel.launch import run_on_ranks as _run_on_ranks

# A job of the suite takes minutes at most on 2 cores; one that has not finished in this long is hung
# (a collective a rank never joins), and is reported with where each rank waits instead of holding CI.
TIMEOUT_S = 1800


def run_on_ranks(world_size: int, fn, *args, timeout: float = TIMEOUT_S) -> list:
    """``fn(*args)`` on ``world_size`` single-threaded processes with a gloo process group; returns each
    rank's result. ``fn`` must be importable (a module-level function)."""
    return _run_on_ranks(world_size, fn, *args, threads=1, timeout=timeout)
