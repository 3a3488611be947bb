"""Deciding a job's plan: once, at the top, before any process starts.

``parallel.auto=true`` asks the planner for the fastest plan that fits this machine; otherwise the
config's ``parallel`` section says it (:func:`loom.parallel.plan.resolve_plan`). Either way the plan is
checked and the config made to record it, and both are handed down: nothing below decides the layout
again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from loom.config import Config, ConfigError
from loom.parallel.plan import Plan, check_plan, resolve_plan, with_plan
from loom.planner.cost import padded_model
from loom.planner.hardware import Cluster, parse_cluster
from loom.planner.search import search


def plan_job(cfg: Config, world_size: int, device_type: str) -> tuple[Config, Plan]:
    """The plan of ``cfg`` on ``world_size`` processes of ``device_type``, checked, and ``cfg`` saying it."""
    if cfg.parallel.auto:
        return auto_plan(cfg, world_size, device_type)
    plan = resolve_plan(cfg, world_size)
    check_plan(plan, cfg, world_size)
    return with_plan(cfg, plan), plan


def local_cluster(world: int, device_type: str, profile: str | Path | None = None) -> Cluster:
    """The machine this job runs on, as the planner sees it: ``world`` GPUs of the catalogue kind
    whose name matches the device's, or ``world`` CPU processes (with ``loom calibrate``'s profile
    when there is one)."""
    kind = "cpu"
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name().lower()
        big = torch.cuda.get_device_properties(0).total_memory > 60 * 2**30
        kind = ("h200" if "h200" in name else "h100-sxm" if "h100" in name
                else ("a100-80g" if big else "a100-40g") if "a100" in name else "a100-80g")
    from loom.planner.calibrate import default_profile_path

    if profile is None and kind == "cpu" and default_profile_path().is_file():
        profile = default_profile_path()
    return parse_cluster(f"{world}x{kind}", profile)


def auto_plan(cfg: Config, world: int, device_type: str) -> tuple[Config, Plan]:
    """The planner's fastest plan for ``cfg`` that fits this machine and that loom's own checks accept
    (its vocabulary padded for tp when the plan needs it), and ``cfg`` saying it."""
    cluster = local_cluster(world, device_type)
    for e in search(cfg.model, cluster, cfg.train.batch_size, cfg.model.block_size):
        if not e.fits:
            break
        candidate = dataclasses.replace(cfg, model=padded_model(cfg.model, e.vocab_size))
        try:
            check_plan(e.plan, candidate, world)
        except ConfigError:
            continue
        return with_plan(candidate, e.plan), e.plan
    raise ConfigError(f"parallel.auto=true: no layout of model={cfg.model.preset} with train.batch_size="
                      f"{cfg.train.batch_size} fits {cluster.describe()}")
