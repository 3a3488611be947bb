"""Starting processes and joining them into one job.

``loom train --nproc N`` starts N local workers through PyTorch's elastic launcher (the machinery
behind ``torchrun``); multi-node jobs start ``torchrun ... -m loom train ...`` on every node. Either
way each worker finds RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in its environment
and joins the default process group here: NCCL when it drives a GPU, gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from loom.errors import ConfigError, RunError


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"{key}={name!r} is not valid; choose auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"{key}={name!r} but this machine has {count} CUDA device(s); use cpu or auto")
    return device


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process(device_name: str, timeout_s: float = 1800.0) -> tuple[Process, torch.device]:
    """Join the job described by the environment (if any) and pick this process's device. A collective
    that waits longer than ``timeout_s`` (``parallel.timeout_s``) fails (see :func:`collective_timeout`)."""
    world = env_world_size()
    if world == 1 and not dist.is_initialized():
        return Process(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # elastic_launch (unlike torchrun) leaves every worker all the cores: N processes would then
        # run N × cores threads. One share each, as `loom calibrate` measured the machine.
        torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        _check_restart_store()
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    return Process(dist.get_rank(), dist.get_world_size(), local_rank), device


@contextlib.contextmanager
def collective_timeout(timeout_s: float, key: str = "parallel.timeout_s"):
    """A collective that timed out (another process is stuck, dead, or slower than the timeout) as one
    line naming the setting and what to do, instead of gloo's message and traceback. Rank 0's line is
    printed by the command; another rank that times out says so itself, since rank 0 may be the one
    that is stuck."""
    try:
        yield
    except RuntimeError as e:  # gloo raises torch.distributed.DistBackendError, a RuntimeError
        text = str(e)
        if not re.search(r"timed out|timeout", text, re.IGNORECASE):
            raise
        op = re.search(r"for (\w+) operation", text)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        message = (f"a collective{f' ({op.group(1)})' if op else ''} on rank {rank} waited longer than "
                   f"{key}={timeout_s:g} s for the other processes: one of them is stuck or died (see its "
                   f"output), or a step or checkpoint save takes that long (then raise {key})")
        if rank != 0:
            print(f"loom: error: {message}", file=sys.stderr, flush=True)
        raise RunError(message) from None


def threads_per_process(local_processes: int) -> int:
    """Intra-op threads of each of ``local_processes`` CPU processes sharing this machine: one share of
    the cores each, at least one (what ``loom train --nproc``, ``loom calibrate`` and
    :func:`run_on_ranks` all use, unless OMP_NUM_THREADS says otherwise)."""
    return max(1, (os.cpu_count() or 1) // max(1, local_processes))


def _check_restart_store() -> None:
    """Restarts need a fresh store per rendezvous round: an elastic agent that shares its own store
    with the workers keeps it across restarts, and restarted workers then read the process-group keys
    of the group before them and dial its dead workers ("Connection refused"), or, on several nodes,
    wait for ever. ``loom train --nproc`` sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for its agent;
    ``torchrun --max-restarts`` needs it in the environment too."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError("restarts (--max-restarts) need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the launcher's "
                          "environment (e.g. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...), so that "
                          "restarted workers do not read the keys of the workers before them")


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


def shutdown_process_group() -> None:
    """Leave the job in order: wait until every rank is done communicating, destroy the process
    groups, and free them *now*.

    ``destroy_process_group`` only drops torch's own references: the device mesh, FSDP and DTensor
    parameters keep theirs in reference cycles, so each group's gloo threads (a transport loop and
    two run loops per group) live on until the interpreter tears itself down at exit, in no fixed
    order, with the other ranks already gone. A thread destroyed there while still joinable is
    ``std::terminate`` — "terminate called without an active exception", a worker dead of
    SIGABRT after its work was done. Collecting the cycles here joins those threads while the
    interpreter is whole. Idempotent; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def native_threads() -> list[str]:
    """Names of this process's native threads (Linux; empty elsewhere), e.g. ``gloo_tcp_loop``."""
    names = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    except OSError:
        pass
    return sorted(names)


