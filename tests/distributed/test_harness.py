"""The gloo process runner: a worker leaves no communication thread behind at exit (the cause of
workers dead of SIGABRT after their work was done), and a failed worker is reported by rank, with
how it ended and what it printed last."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from loom.parallel.launch import WorkerFailed, native_threads, shutdown_process_group
from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import process_of_this_rank, trainer

GLOO_THREADS = ("gloo", "pt_gloo", "pt_tcpstore")


def _train_then_leave() -> dict:
    """Train a layout that makes sub-groups (a 2-D mesh, a pipeline, FSDP) and leave the job."""
    t = trainer("gpt", ["parallel.pp=2", "parallel.microbatches=2"], process_of_this_rank())
    t.train_step(0)
    del t
    before = native_threads()
    shutdown_process_group()
    return {"before": before, "after": native_threads()}


def test_leaving_the_job_joins_every_communication_thread():
    for rank, threads in enumerate(run_on_ranks(2, _train_then_leave)):
        alive = [t for t in threads["before"] if t.startswith(GLOO_THREADS)]
        assert alive, "the check means something: gloo threads run while the job is joined"
        left = [t for t in threads["after"] if t.startswith(GLOO_THREADS)]
        assert not left, f"rank {rank} still runs {left} after leaving the job: they would die at exit"


def _abort_on_rank_1() -> None:
    print(f"rank {dist.get_rank()} about to fail", flush=True)
    if dist.get_rank() == 1:
        os.abort()
    dist.barrier()


def _raise_on_rank_1() -> int:
    if dist.get_rank() == 1:
        raise ValueError("a worker's own error")
    return 0


def test_a_dead_worker_is_reported_by_rank_signal_and_last_output():
    with pytest.raises(WorkerFailed) as e:
        run_on_ranks(2, _abort_on_rank_1)
    message = str(e.value)
    assert message.startswith("rank 1 of 2 died of SIGABRT (signal 6)")
    assert "rank 1 about to fail" in message


def test_a_raising_worker_is_reported_with_its_exception():
    with pytest.raises(WorkerFailed, match=r"rank 1 of 2 raised ValueError: a worker's own error"):
        run_on_ranks(2, _raise_on_rank_1)


def _hang_on_rank_1() -> None:
    import time

    import torch

    if dist.get_rank() == 1:
        dist.recv(torch.zeros(1), src=0)  # rank 0 never sends
    else:
        time.sleep(600)


def test_a_hung_job_is_stopped_and_says_where_each_rank_waits():
    with pytest.raises(WorkerFailed) as e:
        run_on_ranks(2, _hang_on_rank_1, timeout=20)
    message = str(e.value)
    assert message.startswith("ranks [0, 1] of 2 still running after 20 s")
    assert "_hang_on_rank_1" in message and "recv" in message
