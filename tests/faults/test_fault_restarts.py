"""Elastic restarts for real: a worker killed with SIGKILL mid-run, the group started again by the
elastic agent (``loom train --nproc 2 --max-restarts 1``; two ``torchrun`` agents of one job with a
c10d rendezvous on 127.0.0.1), the restarted workers resuming from the run's newest valid checkpoint
by themselves, and the losses equal to an uninterrupted run's, bit for bit (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from loom.parallel.launch import free_port
from loom.train.metrics import read_metrics
from tests.faults.procs import loom_popen, popen, wait_for_line, workers_of

TRAIN = ["model=gpt-tiny", "model.dropout=0.1", "train.steps=40", "train.batch_size=4", "train.log_every=1",
         "train.ckpt_every=5", "train.eval_every=1000", "train.progress=log"]


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory):
    """The reference: the same two-process job, never interrupted."""
    run = tmp_path_factory.mktemp("restarts") / "whole"
    proc = loom_popen("train", "--nproc", "2", "--data", str(tiny_corpus), *TRAIN, f"train.run_dir={run}")
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest
    return losses(run)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_losses_equal_an_uninterrupted_run(uninterrupted, tiny_corpus,
                                                                                tmp_path):
    run = tmp_path / "run"
    proc = loom_popen("train", "--nproc", "2", "--max-restarts", "1", "--data", str(tiny_corpus), *TRAIN,
                      f"train.run_dir={run}")
    wait_for_line(proc, "step 12/")
    os.kill(workers_of(proc.pid)[-1], signal.SIGKILL)
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest
    assert "resumed from" in rest, rest  # the restarted group found the checkpoint by itself
    got = losses(run)
    assert sorted(got) == list(range(1, 41))
    assert got == uninterrupted  # exact


@pytest.mark.slow
def test_without_restarts_a_killed_worker_ends_the_job_and_resume_is_exact(uninterrupted, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    proc = loom_popen("train", "--nproc", "2", "--data", str(tiny_corpus), *TRAIN, f"train.run_dir={run}")
    wait_for_line(proc, "step 12/")
    os.kill(workers_of(proc.pid)[-1], signal.SIGKILL)
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 1, rest
    proc = loom_popen("train", "--nproc", "2", "--resume", str(run))
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest
    assert losses(run) == uninterrupted


def torchrun_agent(port: int, run, tiny_corpus) -> subprocess.Popen:
    """One node's agent of a two-node job (one worker per node), both on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "loom", "train", "--data", str(tiny_corpus),
           *TRAIN, f"train.run_dir={run}"]
    return popen(cmd, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # a fresh store per round


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_survive_a_killed_worker(uninterrupted, tiny_corpus, tmp_path):
    run, port = tmp_path / "run", free_port()
    first = torchrun_agent(port, run, tiny_corpus)
    second = torchrun_agent(port, run, tiny_corpus)
    wait_for_line(first, "step 12/")  # rank 0, on the first node, logs
    os.kill(workers_of(second.pid)[0], signal.SIGKILL)  # the second node's worker (rank 1)
    out_first, out_second = first.stderr.read(), second.stderr.read()
    assert first.wait(timeout=300) == 0, out_first
    assert second.wait(timeout=300) == 0, out_second
    assert "resumed from" in out_first, out_first
    assert losses(run) == uninterrupted  # the same two ranks, dp=2, as the --nproc 2 job
