"""Starting real ``loom`` processes and finding their workers, for the fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

STARTED: list[subprocess.Popen] = []  # killed (with their process groups) after each test: see conftest.py


def loom_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    """``python -m loom ARGS`` in its own session, its stderr a pipe read line by line."""
    return popen([sys.executable, "-m", "loom", *args], cwd=cwd)


def popen(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})})
    STARTED.append(proc)
    return proc


def kill_leftovers() -> None:
    """Whatever a failed test left running: each process started here and its group (workers)."""
    while STARTED:
        proc = STARTED.pop()
        pids = workers_of(proc.pid) if proc.poll() is None else []  # torchrun's are in sessions of their own
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
    """Read ``proc``'s stderr up to a line that starts with ``prefix``; what was read."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(prefix):
            return "".join(seen)
    raise AssertionError(f"exited {proc.wait()} before a line {prefix!r}:\n{''.join(seen)}")


def workers_of(launcher_pid: int) -> list[int]:
    """The training processes a launcher spawned (not multiprocessing's resource tracker)."""
    try:
        kids = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    except OSError:
        return []
    workers = []
    for k in kids:
        try:
            cmdline = Path(f"/proc/{k}/cmdline").read_text()
        except OSError:
            continue
        if "spawn_main" in cmdline or "loom" in cmdline:  # --nproc's workers; torchrun's
            workers.append(int(k))
    return workers
