"""The device mesh: one named axis per parallel dimension, built once and passed explicitly.

Ranks are laid out row-major over ``plan.mesh_order``, so the last axis varies fastest and its
groups are made of neighbouring ranks, i.e. devices of one node. The default order
``(pp, dp, tp)`` puts tensor parallelism, which communicates inside every layer, on the fastest
link (NVLink / one server), data parallelism across nodes, and pipeline stages outermost, as
Megatron-LM (Narayanan et al. 2021, section 3.3) and PanGu-α (Zeng et al. 2021) lay out their jobs.

The dp axis is two mesh dimensions, ``dp_replicate × dp_shard``: ZeRO shards over ``dp_shard`` and
replicates over ``dp_replicate`` (hybrid sharding); plain data parallelism is ``dp_shard = 1``.

The ep axis (expert parallelism) splits the experts of MoE layers; its ranks also take different
slices of the batch, so the dense layers are data-parallel over ``dp × ep`` ranks
(:func:`dense_data_mesh`) while the experts are over ``dp`` (:func:`expert_data_mesh`), as in GShard
and DeepSpeed-MoE. By default ep sits inside dp: its all-to-all is heavier than dp's all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from loom.parallel.plan import Plan


def mesh_shape(plan: Plan) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Sizes and names of the mesh dimensions, outermost first."""
    sizes: list[int] = []
    names: list[str] = []
    for axis in plan.mesh_order:
        if axis == "dp":
            sizes += [plan.dp_replicate, plan.shard_group]
            names += ["dp_replicate", "dp_shard"]
        else:
            sizes.append(getattr(plan, axis))
            names.append(axis)
    return tuple(sizes), tuple(names)


def build_mesh(plan: Plan, device_type: str) -> DeviceMesh:
    """The job's mesh over all ranks of the default process group."""
    sizes, names = mesh_shape(plan)
    return init_device_mesh(device_type, sizes, mesh_dim_names=names)


@dataclass(frozen=True)
class Coordinates:
    """Where this rank sits on each axis."""

    pp: int
    dp: int
    tp: int
    ep: int = 0

    def data(self, ep_size: int) -> int:
        """Index of this rank's slice of the batch among the ``dp × ep`` data-parallel replicas."""
        return self.dp * ep_size + self.ep


def coordinates(mesh: DeviceMesh) -> Coordinates:
    rep, shard = mesh["dp_replicate"].get_local_rank(), mesh["dp_shard"].get_local_rank()
    return Coordinates(pp=mesh["pp"].get_local_rank(), dp=rep * mesh["dp_shard"].size() + shard,
                       tp=mesh["tp"].get_local_rank(), ep=mesh["ep"].get_local_rank())


def _joined(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    """The 1-D mesh over the dimensions ``names`` together."""
    names = tuple(sorted(names, key=mesh.mesh_dim_names.index))
    return mesh[names[0]] if len(names) == 1 else mesh[names]._flatten("_".join(names))


def dense_data_mesh(mesh: DeviceMesh, zero: int) -> DeviceMesh:
    """The (replicate, shard) mesh over which the dense (non-expert) parameters are data-parallel:
    ``dp_replicate × dp_shard`` without expert parallelism. With it the ep ranks are data-parallel
    too: ZeRO shards over ``dp_shard × ep`` (zero >= 1), plain data parallelism replicates over
    ``dp_replicate × ep`` (zero = 0, where ``dp_shard`` has size 1)."""
    if mesh["ep"].size() == 1:
        return mesh["dp_replicate", "dp_shard"]
    if zero:
        return DeviceMesh._concatenate([mesh["dp_replicate"], _joined(mesh, ("dp_shard", "ep"))])
    return DeviceMesh._concatenate([_joined(mesh, ("dp_replicate", "ep")), mesh["dp_shard"]])


def expert_data_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The (replicate, shard) mesh over which each expert's weights are data-parallel: dp alone."""
    return mesh["dp_replicate", "dp_shard"]


def rank_of(mesh: DeviceMesh, **coord: int) -> int:
    """Global rank at a coordinate (axes not named: this rank's own coordinate)."""
    names = mesh.mesh_dim_names
    index = [coord.get(n, mesh.get_local_rank(n)) for n in names]
    return int(mesh.mesh[tuple(index)].item())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every rank (a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(t)
    return t
