"""The rank side of tests/distributed/test_hf_t5_shards.py: a T5 imported from a Hugging Face directory
into its share of the model under a layout (this module does not import ``transformers``)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from loom.config import load_config
from loom.models import build_model, spec_of
from loom.models.hf import hf_model_settings
from loom.parallel.mesh import build_mesh
from loom.parallel.parallelize import parallelize
from loom.parallel.plan import check_plan, resolve_plan
from loom.train.hf import load_hf_weights
from tests.distributed.parity import process_of_this_rank

LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2", "parallel.microbatches=2"]}


def loaded(path: str, layout: list[str]) -> dict[str, torch.Tensor]:
    """Every parameter this rank holds after importing ``path`` under ``layout``, whole (DTensors gathered)."""
    process = process_of_this_rank()
    cfg = load_config(None, ["train.batch_size=2", *layout], settings=hf_model_settings(path))
    plan = resolve_plan(cfg, process.world_size)
    check_plan(plan, cfg, process.world_size)
    mesh = build_mesh(plan, "cpu") if process.world_size > 1 else None
    pm = parallelize(build_model(cfg.model), plan, mesh, spec=spec_of(cfg.model), loss_fn=lambda out, tgt: out.sum(),
                     device=torch.device("cpu"), seed=0)
    load_hf_weights(pm.modules, cfg.model, path)
    out = {}
    for m in pm.modules:
        for name, p in m.named_parameters():
            out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def load_cases(paths: dict[str, str]) -> dict:
    return {(model, layout): loaded(path, LAYOUTS[layout]) for model, path in paths.items() for layout in LAYOUTS}
