"""``loom eval``: a trained model's metrics on its task's held-out split, on one device."""

from __future__ import annotations

import torch
from torch import nn

from loom.tasks import Task, to_device
from loom.train.precision import autocast


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, max_batches: int, device: torch.device, precision: str = "fp32") -> dict:
    """The task's metrics over its first ``max_batches`` held-out batches, weighted by its units."""
    was_training = model.training
    model.eval()
    total, count, counts = 0.0, 0, {}
    for batch in task.eval_batches(max_batches):
        batch = to_device(batch, device)
        with autocast(device, precision):
            outputs = model(*task.inputs(batch))
        units = task.units(batch)
        total += task.loss(outputs, task.targets(batch)).item() * units
        count += units
        if hasattr(task, "eval_counts"):  # a task with metrics beyond its loss (accuracy, F1): sums over batches
            for k, v in task.eval_counts(outputs, batch).items():
                counts[k] = counts[k] + v if k in counts else v
    model.train(was_training)
    return {**task.metrics(total, count), **(task.count_metrics(counts) if counts else {})}
