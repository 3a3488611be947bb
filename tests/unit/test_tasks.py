"""The task layer: a task owns its batches, loss, metrics and data checks; the family says which tasks
it trains for, and ``train.task`` chooses among them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loom.config import ConfigError, load_config, task_name
from loom.tasks import TASKS, CausalLM, build_task, lm_loss, slice_rows
from tests.distributed.parity import tiny_data


def _task(block: int = 16, batch: int = 8) -> CausalLM:
    return build_task("causal_lm", tiny_data(), block, batch, seed=3)


def test_causal_lm_batches_are_next_token_windows_of_the_step():
    task = _task()
    batch = task.train_batch(5, slice(0, 8))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (8, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])  # shifted by one token
    assert torch.equal(task.train_batch(5, slice(0, 8))["input_ids"], batch["input_ids"])  # a function of the step
    assert not torch.equal(task.train_batch(6, slice(0, 8))["input_ids"], batch["input_ids"])
    # a replica's rows are those rows of the global batch
    assert torch.equal(task.train_batch(5, slice(2, 4))["input_ids"], batch["input_ids"][2:4])
    assert torch.equal(slice_rows(batch, slice(2, 4))["labels"], batch["labels"][2:4])
    assert task.inputs(batch) == (batch["input_ids"],) and task.targets(batch) is batch["labels"]
    assert task.units(batch) == task.tokens(batch) == 8 * 16


def test_causal_lm_loss_and_metrics():
    task = _task()
    logits = torch.zeros(2, 4, 10, dtype=torch.bfloat16)
    targets = torch.randint(0, 10, (2, 4))
    loss = task.loss(logits, targets)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(math.log(10))  # uniform over 10
    assert lm_loss(logits.double(), targets).dtype == torch.float64  # never rounded down
    record = task.metrics(loss_sum=2.0 * 100, units=100)
    assert record == {"val_loss": 2.0, "val_ppl": pytest.approx(math.exp(2.0)), "val_tokens": 100}
    with pytest.raises(ValueError, match="no tokens"):
        task.metrics(0.0, 0)


def test_causal_lm_evaluation_is_the_same_every_time():
    task = _task(batch=4)
    first = [b["input_ids"] for b in task.eval_batches(3)]
    assert len(first) == 3 and all(torch.equal(a, b["input_ids"]) for a, b in zip(first, task.eval_batches(3)))


def test_data_too_short_for_one_sequence_is_one_line():
    short = tiny_data()
    short.val = np.zeros(10, dtype=np.uint16)
    with pytest.raises(ConfigError, match="the val split holds 10 tokens"):
        build_task("causal_lm", short, 16, 4, seed=0)
    with pytest.raises(KeyError, match="unknown task"):
        build_task("translation", tiny_data(), 16, 4, seed=0)


def test_train_task_is_the_familys_own_unless_chosen():
    assert set(TASKS) >= {"causal_lm"}
    assert task_name(load_config(None, ["model=pangu-tiny"])) == "causal_lm"
    assert task_name(load_config(None, ["train.task=causal_lm"])) == "causal_lm"
    with pytest.raises(ConfigError, match="train.task='classify' is not valid"):
        load_config(None, ["train.task=classify"])
