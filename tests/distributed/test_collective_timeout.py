"""parallel.timeout_s: a collective that one rank never joins ends in one line naming the setting,
after the configured timeout, instead of a hang (the default would wait 30 minutes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from loom.config import load_config
from loom.errors import ConfigError
from loom.parallel.launch import free_port

# long enough that both ranks join the group even on a loaded machine (the setting covers joining too)
TIMEOUT_S = 10.0


def _rank(rank: int, port: int, out: str) -> None:
    """Join through init_process (as `loom train` does); rank 1 skips the barrier rank 0 waits in."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    from loom.errors import RunError
    from loom.parallel.launch import barrier, collective_timeout, init_process

    init_process("cpu", timeout_s=TIMEOUT_S)
    result = "no error"
    if rank == 0:
        t0 = time.monotonic()
        try:
            with collective_timeout(TIMEOUT_S):
                barrier()
        except RunError as e:
            result = f"{time.monotonic() - t0:.1f}\n{e}"
    else:
        deadline = time.monotonic() + 60  # alive but never joining (a hang, not a death) until rank 0 is done
        while not Path(out, "rank0.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    Path(out, f"rank{rank}.txt").write_text(result)
    os._exit(0)  # leave without the group's teardown, whose barrier would wait for the other rank


def test_a_collective_one_rank_skips_times_out_in_one_line(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 90  # a timeout that is not applied is a hang: fail, do not wait 30 minutes
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("rank 0 still waits in its barrier: parallel.timeout_s was not applied")
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "\n" not in message
    assert f"parallel.timeout_s={TIMEOUT_S:g} s" in message and "raise parallel.timeout_s" in message
    assert message.startswith("a collective") and "on rank 0" in message
    assert TIMEOUT_S * 0.9 <= float(seconds) < 60  # the setting, not the 30-minute default, ended it


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_the_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match=rf"parallel.timeout_s={value}.* must be a finite number in \(0, inf\)"):
        load_config(None, [f"parallel.timeout_s={value}"])
