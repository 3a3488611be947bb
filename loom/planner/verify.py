"""A dry run at full scale: does each rank hold the parameters the cost model assumed?

For a few ranks of a layout's job (``loom plan ... --verify``), one at a time in this process: start a
*fake* process group of the whole world size (torch's ``fake`` backend: every collective returns at
once, nothing is communicated), build the job's device mesh and the model on the meta device, and
apply the plan with :func:`loom.parallel.parallelize.parallelize` as training does (pipeline split,
tensor, expert and data parallelism) but stop before anything is allocated. Then count what that rank
holds and compare it with the cost model (:mod:`loom.planner.cost`):

``params_counted``          parameters of this rank before ZeRO sharding: a DTensor counts the shape of
                            its local piece under its tensor- and expert-parallel placements only
                            (what ``Estimate.params_per_device`` means), a plain tensor its numel
``params_sharded``          what the rank keeps at rest after ZeRO: each DTensor's local shard
``params_predicted``        the cost model's figure for that rank's pipeline stage(s)

A 200B-parameter model on 2048 ranks takes seconds per rank: the meta device holds shapes only.
Each rank's check starts and destroys its own process group; when this process already has one (a
distributed job), or with ``isolate=True``, the checks run in a fresh Python subprocess instead.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from loom.models import ModelConfig, MoEConfig
from loom.parallel.plan import Plan
from loom.planner.cost import padded_model
from loom.planner.shape import model_shape, rank_stages, stage_blocks, stage_params

# mesh dimensions that only split a parameter: their placements are ZeRO's, not the layout's
MODEL_AXES = ("tp", "ep")


def rank_at(plan: Plan, **coord: int) -> int:
    """The global rank at a mesh coordinate (axes not named: 0), e.g. ``rank_at(plan, pp=3)``."""
    from loom.parallel.mesh import mesh_shape

    sizes, names = mesh_shape(plan)
    grid = torch.arange(plan.world_size).view(sizes)
    return int(grid[tuple(coord.get(n, 0) for n in names)].item())


def default_ranks(plan: Plan) -> list[int]:
    """One rank each of the first, the middle and the last pipeline rank (fewer when pp < 3): the first
    rank of each, which holds the largest piece of an unevenly split tensor (the vocabulary)."""
    return [rank_at(plan, pp=s) for s in sorted({0, plan.pp // 2, plan.pp - 1})]


def verify(cfg: ModelConfig, plan: Plan, ranks: list[int] | None = None, *, seq: int | None = None,
           isolate: bool = False, vocab_size: int = 0) -> list[dict]:
    """Check the parameters ranks ``ranks`` (default :func:`default_ranks`) of ``plan``'s job hold
    against the cost model's prediction for sequences of ``seq`` tokens (default ``cfg.block_size``),
    the vocabulary padded to ``vocab_size`` if given.

    One dict per rank: ``rank``, ``stage`` (its pipeline rank), ``stages`` (the pipeline stages it holds),
    ``blocks`` / ``blocks_predicted`` (the decoder blocks it holds / the cost model puts there),
    ``params_counted``, ``params_predicted``, ``relative_difference`` ((counted - predicted) / predicted),
    ``params_predicted_same_blocks`` (the cost model's figure for the blocks the rank really holds),
    ``params_sharded`` / ``params_sharded_predicted`` (after ZeRO sharding), ``seconds`` (of the rank's
    dry run)."""
    import torch.distributed as dist

    cfg = padded_model(cfg, vocab_size)  # the vocabulary padded for tp, if the plan pads it
    world = plan.world_size
    ranks = default_ranks(plan) if ranks is None else list(ranks)
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise ValueError(f"ranks {bad} are outside the job's {world} ranks")
    shape = model_shape(cfg, seq or cfg.block_size)
    predicted = predict(cfg, plan, split="cost", shape=shape)
    same_blocks = predict(cfg, plan, split="engine", shape=shape)
    if isolate or (dist.is_available() and dist.is_initialized()):
        counts = _count_in_subprocess(cfg, plan, ranks)
    else:
        counts = [count_rank(cfg, plan, r) for r in ranks]
    rows = []
    for counted in counts:
        pred = predicted[counted["stage"]]
        rows.append({
            "rank": counted["rank"], "stage": counted["stage"], "stages": counted["stages"],
            "blocks": counted["blocks"], "blocks_predicted": pred["blocks"],
            "params_counted": counted["params"], "params_predicted": pred["params"],
            "relative_difference": (counted["params"] - pred["params"]) / max(1, pred["params"]),
            "params_predicted_same_blocks": same_blocks[counted["stage"]]["params"],
            "params_sharded": counted["params_sharded"], "params_sharded_predicted": pred["params_sharded"],
            "seconds": counted["seconds"],
        })
    return rows


# --------------------------------------------------------------------------------------------
# The cost model's side
# --------------------------------------------------------------------------------------------


def predict(cfg: ModelConfig, plan: Plan, seq: int | None = None, split: str = "cost",
            shape=None) -> list[dict]:
    """Per pipeline rank, what the cost model assumes it holds: ``blocks`` (decoder block indices),
    ``params`` (before ZeRO, as ``Estimate.params_per_device`` counts the fullest of them) and
    ``params_sharded`` (after ZeRO: dense parameters over dp × ep, expert parameters over dp).

    ``split="cost"``: the blocks of each stage as the cost model splits them; ``"engine"``: as the
    pipeline does (:func:`loom.parallel.pipeline.stage_layout`, with its virtual stages), so that a
    difference left is one of the per-stage formula, not of the split. ``shape``: the cost model's
    ``model_shape(cfg, seq)``, if already made."""
    from loom.parallel.pipeline import stage_layout

    sh = shape or model_shape(cfg, seq or cfg.block_size)
    v = plan.virtual_stages if plan.pp > 1 else 1
    if split == "engine":
        stages = [list(spec.blocks) for spec in stage_layout(cfg, plan.pp * v)]
    elif split == "cost":
        stages = stage_blocks(sh, plan.pp * v)
    else:
        raise ValueError(f"split={split!r}: use 'cost' or 'engine'")
    out = []
    for held in rank_stages(plan):
        dense = experts = 0.0
        for si in held:
            d, e = stage_params(sh, stages, si, plan)
            dense, experts = dense + d, experts + e
        sharded = dense / (plan.dp * plan.ep) + experts / plan.dp if plan.zero else dense + experts
        out.append({"blocks": sorted(i for si in held for i in stages[si]), "params": int(dense + experts),
                    "params_sharded": int(sharded)})
    return out


# --------------------------------------------------------------------------------------------
# The engine's side
# --------------------------------------------------------------------------------------------


def local_numel(p: torch.Tensor, zero_sharded: bool = True) -> int:
    """Elements of ``p`` this rank holds: a DTensor's local piece (``zero_sharded=False``: as if its
    data-parallel mesh dimensions replicated it, i.e. before ZeRO), a plain tensor's numel."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor):
        return p.numel()
    if zero_sharded:
        return p.to_local().numel()
    mesh = p.device_mesh
    placements = [pl if name in MODEL_AXES else Replicate() for name, pl in zip(mesh.mesh_dim_names, p.placements)]
    shape, _ = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return math.prod(shape)


