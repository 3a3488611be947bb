"""Tasks: what a model is trained to do. Each owns its batches, loss, metrics and data checks
(:class:`~loom.tasks.base.Task`); a new task is one module here and one line in ``TASKS``."""

from __future__ import annotations

from loom.tasks.base import Batch, Task, slice_rows, to_device
from loom.tasks.causal_lm import CausalLM, lm_loss, lm_metrics
from loom.tasks.classification import Classification
from loom.tasks.image_classification import ImageClassification
from loom.tasks.masked_lm import MaskedLM
from loom.tasks.seq2seq import Seq2Seq
from loom.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {"causal_lm": CausalLM, "masked_lm": MaskedLM, "classification": Classification,
                              "image_classification": ImageClassification, "sft": SFT,
                              "seq2seq": Seq2Seq}

__all__ = ["SFT", "TASKS", "Batch", "CausalLM", "Classification", "ImageClassification", "MaskedLM", "Seq2Seq", "Task",
           "build_task", "lm_loss", "lm_metrics", "names", "slice_rows", "to_device"]


def names() -> tuple[str, ...]:
    return tuple(TASKS)


def build_task(name: str, data, block_size: int, batch_size: int, seed: int) -> Task:
    """The task ``name`` over ``data`` (a :class:`~loom.data.PreparedData`)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    cls = TASKS[name]
    if hasattr(cls, "from_data"):  # a task that reads more of the data than its token streams
        return cls.from_data(data, block_size, batch_size, seed)
    return cls(data.train, data.val, block_size, batch_size, seed)
