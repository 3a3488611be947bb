"""The session's shared starts of gloo processes, one per world size (:mod:`tests.distributed.shared_job`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.harness import run_on_ranks
from tests.distributed.shared_job import SUITES, run_suites


def _shared_job(world: int, request, tmp_path_factory) -> dict[str, list]:
    """``{suite: [each rank's result]}`` for every suite of ``SUITES[world]`` with a test in this session
    that uses the job (after ``-k``/``-m`` selection), all run in one ``world``-process job."""
    job, listed = SUITES[world]
    collected = {Path(str(item.fspath)).stem for item in request.session.items
                 if job in getattr(item, "fixturenames", ())}
    suites = [s for s in listed if s in collected]
    ranks = run_on_ranks(world, run_suites, job, suites, str(tmp_path_factory.mktemp(job)))
    return {s: [r[s] for r in ranks] for s in suites}


@pytest.fixture(scope="session")
def two_rank_job(request, tmp_path_factory) -> dict[str, list]:
    return _shared_job(2, request, tmp_path_factory)


@pytest.fixture(scope="session")
def four_rank_job(request, tmp_path_factory) -> dict[str, list]:
    return _shared_job(4, request, tmp_path_factory)
