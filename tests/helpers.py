"""Helpers several test modules share."""

from __future__ import annotations

from loom.planner.auto import plan_job
from loom.train.job import train as train_job


def train(cfg, run_dir, resume: bool = False) -> dict:
    """A one-process training job, its plan decided at the top as ``loom train`` decides it."""
    cfg, plan = plan_job(cfg, 1, "cpu")
    return train_job(cfg, plan, run_dir, resume=resume)
