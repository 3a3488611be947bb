"""One optimizer step: the task's batch, forward and backward under the step's precision, the loss
scale, gradient clipping and the update, the same way under every layout.

The global batch of a step is ``train.batch_size`` sequences; the plan splits it into ``grad_accum``
accumulation micro-steps and, within each, one slice per data-parallel replica (dp × ep of them),
which a pipeline splits again into ``microbatches``. Every replica computes the mean loss of its
slice; gradients are averaged over replicas (data parallelism) and accumulation steps (the loss is
divided by their number), so the step equals one device's step on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loom.config import TrainConfig
from loom.parallel.mesh import all_reduce_sum
from loom.parallel.parallelize import ParallelModel
from loom.parallel.plan import Plan
from loom.tasks import Task, to_device
from loom.train.optim import build_optimizer, lr_at
from loom.train.precision import LossScaler, autocast


def build_optimizers(model: ParallelModel, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """One optimizer per model part; a parameter two parts share (the tied weight of a pipeline rank
    holding the first and the last stage) is updated by the first part's only."""
    seen: set[int] = set()
    optimizers = []
    for m in model.modules:
        own = [p for p in m.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        optimizers.append(build_optimizer(m, cfg, own))
    return optimizers


@dataclass
class StepResult:
    loss: torch.Tensor  # (sum, count) over the ranks that know the loss: see mean_over_replicas
    grad_norm: torch.Tensor  # global, before clipping
    moe: torch.Tensor | None  # this rank's share of the MoE statistics (None for a dense model)
    tokens: int  # input tokens of this replica's rows (throughput)


class TrainingStep:
    """The step of one rank: its share of the model, the task's batches, the optimizers."""

    def __init__(self, model: ParallelModel, task: Task, plan: Plan, cfg: TrainConfig, replica: int,
                 device: torch.device):
        self.model, self.task, self.plan, self.cfg = model, task, plan, cfg
        self.replica, self.device = replica, device
        self.optimizers = build_optimizers(model, cfg)
        self.scaler = LossScaler(device, cfg.precision)

    def rows(self, micro_step: int) -> slice:
        """This replica's rows of the global batch in accumulation micro-step ``micro_step``."""
        micro = self.cfg.batch_size // self.plan.grad_accum
        per_replica = micro // self.plan.data_parallel
        first = micro_step * micro + self.replica * per_replica
        return slice(first, first + per_replica)

    def __call__(self, step: int) -> StepResult:
        """Forward and backward over the ``grad_accum`` micro-steps of optimizer step ``step``, then
        the update."""
        lr = lr_at(step, self.cfg)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        accum = self.plan.grad_accum
        # (loss sum, 1 where this rank knows the loss), in float64 whatever the precision: a reduction
        # that must not round differently under different layouts
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        tokens = 0
        for i in range(accum):
            batch = to_device(self.task.train_batch(step, self.rows(i)), self.device)
            tokens += self.task.tokens(batch)
            with autocast(self.device, self.cfg.precision):
                loss = self.model.forward_backward(self.task.inputs(batch), self.task.targets(batch),
                                                   lambda v: self.scaler.scale(v / accum),
                                                   last_micro_step=i == accum - 1)
            if loss is not None:
                total += torch.stack([loss.double(), torch.ones((), device=self.device, dtype=torch.float64)]) / accum
        self.model.after_backward()
        moe = self.model.take_moe_stats()
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        grad_norm = self.model.clip_grads_(self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        self.scaler.step(self.optimizers, grad_norm, step)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return StepResult(total, grad_norm, moe, tokens)


def mean_over_replicas(parts: torch.Tensor) -> torch.Tensor:
    """Losses as (..., 2) pairs (sum, count) from :class:`TrainingStep` -> the mean over the ranks that
    know them (every replica's last pipeline stage): the global batch's mean loss."""
    parts = all_reduce_sum(parts.clone())
    return parts[..., 0] / parts[..., 1]
