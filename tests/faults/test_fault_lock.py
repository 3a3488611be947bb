"""One job per run directory: a second job on a run that is training is refused in one line; a job
that dies (SIGKILL) leaves no lock behind."""

from __future__ import annotations

import os
import signal

import pytest

from tests.faults.procs import loom_popen, wait_for_line


@pytest.mark.slow
def test_a_second_resume_of_a_running_run_is_one_line_and_a_killed_job_leaves_no_lock(tiny_corpus, tmp_path,
                                                                                       loom_cli):
    run = tmp_path / "run"
    job = loom_popen("train", "model=gpt-tiny", "--data", str(tiny_corpus), "train.steps=100000",
                     "train.batch_size=2", "train.log_every=1", "train.ckpt_every=2", "train.eval_every=100000",
                     "train.progress=log", f"train.run_dir={run}")
    try:
        wait_for_line(job, "step 3/")
        again = [f"train.run_dir={run}", "model=gpt-tiny", "--data", str(tiny_corpus)]
        for args in (["--resume", str(run)], again):
            code, _, err = loom_cli("train", *args, "train.steps=4", "train.progress=none")
            assert code == 2 and "Traceback" not in err
            error = [line for line in err.splitlines() if line.startswith("loom: error:")]
            assert len(error) == 1, err
            if args[0] == "--resume":
                assert f"is in use by another job (process {job.pid})" in error[0]
        code, _, err = loom_cli("train", "--nproc", "2", "--resume", str(run), "train.steps=4")
        assert code == 2 and f"in use by another job (process {job.pid})" in err  # before any process starts
        assert job.poll() is None  # the running job goes on
    finally:
        os.kill(job.pid, signal.SIGKILL)  # dies holding the lock
        job.wait(timeout=60)
    code, _, err = loom_cli("train", "--resume", str(run), "train.steps=4", "train.progress=none")
    assert code == 0, err  # the kernel released the dead job's lock
