"""Expert parallelism (GShard, Lepikhin et al. 2021): the experts of every MoE layer split over the
``ep`` ranks, tokens sent to their experts' rank and back with all-to-all.

Each ep rank holds ``E / ep`` whole experts (its expert weights are DTensors sharded along the expert
dimension: never replicated across ep) and its own slice of the batch. An MoE layer routes its own
tokens exactly as on one device (:mod:`loom.models.common.moe`: routing, capacity and the auxiliary losses are
per sequence), sorts them by expert, and then, in place of running all E experts itself:

1. tells every ep rank how many tokens it will send for each of that rank's experts (all-to-all of
   the counts),
2. sends each rank the slice of sorted tokens for its experts (all-to-all with uneven splits),
3. runs its local experts on what it received, regrouped by expert,
4. sends the outputs back the same way (the inverse all-to-all), in the order they came.

Both all-to-alls are differentiable (torch's functional ``all_to_all_single_autograd``), so backward
sends the gradients the opposite way. An expert's gradient then holds the contributions of the
tokens of all ep ranks, each rank's loss being the mean over its own slice: the data-parallel average
needs one more division by ep, which :func:`expert_grad_factor` gives to the training step.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from loom.models.common.moe import Experts, MoE, expert_ffn

EXPERT_PARAM = ".experts."  # in the name of every expert weight (an MoE layer's ``experts`` module)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Split the experts of each MoE layer in ``model`` over the 1-D ``ep_mesh``, in place (meta
    models too: nothing is communicated then). Parameter names do not change."""
    src = None if any(p.is_meta for p in model.parameters()) else 0
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        experts = module.experts
        for name, p in list(experts.named_parameters(recurse=False)):
            dt = distribute_tensor(p.detach(), ep_mesh, [Shard(0)], src_data_rank=src)
            experts.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        experts.forward = types.MethodType(_make_forward(ep_mesh), experts)


def expert_grad_factor(name: str, ep: int) -> float:
    """What the gradient of parameter ``name`` is multiplied by after backward under expert
    parallelism: 1/ep for expert weights (see the module's docstring), 1 for the rest."""
    return 1.0 / ep if EXPERT_PARAM in name else 1.0


def _local(p: torch.Tensor | None) -> torch.Tensor | None:
    return p.to_local() if isinstance(p, DTensor) else p


def _make_forward(mesh: DeviceMesh):
    group = mesh.get_group()
    ep = mesh.size()

    def forward(self: Experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` (M, C): this rank's tokens sorted by (global) expert, ``counts`` (E,) per expert."""
        per_rank = counts.numel() // ep
        send = counts.view(ep, per_rank)  # row r: tokens for rank r's experts
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # row s: what rank s sends for my experts
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = all_to_all_single_autograd(x, recv_splits, send_splits, group)  # by (source, expert)
        # regroup by (expert, source) for the local experts, run them, and put the outputs back
        by_source = recv.reshape(-1)
        slot = torch.repeat_interleave(torch.arange(by_source.numel(), device=x.device), by_source)
        expert_of = slot % per_rank
        order = torch.argsort(expert_of * ep + slot // per_rank, stable=True)
        y = expert_ffn(received.index_select(0, order), recv.sum(0).tolist(), _local(self.w1), _local(self.b1),
                       _local(self.w2), _local(self.b2))
        back = torch.empty_like(y).index_copy(0, order, y)
        return all_to_all_single_autograd(back, send_splits, recv_splits, group)

    return forward
