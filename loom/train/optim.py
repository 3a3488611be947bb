"""Optimizers and the learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) is torch's own; LAMB (You et al. 2020, "Large Batch Optimization
for Deep Learning: Training BERT in 76 minutes", Algorithm 2) is written here. Weight decay applies
to matrices only (``p.dim() >= 2``): embeddings and linear weights decay, biases and norms do not.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loom.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, params: list[nn.Parameter] | None = None) -> list[dict]:
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # no empty group (LoRA trains matrices only): torch's flattened optimizer state cannot reload one
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, params: list[nn.Parameter] | None = None
                    ) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s parameters (or of ``params``, a subset of them)."""
    groups = param_groups(model, cfg.weight_decay, params)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    # torch's fused kernel: one pass over each parameter's weights, gradient and moments (on a 2-core CPU
    # 5-6x faster than the foreach path, benchmarks/RESULTS.md, "MoE"), where the device has one
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) \
        else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **fused)


class Lamb(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments for Batch training.

    For each parameter tensor (a "layer") with gradient g at step t:

        m = β1 m + (1 - β1) g,     v = β2 v + (1 - β2) g²
        u = m̂ / (sqrt(v̂) + ε) + λ w        (m̂, v̂ bias-corrected)
        r = ||w|| / ||u||                    (1 when either norm is 0)
        w ← w - lr · r · u

    The trust ratio r gives each layer a step proportional to its own weight norm, which is what
    lets the batch grow large without the early layers diverging.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, bias_correction: bool = True):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr}, betas={betas}, eps={eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].double()  # a tensor: the bias corrections need no host sync
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                c1 = (1 - beta1**t).to(p.dtype) if group["bias_correction"] else 1.0
                c2 = (1 - beta2**t).to(p.dtype) if group["bias_correction"] else 1.0
                update = (m / c1) / ((v / c2).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(group["lr"] * trust * update)
        return loss


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at the
    last step (or constant). A pure function of the step, so a resumed run needs no schedule state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)  # the last step run is steps - 1
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
