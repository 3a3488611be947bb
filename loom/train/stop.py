"""Every rank stops after the same step when any rank is asked to stop, without a collective or a
host sync in the step's path.

Each step the loop hands :meth:`StopAgreement.agree` the signal this rank has received (0: none). The
flags go out in an asynchronous all-reduce of a CPU tensor over a gloo group (the default group on a
CPU; a side group of the same ranks beside NCCL on GPUs, so no device is synchronized), and the answer
returned is that of the previous step's reduction, which has long finished by then. Every rank reads
the same reduction at the same step, so all of them stop after the same step: the one after the step
in which the first rank was signalled.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopAgreement:
    """The signal any rank received (SIGTERM before SIGINT) as of the previous step, or 0."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._group = None  # the default group
        if world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # every rank calls this, in the same order
        self._pending: tuple[torch.Tensor, dist.Work] | None = None

    def agree(self, signum: int, last: bool = False) -> int:
        """``signum``: this rank's signal (0: none). On the ``last`` step the answer is this step's (the
        loop is ending: nothing left to overlap with)."""
        if self.world_size == 1:
            return signum
        flags = torch.tensor([float(signum == signal.SIGTERM), float(signum == signal.SIGINT)])
        previous, self._pending = self._pending, (flags, dist.all_reduce(flags, group=self._group, async_op=True))
        if last:
            previous = self._pending
        if previous is None:
            return 0
        seen, work = previous
        work.wait()
        term, interrupt = seen.tolist()
        return int(signal.SIGTERM) if term else int(signal.SIGINT) if interrupt else 0

    def close(self) -> None:
        """Wait for the reduction still in flight (every rank started it: it completes)."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None
