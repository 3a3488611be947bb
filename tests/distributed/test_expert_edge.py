"""Expert parallelism when an ep rank's experts receive no token at all (a router that sends every
token to one expert, as a collapsing one does): every rank still takes part in every all-to-all of
the backward, and the outputs and input gradients are those of one device, and the idle experts get a zero gradient
(not none), as data parallelism needs of them."""

from __future__ import annotations

import torch
import torch.distributed as dist

from loom.config import load_config
from loom.models.common import MoE
from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import ATOL, RTOL


def _layer() -> MoE:
    cfg = load_config(None, ["model=switch-tiny", "model.moe.capacity_factor=0"]).model
    torch.manual_seed(0)
    layer = MoE(cfg).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 100.0  # feature 0 is 1 below: every token goes to expert 0
    return layer


def _inputs(rank: int) -> torch.Tensor:
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    x[..., 0] = 1.0
    return x.requires_grad_(True)


def _forward_backward(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad


def _worker() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from loom.parallel.expert import apply_expert_parallel

    rank = dist.get_rank()
    reference = _forward_backward(_layer().train(), _inputs(rank))  # this rank's rows on one device
    layer = _layer().train()
    apply_expert_parallel(layer, init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)))
    got = _forward_backward(layer, _inputs(rank))
    grads = {n: None if p.grad is None else p.grad.to_local().abs().sum().item()
             for n, p in layer.experts.named_parameters()}
    return {"got": got, "reference": reference, "load": layer.stats[-1][:8].tolist(), "expert_grads": grads}


def test_an_expert_rank_without_tokens_still_joins_the_backward():
    ranks = run_on_ranks(2, _worker, timeout=180)
    for r in ranks:
        assert r["load"] == [16.0] + [0.0] * 7  # rank 1's experts (4-7) get nothing from anyone
        for got, want in zip(r["got"], r["reference"]):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    # the experts that saw no token have a gradient all the same, zero, as their replicas elsewhere would
    assert all(g == 0.0 for g in ranks[1]["expert_grads"].values()), ranks[1]["expert_grads"]
    assert all(g is not None and g > 0 for g in ranks[0]["expert_grads"].values()), ranks[0]["expert_grads"]