def count_rank(cfg: ModelConfig, plan: Plan, rank: int) -> dict:
    """Apply ``plan`` to the meta-device model as rank ``rank`` of a fake process group of
    ``plan.world_size`` ranks, and count its parameters: ``stage`` (its pipeline rank), ``stages``,
    ``blocks``, ``params`` (before ZeRO) and ``params_sharded`` (after); ``seconds`` it took. Needs
    no process group in this process (it starts and destroys one)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from loom.models import build_model, spec_of
    from loom.parallel.mesh import build_mesh
    from loom.parallel.parallelize import parallelize
    from loom.tasks import lm_loss

    if dist.is_initialized():
        raise RuntimeError("count_rank starts its own (fake) process group; this process already has one")
    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=plan.world_size)
    try:
        mesh = build_mesh(plan, "cpu")
        spec = spec_of(cfg)
        pm = parallelize(build_model(cfg), plan, mesh, spec=spec, loss_fn=lm_loss, device=torch.device("cpu"),
                         seed=0, materialize=False)
        if any(not p.is_meta for p in pm.parameters()):
            raise RuntimeError("parallelize allocated parameters in a dry run")
        stage = mesh["pp"].get_local_rank()
        stages = list(pm.pipeline.stage_ids) if pm.pipeline is not None else [0]
        blocks = sorted(int(k) for m in pm.modules for k in getattr(m, spec.pipeline.blocks))
        params = list(pm.parameters())  # each Parameter object once (a tied embedding is one)
        return {"rank": rank, "stage": stage, "stages": stages, "blocks": blocks,
                "params": sum(local_numel(p, zero_sharded=False) for p in params),
                "params_sharded": sum(local_numel(p) for p in params), "seconds": time.perf_counter() - start}
    finally:
        dist.destroy_process_group()


def _count_in_subprocess(cfg: ModelConfig, plan: Plan, ranks: list[int]) -> list[dict]:
    """:func:`count_rank` of each of ``ranks`` in one fresh interpreter (``python -m
    loom.planner.verify``): no process group, mesh or module state of this process is touched."""
    request = json.dumps({"model": asdict(cfg), "plan": plan.to_dict(), "ranks": list(ranks)})
    done = subprocess.run([sys.executable, "-m", "loom.planner.verify"], input=request, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the dry run of ranks {list(ranks)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _model_config(d: dict) -> ModelConfig:
    d = dict(d)
    moe = MoEConfig(**d.pop("moe"))
    return ModelConfig(**d, moe=moe)


def _main() -> None:
    request = json.loads(sys.stdin.read())
    cfg, plan = _model_config(request["model"]), Plan.from_dict(request["plan"])
    print(json.dumps([count_rank(cfg, plan, r) for r in request["ranks"]]))


if __name__ == "__main__":
    _main()
