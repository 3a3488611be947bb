"""One start of gloo processes per world size for the suites of a session.

Starting a process and importing torch and loom costs seconds of CPU per rank, more than many a suite's
own work; so the suites named in :data:`SUITES` do not start their own processes of that world size:
each defines a module-level ``two_rank_job(tmp_dir)`` (``four_rank_job``), which runs on every rank and
returns what its tests check, and takes its ranks' results from the session fixture of that name (in
``tests/distributed/conftest.py``). The fixture starts the processes once and runs, in this order, the
job of every listed suite with a test in the session that uses it. A suite's job must leave the process
as it found it (patches undone, a registered toy family removed). Suites whose point is their own process
start (a hang timeout, a dying worker, leaving the job) keep their own launch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# world size -> (fixture and function name, the suites in the order they run: small ones first)
SUITES = {
    2: ("two_rank_job", ("test_pipeline", "test_pipeline_state", "test_tensor_parallel", "test_tp_dropout",
                         "test_parity", "test_encdec_parity")),
    4: ("four_rank_job", ("test_memory_accounting", "test_checkpoint_layouts", "test_parity", "test_encdec_parity")),
}


def run_suites(job: str, suites: list[str], tmp_dir: str) -> dict:
    """On every rank: ``{suite: its function named job(a directory of its own)}`` for each suite in turn."""
    out = {}
    for suite in suites:
        job_dir = Path(tmp_dir) / suite
        job_dir.mkdir(parents=True, exist_ok=True)
        out[suite] = getattr(importlib.import_module(f"tests.distributed.{suite}"), job)(str(job_dir))
    return out
