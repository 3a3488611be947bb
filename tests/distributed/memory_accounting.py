"""Count the bytes of parameters, gradients and optimizer state a rank holds during a training step.

Storage bytes, not the resident set: every tensor is counted by its storage (``untyped_storage``,
deduplicated by data pointer), so views share their bytes, and a storage FSDP has freed (resized to
0 bytes) counts nothing. Parameters are counted wherever FSDP keeps them: the sharded parameter, the
gathered (unsharded) working copy when it is allocated, and the all-gather buffers.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t):
    return t._local_tensor if isinstance(t, DTensor) else t


def _fsdp_params(modules: list[nn.Module]):
    from torch.distributed.fsdp import FSDPModule

    for m in modules:
        for sub in m.modules():
            if isinstance(sub, FSDPModule):
                group = sub._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    yield from group.fsdp_params


def _tensors(modules: list[nn.Module], optimizers) -> dict[str, list[torch.Tensor]]:
    params, grads, opt = [], [], []
    for m in modules:
        for p in m.parameters():
            params.append(_local(p))
            if p.grad is not None:
                grads.append(_local(p.grad))
    for fp in _fsdp_params(modules):
        params.append(_local(fp.sharded_param))
        if fp.sharded_param.grad is not None:
            grads.append(_local(fp.sharded_param.grad))
        for name in ("_sharded_param_data", "_sharded_post_forward_param_data"):
            t = getattr(fp, name, None)
            if isinstance(t, torch.Tensor):
                params.append(t)
        if hasattr(fp, "_unsharded_param"):
            params.append(fp._unsharded_param)
            if fp._unsharded_param.grad is not None:
                grads.append(fp._unsharded_param.grad)
        for t in getattr(fp, "all_gather_outputs", []) or []:
            params.append(t)
        acc = getattr(fp, "unsharded_accumulated_grad", None)
        if acc is not None:
            grads.append(acc)
    for o in optimizers:
        for state in o.state.values():
            opt.extend(_local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": params, "grads": grads, "optimizer": opt}


def held_bytes(modules: list[nn.Module], optimizers, device: str | None = None) -> dict[str, int]:
    """Bytes of each kind held now (on ``device``'s type, or anywhere when None); a storage shared by
    two kinds counts in the first (params, grads, optimizer)."""
    seen: set[int] = set()
    out = {}
    for kind, ts in _tensors(modules, optimizers).items():
        total = 0
        for t in ts:
            s = _local(t).untyped_storage()
            if device is not None and t.device.type != device:
                continue
            if s.nbytes() == 0 or s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
        out[kind] = total
    return out


# --------------------------------------------------------------------------------------------
# A step under a layout, with the held bytes counted at the points the planner's figures describe


def measure_step(layout: list[str], process, model: str = "gpt") -> dict:
    """Train two steps of ``model`` under ``layout`` on this rank and return the largest bytes of each
    kind held at the end of every forward, at the end of every micro-batch's backward (each pipeline
    stage's too) and after the update, during the second step (the optimizer state exists by then),
    with this rank's pipeline coordinate and the resolved plan."""
    from torch.distributed.pipelining.stage import _PipelineStageBase

    from tests.distributed.parity import trainer

    t = trainer(model, layout, process)
    pm, peak = t.model, {}

    def snap(*_):
        for kind, n in held_bytes(pm.modules, t.optimizers).items():
            peak[kind] = max(peak.get(kind, 0), n)

    hooks = [m.register_forward_hook(snap) for m in pm.modules]
    forward_backward, stage_backward = pm.forward_backward, _PipelineStageBase.backward_maybe_with_nosync

    def counted_forward_backward(*args, **kwargs):
        out = forward_backward(*args, **kwargs)
        snap()
        return out

    def counted_stage_backward(self, *args, **kwargs):
        out = stage_backward(self, *args, **kwargs)
        snap()
        return out

    pm.forward_backward = counted_forward_backward
    _PipelineStageBase.backward_maybe_with_nosync = counted_stage_backward
    try:
        t.train_step(0)
        peak.clear()
        t.train_step(1)
        snap()
    finally:
        _PipelineStageBase.backward_maybe_with_nosync = stage_backward
        for h in hooks:
            h.remove()
    return {"held": peak, "pp_rank": t.coord.pp if t.coord else 0, "plan": t.plan}


def measure_layouts(cases: dict[str, list[str]]) -> dict:
    """On every rank of a gloo job: ``{name: measure_step(layout)}``; a layout whose first entry is
    ``sabotage:zero`` runs with ZeRO turned into a no-op (the dense parameters data-parallel over a
    shard group of one, whatever parallel.zero says; for a layout that is data-parallel over every rank);
    ``sabotage:fsdp_zero0`` runs zero=0 through FSDP over a shard group of one instead of DDP."""
    import unittest.mock

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from loom.parallel.launch import Process

    parallelize = importlib.import_module("loom.parallel.parallelize")

    process = Process(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    out = {}
    for name, layout in cases.items():
        sabotage = [o for o in layout if o.startswith("sabotage:")]
        layout = [o for o in layout if not o.startswith("sabotage:")]
        with contextlib.ExitStack() as stack:
            if "sabotage:zero" in sabotage:  # a data-parallel layout over the whole world, replicated
                replicated = init_device_mesh("cpu", (process.world_size, 1), mesh_dim_names=("replicate", "shard"))
                stack.enter_context(unittest.mock.patch.object(
                    parallelize, "dense_data_mesh", lambda mesh, zero: replicated))
            if "sabotage:fsdp_zero0" in sabotage:  # zero=0 through FSDP's shard group of one, not DDP
                from loom.parallel.plan import Plan

                stack.enter_context(unittest.mock.patch.object(Plan, "replicated_dp", property(lambda self: False)))
            out[name] = measure_step(layout, process)
    return out


def planned_bytes(layout: list[str], plan, pp_rank: int, model: str = "gpt") -> dict[str, float]:
    """The planner's figures (:func:`loom.planner.memory.state_bytes`) for the same model and plan."""
    from loom.planner.memory import state_bytes
    from loom.planner.shape import model_shape, stage_blocks
    from tests.distributed.parity import config

    cfg = config(model, [o for o in layout if not o.startswith("sabotage:")])
    sh = model_shape(cfg.model, cfg.model.block_size)
    stages = stage_blocks(sh, plan.pp * (plan.virtual_stages if plan.pp > 1 else 1))
    held = state_bytes(sh, stages, plan, cfg.train.precision, plan.grad_accum)[pp_rank]
    return {"params": held["weights"], "grads": held["grads"], "optimizer": held["optimizer"]}
