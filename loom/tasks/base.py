"""What a task is: it owns the batches (a dict of tensors), which of them the model reads and which
the loss reads, the loss, the evaluation metrics, the checks on the data, and the unit throughput is
counted in. The trainer and the parallel engine know nothing else of what is being learned.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loom.errors import ConfigError
from loom.models.common.numerics import at_least_fp32

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


class OneLabelTask(Task):
    """A task whose every example has one label of ``n_classes`` (sequence or image classification):
    batches carry ``labels`` (B,); the loss is the mean cross-entropy over the rows (every row counts
    once, so every layout's averaging is exact); ``loom eval`` reports accuracy and macro-F1 beside the
    majority-class baseline. A subclass sets ``label_names``, ``n_classes`` and ``majority`` (the
    most frequent training label)."""

    label_names: list[str]
    n_classes: int
    majority: int
    example_noun = "examples"  # what the evaluation counts, for its error message

    def targets(self, batch: Batch) -> torch.Tensor:
        return batch["labels"]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(outputs), targets)

    def units(self, batch: Batch) -> int:
        return batch["labels"].numel()

    def metrics(self, loss_sum: float, units: int) -> dict:
        if units == 0:
            raise ValueError(f"evaluation saw no {self.example_noun}")
        return {"val_loss": loss_sum / units, "val_examples": units}

    def eval_counts(self, outputs: torch.Tensor, batch: Batch) -> dict[str, np.ndarray]:
        """The confusion matrix of a batch (true label, predicted label)."""
        k = self.n_classes
        pairs = batch["labels"].cpu() * k + outputs.argmax(-1).cpu()
        return {"confusion": torch.bincount(pairs, minlength=k * k).view(k, k).numpy().astype(np.float64)}

    def count_metrics(self, c: dict) -> dict:
        return {**classification_metrics(c["confusion"], self.majority), "labels": self.label_names}


def classification_metrics(confusion: np.ndarray, majority: int) -> dict:
    """Accuracy and macro-F1 (the unweighted mean of each label's F1) from a (true, predicted)
    confusion matrix, and the majority-class baseline's accuracy and macro-F1 on the same examples."""
    total = confusion.sum()
    tp = np.diag(confusion)
    f1 = 2 * tp / np.maximum(confusion.sum(0) + confusion.sum(1), 1)
    support = confusion.sum(1)
    base_f1 = np.zeros_like(f1)
    base_f1[majority] = 2 * support[majority] / (total + support[majority])
    return {"accuracy": float(tp.sum() / total), "macro_f1": float(f1.mean()),
            "majority_accuracy": float(support[majority] / total), "majority_macro_f1": float(base_f1.mean()),
            "examples": int(total)}


def slice_rows(batch: Batch, rows: slice) -> Batch:
    """Rows ``rows`` of every tensor of ``batch``."""
    return {k: v[rows] for k, v in batch.items()}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def read_jsonl_pairs(files: Iterable[Path], fields: tuple[str, str], what: str) -> list[tuple[str, str]]:
    """The (``fields[0]``, ``fields[1]``) strings of every record of the ``.jsonl`` ``files``, in order
    (blank lines skipped); a line that is not JSON, or a record without both string fields, is one
    line naming the file, the line and ``what`` reads it (e.g. ``train.task=sft``)."""
    a, b = fields
    records = []
    for f in files:
        for n, line in enumerate(Path(f).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{f}:{n}: invalid JSON ({e})") from None
            if not (isinstance(r, dict) and isinstance(r.get(a), str) and isinstance(r.get(b), str)):
                raise ConfigError(f"{f}:{n}: a {what} record needs string fields {a} and {b}")
            records.append((r[a], r[b]))
    return records
