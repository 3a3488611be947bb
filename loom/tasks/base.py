"""What a task is: it owns the batches (a dict of tensors), which of them the model reads and which
the loss reads, the loss, the evaluation metrics, the checks on the data, and the unit throughput is
counted in. The trainer and the parallel engine know nothing else of what is being learned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

Batch = dict[str, torch.Tensor]  # every tensor's first dimension is the batch's rows (sequences)


class Task(ABC):
    """One task over one prepared dataset; made by :func:`loom.tasks.build_task`."""

    name: str = ""

    @abstractmethod
    def train_batch(self, step: int, rows: slice) -> Batch:
        """Rows ``rows`` of the global training batch of optimizer step ``step``: a function of the
        seed and the step alone, so a resumed run sees the batches an uninterrupted one would."""

    @abstractmethod
    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        """The first ``max_batches`` batches of the held-out split, the same every time."""

    @abstractmethod
    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """What the model (its first pipeline stage) reads."""

    @abstractmethod
    def targets(self, batch: Batch) -> torch.Tensor:
        """What the loss (on the last pipeline stage) compares the model's output with."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch (or micro-batch) over its units, in at least fp32."""

    @abstractmethod
    def units(self, batch: Batch) -> int:
        """How many units (tokens) the loss of ``batch`` averages over: its weight in a mean over
        batches."""

    def tokens(self, batch: Batch) -> int:
        """Input tokens of ``batch``, what throughput (tokens/s, MFU) counts; from shapes alone, so
        counting costs no device synchronization."""
        return self.inputs(batch)[0].numel()

    @abstractmethod
    def metrics(self, loss_sum: float, units: int) -> dict:
        """The evaluation record from the unit-weighted loss sum over ``units`` scored units."""


def slice_rows(batch: Batch, rows: slice) -> Batch:
    """Rows ``rows`` of every tensor of ``batch``."""
    return {k: v[rows] for k, v in batch.items()}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
