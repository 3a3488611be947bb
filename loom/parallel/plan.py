"""A Plan: the layout of one training job as frozen, serializable data.

The config's ``parallel`` section (:func:`resolve_plan`) or the planner (``parallel.auto``, ``loom plan
--out``) makes a Plan, once, at the top of a job; it is passed down, and only
:mod:`loom.parallel.parallelize` applies it. Everything that can be said about a layout without
starting a process is checked here (:func:`check_plan`), so that a layout that cannot work is one
line and exit code 2 before anything launches.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, fields

from loom.config import Config, ConfigError, ModelConfig

# One process per device; its coordinate on each axis. dp is split in two mesh dimensions so that
# hybrid sharding (shard inside a group, replicate across groups) is the same code as plain ZeRO.
AXES = ("pp", "dp", "ep", "tp")


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel; its ranks split the batch too: the dense layers see dp × ep replicas
    sp: bool = False
    zero: int = 0
    shard_group: int = 1  # ranks that share one ZeRO shard (1 when zero=0; dp unless hybrid)
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    recompute_every: int = 1
    offload: str = "none"
    mesh_order: tuple[str, ...] = ("pp", "dp", "ep", "tp")  # outermost first; the last shares the fastest link
    strategies: tuple[tuple[str, str], ...] = ()  # (module pattern, strategy) overrides, in order
    grad_accum: int = 1  # accumulation micro-steps per optimizer step (each runs the pipeline's micro-batches)

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp * self.pp

    @property
    def data_parallel(self) -> int:
        """Replicas of the dense layers, each with its own slice of every batch: dp × ep."""
        return self.dp * self.ep

    @property
    def replicated_dp(self) -> bool:
        """Whether data parallelism is plain replication (DDP: one copy of the weights and gradients,
        bucketed all-reduce during backward): zero=0 without tensor, pipeline or expert parallelism.
        Every other data-parallel layout goes through FSDP2 (zero=0 there is a shard group of one)."""
        return self.zero == 0 and self.data_parallel > 1 and self.tp == self.pp == self.ep == 1

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.shard_group

    def micro_batch(self, global_batch: int) -> int:
        """Sequences in each micro-batch of one replica when a step holds ``global_batch``."""
        return global_batch // (self.data_parallel * self.microbatches * self.grad_accum)

    def describe(self) -> str:
        """A short human-readable layout, e.g. ``dp=2 tp=2 zero=1 sp``."""
        parts = [f"{a}={getattr(self, a)}" for a in ("dp", "ep", "tp", "pp") if getattr(self, a) > 1] or ["single"]
        if self.zero:
            parts.append(f"zero={self.zero}" + (f"/shard{self.shard_group}" if self.dp_replicate > 1 else ""))
        if self.sp:
            parts.append("sp")
        if self.pp > 1:
            parts.append(f"{self.schedule}x{self.microbatches}" + (f"v{self.virtual_stages}"
                                                                  if self.virtual_stages > 1 else ""))
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}" + (f"/{self.recompute_every}"
                                                          if self.recompute_every > 1 else ""))
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        if self.grad_accum > 1:
            parts.append(f"accum={self.grad_accum}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mesh_order"] = list(self.mesh_order)
        d["strategies"] = dict(self.strategies)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"plan has unknown fields {unknown}; valid: {', '.join(sorted(known))}")
        d = dict(d)
        if "mesh_order" in d:
            d["mesh_order"] = full_mesh_order(d["mesh_order"])
        if "strategies" in d:
            d["strategies"] = tuple(dict(d["strategies"]).items())
        return cls(**d)


def full_mesh_order(order) -> tuple[str, ...]:
    """``order`` with every axis: an order written before expert parallelism existed (no ``ep``)
    gets ep right inside dp."""
    order = list(order)
    if "ep" not in order and "dp" in order:
        order.insert(order.index("dp") + 1, "ep")
    return tuple(order)


def plan_from_config(cfg: Config) -> Plan:
    """The Plan that ``cfg``'s ``parallel`` section and ``train.grad_accum`` say, as written."""
    p = cfg.parallel
    shard = (p.shard_group or p.dp) if p.zero else 1
    return Plan(dp=p.dp, tp=p.tp, pp=p.pp, ep=p.ep, sp=p.sp, zero=p.zero, shard_group=shard,
                microbatches=p.microbatches, schedule=p.schedule, virtual_stages=p.virtual_stages,
                recompute=p.recompute, recompute_every=p.recompute_every, offload=p.offload,
                mesh_order=full_mesh_order(p.mesh_order), strategies=tuple(p.strategies.items()),
                grad_accum=cfg.train.grad_accum)


