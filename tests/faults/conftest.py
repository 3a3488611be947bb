"""Fault tests start real processes; none outlives its test, pass or fail."""

import pytest

from tests.faults.procs import kill_leftovers


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    yield
    kill_leftovers()
