"""The session's shared start of two gloo processes (:mod:`tests.distributed.shared_job`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.harness import run_on_ranks
from tests.distributed.shared_job import TWO_RANK_SUITES, run_suites


@pytest.fixture(scope="session")
def two_rank_job(request, tmp_path_factory) -> dict[str, list]:
    """``{suite: [rank 0's result, rank 1's result]}`` for every suite of :data:`TWO_RANK_SUITES` with a
    test in this session that uses the job (after ``-k``/``-m`` selection), all run in one two-process job."""
    collected = {Path(str(item.fspath)).stem for item in request.session.items
                 if "two_rank_job" in getattr(item, "fixturenames", ())}
    suites = [s for s in TWO_RANK_SUITES if s in collected]
    ranks = run_on_ranks(2, run_suites, suites, str(tmp_path_factory.mktemp("two_rank_job")))
    return {s: [r[s] for r in ranks] for s in suites}
