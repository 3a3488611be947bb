"""One start of two gloo processes for every small two-rank suite of a session.

Starting a process and importing torch and loom costs seconds of CPU per rank, more than many a suite's
own work; so the suites named in :data:`TWO_RANK_SUITES` do not start their own processes: each
defines ``two_rank_job(tmp_dir)``, a module-level function that runs on both ranks and returns what its
tests check, and takes its ranks' results from the session fixture ``two_rank_job`` (in
``tests/distributed/conftest.py``), which starts the two processes once and runs, in this order, the
job of every listed suite the session collected. A suite's job must leave the process as it found it
(patches undone, a registered toy family removed). Suites whose point is their own process start (a
hang timeout, a dying worker, a checkpoint saved by another world size) keep their own launch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# the small suites first, the parity suite's long list last
TWO_RANK_SUITES = ("test_pipeline", "test_pipeline_state", "test_tensor_parallel", "test_tp_dropout", "test_parity")


def run_suites(suites: list[str], tmp_dir: str) -> dict:
    """On every rank: ``{suite: its two_rank_job(a directory of its own)}`` for each suite in turn."""
    out = {}
    for suite in suites:
        job_dir = Path(tmp_dir) / suite
        job_dir.mkdir(parents=True, exist_ok=True)
        out[suite] = importlib.import_module(f"tests.distributed.{suite}").two_rank_job(str(job_dir))
    return out