def launch_local(nproc: int, entrypoint, *args, max_restarts: int = 0) -> dict:
    """Run ``entrypoint(*args)`` in ``nproc`` local worker processes joined by a local rendezvous;
    returns each local rank's return value. A failed worker group is started again up to
    ``max_restarts`` times (each worker sees ``TORCHELASTIC_RESTART_COUNT``); when they are spent a
    failed worker raises ``ChildFailedError``.

    SIGTERM or SIGINT to this process is passed on to every worker, which finish their step, agree
    to stop after the same one, save a checkpoint and return; a worker that receives one directly
    does the same. (The elastic agent's own handling of these signals would stop waiting for the
    workers' results and kill them after a timeout, mid-save.) A terminal's Ctrl-C reaches the
    workers twice, directly and from here, within a second: they take it as one request."""
    import multiprocessing

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.1, start_method="spawn", signals_to_handle="SIGHUP,SIGQUIT")

    def pass_on(signum, frame) -> None:
        for worker in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    shared = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # a fresh store per round (see _check_restart_store)
    try:
        return elastic_launch(config, entrypoint)(*args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if shared is None:
            del os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
        else:
            os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = shared


def restart_count() -> int:
    """How many times the elastic agent has restarted this worker's group (0: the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerFailed(RuntimeError):
    """A process of :func:`run_on_ranks` failed: its rank, how it ended, and its last output."""


def _gloo_entry(rank: int, world_size: int, port: int, fn, args: tuple, out_dir: str, threads: int) -> None:
    import faulthandler

    # this process's output goes to a file, so that a dead worker's last words can be reported, and
    # SIGUSR1 writes its stack there, so that a hung one can say where it waits
    log = os.open(Path(out_dir) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for fd in (1, 2):
        os.dup2(log, fd)
    faulthandler.register(signal.SIGUSR1, all_threads=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10))
    result = fn(*args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    del result
    shutdown_process_group()


def run_on_ranks(world_size: int, fn: Callable, *args, threads: int | None = None,
                 timeout: float | None = None) -> list:
    """``fn(*args)`` on ``world_size`` fresh processes of this machine joined by a gloo process group
    (measurements, tests); returns what each rank returned (anything ``torch.save`` writes). ``fn`` must
    be importable (a module-level function). ``threads``: intra-op threads per process (default: the
    cores divided among the processes, at least 1, as ``torchrun`` does).

    A worker that raises or dies raises :class:`WorkerFailed` naming its rank, its exception or
    signal, and the tail of what it printed. With ``timeout`` (seconds), workers still running then
    are stopped and reported with the stack each was waiting in (a hang is a failure, not a wait)."""
    import time

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    threads = threads or threads_per_process(world_size)
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_gloo_entry, args=(world_size, free_port(), fn, args, out, threads),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while not ctx.join(timeout=1.0):
                if deadline is not None and time.monotonic() > deadline:
                    raise WorkerFailed(_hang_report(ctx, world_size, Path(out), timeout))
        except ProcessException as e:
            raise WorkerFailed(_failure_report(e, world_size, Path(out))) from None
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _hang_report(ctx, world_size: int, out: Path, timeout: float, lines: int = 40) -> str:
    """Each worker still alive after ``timeout``: where it waits (its stack, which SIGUSR1 makes it
    write), then stop them all."""
    import time

    alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
    for r in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(ctx.processes[r].pid, signal.SIGUSR1)
    time.sleep(1.0)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    parts = [f"ranks {alive} of {world_size} still running after {timeout:g} s (a collective that never completes?)"]
    for r in alive:
        log = out / f"rank{r}.log"
        tail = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
        parts.append(f"rank {r} was waiting in:\n" + "\n".join(f"  | {line}" for line in tail))
    return "\n".join(parts)


def _failure_report(e, world_size: int, out: Path, lines: int = 30) -> str:
    """``rank R of N died of SIGABRT (signal 6)`` / ``raised ...``, then its last output."""
    from torch.multiprocessing.spawn import ProcessExitedException

    rank = e.error_index
    if isinstance(e, ProcessExitedException) and e.signal_name:
        how = f"died of {e.signal_name} (signal {abs(e.exit_code)})"
    elif isinstance(e, ProcessExitedException):
        how = f"exited with code {e.exit_code}"
    else:  # ProcessRaisedException: the message holds the worker's traceback
        trace = str(e).strip().splitlines()
        how = f"raised {trace[-1] if trace else 'an exception'}\n" + "\n".join(f"  | {t}" for t in trace[1:])
    log = out / f"rank{rank}.log"
    tail = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
    said = "\n".join(f"  | {line}" for line in tail) if tail else "  (it printed nothing)"
    return f"rank {rank} of {world_size} {how}\nits last {len(tail)} lines of output:\n{said}"
