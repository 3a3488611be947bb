"""``parallel.offload`` reaches FSDP: on a CPU the host is the device, so no byte count can tell an
offloading run from one that keeps its state in place (tests/distributed/test_memory_accounting.py says
why; a CUDA run would count them). What a CPU can show is the wiring: every FSDP group of the model
``parallelize`` builds for a dp=2 plan carries torch's ``CPUOffloadPolicy`` and each of its parameters
is marked to be kept in host memory, for ``offload=optimizer`` and ``offload=params``, and none is for
``offload=none``. An offload turned into a no-op (the policy not handed to ``fully_shard``) fails it.

The two ranks are one process under torch's fake process group (collectives do nothing), which is
enough to build and shard the model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

from loom.config import load_config
from loom.models import build_model, spec_of
from loom.parallel.mesh import build_mesh
from loom.parallel.parallelize import parallelize
from loom.parallel.plan import check_plan, resolve_plan
from loom.tasks import lm_loss


@pytest.fixture
def two_fake_ranks():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("zero, offload", [(2, "none"), (2, "optimizer"), (3, "none"), (3, "params")])
def test_every_fsdp_group_offloads_exactly_when_asked(zero, offload, two_fake_ranks):
    cfg = load_config(None, ["model=gpt-tiny", "parallel.dp=2", f"parallel.zero={zero}", f"parallel.offload={offload}"])
    plan = resolve_plan(cfg, 2)
    check_plan(plan, cfg, 2)
    pm = parallelize(build_model(cfg.model), plan, build_mesh(plan, "cpu"), spec=spec_of(cfg.model),
                     loss_fn=lm_loss, device=torch.device("cpu"), seed=0)
    groups = [m._get_fsdp_state()._fsdp_param_group for m in pm.modules[0].modules() if isinstance(m, FSDPModule)]
    groups = [g for g in groups if g is not None]
    assert len(groups) == cfg.model.n_layer + 1  # each block, and the rest at the root
    params = [p for g in groups for p in g.fsdp_params]
    assert len(params) == len(list(pm.parameters()))
    wanted = offload != "none"
    assert all(isinstance(g.offload_policy, CPUOffloadPolicy) is wanted for g in groups)
    assert all(p.offload_to_cpu is wanted for p in params)