def with_plan(cfg: Config, plan: Plan) -> Config:
    """``cfg`` saying ``plan`` in its ``parallel`` section and ``train.grad_accum`` (what a run
    directory's ``config.yaml`` records, and what resumes it)."""
    parallel = dataclasses.replace(
        cfg.parallel, auto=False, dp=plan.dp, tp=plan.tp, pp=plan.pp, ep=plan.ep, sp=plan.sp, zero=plan.zero,
        shard_group=plan.shard_group if plan.zero and plan.shard_group != plan.dp else 0,
        microbatches=plan.microbatches, schedule=plan.schedule, virtual_stages=plan.virtual_stages,
        recompute=plan.recompute, recompute_every=plan.recompute_every, offload=plan.offload,
        mesh_order=list(plan.mesh_order), strategies=dict(plan.strategies))
    return dataclasses.replace(cfg, parallel=parallel, train=dataclasses.replace(cfg.train, grad_accum=plan.grad_accum))


def resolve_plan(cfg: Config, world_size: int) -> Plan:
    """The Plan of ``cfg`` on ``world_size`` processes, with the defaults that depend on them:
    ``parallel.dp`` left at 1 takes the processes that tensor, pipeline and expert parallelism leave,
    ``world_size / (tp × pp × ep)`` (when that divides; otherwise :func:`check_plan` says what is
    wrong), and a pipeline left at one micro-batch gets one per stage (when the batch splits so),
    since a single micro-batch leaves every stage but one idle. (``parallel.auto`` is the planner's:
    :func:`loom.planner.auto.plan_job`.)"""
    plan = plan_from_config(cfg)
    others = plan.tp * plan.pp * plan.ep
    if plan.dp == 1 and world_size > 1 and world_size % others == 0:
        dp = world_size // others
        plan = dataclasses.replace(plan, dp=dp, shard_group=(cfg.parallel.shard_group or dp) if plan.zero else 1)
    per_replica = cfg.train.batch_size // plan.grad_accum // plan.data_parallel
    if plan.pp > 1 and plan.microbatches == 1 and per_replica % plan.pp == 0:
        plan = dataclasses.replace(plan, microbatches=plan.pp)
    return plan


def check_schedule(plan: Plan, model: ModelConfig) -> None:
    """Raise :class:`ConfigError` when ``model``'s family cannot run ``plan``'s pipeline schedule (the
    family says why: zero-bubble and T5's carried position bias). ``loom train`` and ``loom plan --fix``
    both ask here."""
    from loom.models import spec_of

    why = spec_of(model).no_zero_bubble(model) if plan.pp > 1 and plan.schedule == "zero-bubble" else ""
    if why:
        raise ConfigError(f"parallel.schedule=zero-bubble cannot train this model: {why}; "
                          "use parallel.schedule=1f1b or interleaved")


