"""Data parallelism and ZeRO (Rajbhandari et al. 2020) through FSDP2's ``fully_shard``.

Every replica runs the whole (stage of the) model on its slice of the batch; gradients are averaged
over the dp ranks, so the step equals one device's step on the whole batch. What each rank keeps
(measured byte for byte by tests/distributed/test_memory_accounting.py; the planner's
``loom.planner.memory.state_bytes`` computes the same figures):

    zero=0  everything replicated; gradients all-reduced. Without tensor, pipeline or expert
            parallelism (``Plan.replicated_dp``) this is torch's DDP through the composable
            ``replicate``: one copy of the weights, the gradients as views of DDP's buckets (one copy),
            each ~25 MB bucket all-reduced as soon as backward has filled it (overlap). With them it is
            FSDP over a shard group of one (DDP takes neither DTensor parameters nor torch's pipeline
            stages' split backward), so besides the master weights a gathered working copy exists from
            forward to backward (in bf16 under mixed precision; a second full copy in fp32 training)
    zero=1  master weights and optimizer state sharded; the working copy gathered for forward and kept
            until backward; whole gradients kept over accumulation micro-steps and reduce-scattered
            on the last one
    zero=2  gradients reduce-scattered every micro-step (with grad_accum=1 the same as zero=1)
    zero=3  the working copy freed after each block's forward and gathered again for its backward

Under a pipeline (pp > 1) torch's stages turn gradient reduction and resharding after backward off
for every micro-batch and reduce once, after the last: every stage then keeps whole gradients and the
gathered working copy until the step's end, so zero=2 and zero=3 hold what zero=1 holds.

zero 1–3 (and zero=0 under tp, pp or ep) are one mechanism: ``fully_shard`` over the 2-D mesh
``dp_replicate × dp_shard`` with ``dp_shard = 1`` for zero=0 and ``dp_shard = shard_group`` otherwise
(hybrid sharding when the shard group is smaller than dp). Each block is its own communication
bucket, so its all-reduce or reduce-scatter runs while the previous block's backward computes
(overlap). The embedding and the head stay in the root group, which keeps a tied embedding/output
weight one parameter.

Under expert parallelism the dense parameters are data-parallel over ``dp × ep`` ranks (``dp_mesh``,
from :func:`loom.parallel.mesh.dense_data_mesh`) and each MoE layer's experts, already split over ep, over
``dp`` alone (``expert_mesh``): they are their own group inside their block. With dp = 1 the experts
have no replica to talk to and FSDP leaves them alone.

Mixed precision (``param_dtype``): blocks compute and all-gather in bf16/fp16 while the sharded
fp32 parameters are the master weights and gradients are reduced in fp32. Without it (fp32, fp64)
everything stays in the parameters' own dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_data_parallel(module: nn.Module, dp_mesh: DeviceMesh, zero: int, param_dtype: torch.dtype | None,
                        blocks: str, own_groups: tuple[str, ...] = (), offload: bool = False,
                        reshard_after_forward: bool | None = None, expert_mesh: DeviceMesh | None = None,
                        expert_parallel: bool = False) -> None:
    """Shard (or replicate) ``module`` over ``dp_mesh`` (dims: replicate, shard), in place.
    ``module.<blocks>`` is a ModuleDict of blocks, each made its own group, as are the submodules
    named in ``own_groups`` (where this part of the model holds them). Parameters are gathered
    again for backward (``reshard_after_forward``) under ZeRO-3 only, unless told otherwise. With
    ``expert_parallel`` the experts of MoE layers go over ``expert_mesh`` (None: not at all)."""
    # gradients are reduced in the master weights' dtype: fp32 under autocast, float64 under fp64
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype is not None else None)
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    reshard = zero == 3 if reshard_after_forward is None else reshard_after_forward
    ignored: set[nn.Parameter] = set()
    for block in getattr(module, blocks).values():
        experts = getattr(block.mlp, "experts", None)
        if expert_parallel and experts is not None:
            if expert_mesh is not None:
                fully_shard(experts, mesh=expert_mesh, reshard_after_forward=reshard, mp_policy=mp,
                            offload_policy=policy)
            else:
                ignored.update(experts.parameters())
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=policy,
                    ignored_params=ignored or None)
    held = dict(module.named_modules())
    for name in (n for n in own_groups if n in held):
        fully_shard(held[name], mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=policy)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=policy,
                ignored_params=ignored or None)


def apply_replicate(module: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Plain data parallelism over the 1-D ``dp_mesh``, in place, with torch's DDP (composable
    ``replicate``: parameter names unchanged). Call it on the materialized module: DDP collects the
    parameter objects it reduces and, at the first forward, broadcasts rank 0's values (equal on
    every rank here: each initializes from the same seed). Gradients are views of DDP's buckets
    (``gradient_as_bucket_view``), so they take no memory beside them; buffers are not broadcast
    each step (no buffer here differs between replicas); ``find_unused_parameters`` covers a
    parameter a step leaves without a gradient (an expert no token was routed to)."""
    from torch.distributed._composable.replicate import replicate

    replicate(module, process_group=dp_mesh.get_group(), gradient_as_bucket_view=True, broadcast_buffers=False,
              find_unused_parameters=True)


def set_gradient_sync(modules: list[nn.Module], zero: int, last_micro_step: bool) -> None:
    """Before each accumulation micro-step: ZeRO-0/1 keep full local gradients and communicate
    once, on the last micro-step; ZeRO-2/3 reduce-scatter every micro-step so that only a shard of
    the gradient is ever kept. (DDP's modules, zero=0, have the same switch.)"""
    from torch.distributed._composable.replicate import DDP

    for m in modules:
        if isinstance(m, (FSDPModule, DDP)):
            m.set_requires_gradient_sync(last_micro_step or zero >= 2)
