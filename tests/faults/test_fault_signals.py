"""Preemption for real: SIGTERM (what a scheduler sends before it takes the machine) and SIGINT sent
to a training process, to the launcher of ``--nproc 2`` or to one of its workers. Every rank stops
after the same step, a checkpoint is saved, the resume line is printed, and the exit code is
128 + the signal (143, 130); never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from loom.train.checkpoint import checkpoint_dirs, verify_checkpoint
from tests.faults.procs import loom_popen, wait_for_line, workers_of


def start(tiny_corpus, run: Path, *extra: str) -> subprocess.Popen:
    return loom_popen("train", *extra, "model=gpt-tiny", "--data", str(tiny_corpus), "train.steps=100000",
                      "train.batch_size=2", "train.log_every=1", "train.ckpt_every=0", "train.eval_every=100000",
                      "train.progress=log", f"train.run_dir={run}")


def check_stopped_and_saved(proc: subprocess.Popen, run: Path, code: int) -> None:
    rest = proc.stderr.read()
    assert proc.wait(timeout=180) == code, rest
    assert "Traceback" not in rest, rest
    assert rest.count(f"continue with: loom train --resume {run}") == 1, rest
    ckpts = checkpoint_dirs(run)
    assert len(ckpts) == 1 and not list((run / "checkpoints").glob("*.tmp-*"))
    verify_checkpoint(ckpts[0])  # complete, checksums and all


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])  # SIGINT: tests/cli/test_cli.py
def test_a_signal_to_one_process_saves_and_exits_with_the_resume_line(sig, code, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    proc = start(tiny_corpus, run)
    wait_for_line(proc, "step 2/")
    os.kill(proc.pid, sig)
    check_stopped_and_saved(proc, run, code)


@pytest.mark.slow
@pytest.mark.parametrize("target, sig, code", [
    ("launcher", signal.SIGTERM, 143),
    ("launcher", signal.SIGINT, 130),  # its process id, not the terminal's process group
    ("worker", signal.SIGTERM, 143),  # one rank told: every rank stops after the same step
])
def test_a_signal_under_nproc_2_stops_every_rank_after_a_step_and_saves(target, sig, code, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    proc = start(tiny_corpus, run, "--nproc", "2")
    wait_for_line(proc, "step 2/")
    pid = proc.pid if target == "launcher" else workers_of(proc.pid)[-1]
    os.kill(pid, sig)
    check_stopped_and_saved(proc, run, code)