def check_plan(plan: Plan, cfg: Config, world_size: int | None = None) -> None:
    """Raise :class:`ConfigError` on the first reason ``plan`` cannot train ``cfg`` on
    ``world_size`` processes. Needs no process group and allocates nothing."""
    from loom.models import spec_of
    from loom.parallel.pipeline import check_pipeline
    from loom.parallel.strategy import resolve_strategies

    if world_size is not None and world_size != plan.world_size:
        axes = [("dp", plan.dp)] + ([("ep", plan.ep)] if plan.ep > 1 else []) + [("tp", plan.tp), ("pp", plan.pp)]
        raise ConfigError(f"{' × '.join('parallel.' + a for a, _ in axes)} = {' × '.join(str(v) for _, v in axes)} = "
                          f"{plan.world_size}, but {world_size} processes were started; make the product "
                          f"equal the number of processes (e.g. --nproc {plan.world_size})")
    if plan.zero and plan.dp % plan.shard_group:
        raise ConfigError(f"parallel.shard_group={plan.shard_group} does not divide parallel.dp={plan.dp}; "
                          "choose a divisor of dp (hybrid sharding: shard inside groups, replicate across)")
    if plan.sp and plan.tp == 1:
        raise ConfigError("parallel.sp=true splits activations over the tensor-parallel group; set parallel.tp>1")
    if plan.sp and spec_of(cfg.model).no_sequence_parallel:
        raise ConfigError(f"parallel.sp=true is not supported for model.arch={cfg.model.arch}: "
                          f"{spec_of(cfg.model).no_sequence_parallel}; use parallel.tp={plan.tp} without sp")
    check_schedule(plan, cfg.model)
    if plan.sp and cfg.model.block_size % plan.tp:
        raise ConfigError(f"parallel.sp=true splits the sequence over parallel.tp={plan.tp} ranks, but "
                          f"model.block_size={cfg.model.block_size} is not divisible by it")
    if plan.offload != "none":
        if plan.dp == 1 or plan.zero == 0:
            raise ConfigError(f"parallel.offload={plan.offload} keeps the ZeRO-sharded optimizer state in host "
                              "memory; it needs parallel.zero>=1 and parallel.dp>1")
        if plan.offload == "params" and plan.zero != 3:
            raise ConfigError("parallel.offload=params streams sharded parameters from host memory; "
                              f"it needs parallel.zero=3 (now {plan.zero})")
    if plan.ep > 1:
        experts = cfg.model.moe.experts
        if experts == 0:
            raise ConfigError(f"parallel.ep={plan.ep} splits the experts of MoE layers, but model={cfg.model.preset} "
                              "is dense; set model.moe.experts (e.g. model=switch-tiny) or parallel.ep=1")
        if experts % plan.ep:
            raise ConfigError(f"parallel.ep={plan.ep} must divide model.moe.experts={experts} "
                              "(each expert-parallel rank holds experts / ep whole experts)")
        if plan.offload != "none":
            raise ConfigError(f"parallel.offload={plan.offload} is not supported with parallel.ep>1 yet; "
                              "use parallel.zero to shard the expert and optimizer state instead")
    t = cfg.train
    if t.batch_size % plan.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={plan.grad_accum}; "
                          "each micro-batch must hold whole sequences")
    per_step = t.batch_size // plan.grad_accum
    replicas = plan.data_parallel
    if per_step % replicas:
        what = f"parallel.dp × parallel.ep = {replicas}" if plan.ep > 1 else f"parallel.dp={plan.dp}"
        raise ConfigError(f"train.batch_size={t.batch_size} / train.grad_accum={plan.grad_accum} = {per_step} "
                          f"sequences per micro-step cannot be split over {what} replicas; "
                          f"make it a multiple of {replicas}")
    if plan.tp > 1 or plan.strategies:
        from loom.models import build_model

        # on the meta device: names, shapes and divisibility of every operator's strategy
        resolve_strategies(build_model(cfg.model), spec_of(cfg.model).sharding.table, dict(plan.strategies),
                           plan.tp, plan.dp)
    if plan.pp > 1 or plan.virtual_stages > 1:
        check_pipeline(cfg.model, plan.pp, plan.virtual_stages, plan.schedule, plan.microbatches,
                       per_step // replicas)
    elif plan.microbatches > 1:
        raise ConfigError(f"parallel.microbatches={plan.microbatches} splits each batch for a pipeline; "
                          "with parallel.pp=1 use train.grad_accum for micro-batches")
