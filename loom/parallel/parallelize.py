"""The one place that applies a :class:`Plan` to a model, in a fixed order (as torchtitan does):

    pipeline split -> tensor/sequence parallel -> expert parallel -> recomputation -> compilation
    -> data parallel / ZeRO -> allocate on the device -> initialize each parameter (or its shard) from the seed

The model arrives on the meta device, written for one device, with its family's spec (what its
modules are: :class:`~loom.models.spec.ModelSpec`) and the task's loss; what comes back is a
:class:`ParallelModel`: this rank's part(s) of it, and the operations the training step needs
(forward+backward of a batch, the loss for evaluation, the global gradient norm) done the same way
under every layout. Parameters are initialized by name (``model.initial_value``) after sharding,
so every layout starts from the single-device weights without ever holding the whole model.
Precision is the caller's: the training step runs these operations under its autocast.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from loom.models import ModelSpec
from loom.models.common import STAT_FIELDS, at_least_fp32, moe_layers
from loom.parallel.compile import apply_compile
from loom.parallel.data import apply_data_parallel, apply_replicate, set_gradient_sync
from loom.parallel.expert import apply_expert_parallel, expert_grad_factor
from loom.parallel.mesh import dense_data_mesh, expert_data_mesh, is_distributed
from loom.parallel.plan import Plan
from loom.parallel.recompute import apply_recompute

LossScale = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> mean loss


def _identity_scale(loss: torch.Tensor) -> torch.Tensor:
    return loss


@dataclass
class ParallelModel:
    """This rank's share of a model under a plan."""

    plan: Plan
    mesh: DeviceMesh | None
    device: torch.device
    loss_fn: LossFn  # the task's: (the model's outputs, targets) -> the mean loss
    modules: list[nn.Module]  # one per pipeline stage held here (one when pp=1)
    pipeline: object | None = None  # loom.parallel.pipeline.Pipeline
    loss_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # names of parameters held by two ranks of the pipeline (tied across stages): counted once in norms
    shared_across_stages: frozenset[str] = frozenset()
    _loss_scale: LossScale = _identity_scale  # what the pipeline's loss is multiplied by before backward
    _raw_losses: list = field(default_factory=list)  # this step's micro-batch losses, unscaled
    moe_names: tuple[str, ...] = ()  # every MoE layer of the whole model, in order (all stages)
    _pipeline_started: bool = False  # whether the pipeline has run a step (and learned its shapes)
    counts_stats: bool = True  # whether this rank's MoE statistics count (one rank per tp group)

    # -- parameters ------------------------------------------------------------------------

    def named_parameters(self):
        """Each parameter once, by name (a pipeline rank holding the first and the last stage may
        keep the tied embedding as two equal Parameters of one name)."""
        seen = set()
        for m in self.modules:
            for name, p in m.named_parameters():
                if name not in seen:
                    seen.add(name)
                    yield name, p

    def parameters(self):
        """Every parameter object this rank updates."""
        seen = set()
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    # -- a step ----------------------------------------------------------------------------

    def forward_backward(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, scale: LossScale,
                         last_micro_step: bool = True) -> torch.Tensor | None:
        """Forward and backward of this replica's batch (``inputs``: what the model reads; ``targets``:
        what the loss reads); gradients accumulate as those of ``scale(mean loss)``. Returns the
        detached mean loss where it is known (every rank without a pipeline, the last stage's ranks
        with one)."""
        set_gradient_sync(self.modules, self.plan.zero, last_micro_step)
        # the MoE auxiliary losses enter backward with the factor the task's loss gets (a host sync:
        # only where there are MoE layers)
        if self.moe_names:
            aux_scale = float(scale(torch.ones((), device=self.device)))
            for _, moe in self._moe_layers():
                moe.aux_grad_scale = aux_scale / (self.plan.microbatches if self.pipeline is not None else 1)
        if self.pipeline is not None:
            return self._pipeline_step(inputs, targets, scale)
        outputs = self.modules[0](*inputs)
        with self.loss_context():
            loss = self.loss_fn(outputs, targets)
            scale(loss).backward()
        return _local(loss.detach())

    @torch.no_grad()
    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The model's outputs for ``inputs`` without gradients, where they are known (every rank
        without a pipeline, the last stage's ranks with one). Under tensor parallelism they may be a
        DTensor split over the vocabulary: reduce them inside :attr:`loss_context`."""
        return self.modules[0](*inputs) if self.pipeline is None else self.pipeline.forward(inputs)

    @torch.no_grad()
    def loss(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor | None:
        """Mean loss of a batch without gradients (evaluation), where it is known."""
        outputs = self.forward(inputs)
        if outputs is None:
            return None
        with self.loss_context():
            return _local(self.loss_fn(outputs, targets))

    def _pipeline_step(self, inputs, targets, scale: LossScale) -> torch.Tensor | None:
        self._loss_scale, self._raw_losses = scale, []
        # the schedule runs the backward too: a vocabulary-parallel loss needs its context around both
        with self.loss_context():
            self.pipeline.step(inputs, targets)
        if not self._pipeline_started:
            # torch's stages learn their shapes with one extra forward first, on placeholder inputs
            # past the first stage: not a forward of this batch, so its MoE statistics are dropped
            self._pipeline_started = True
            for _, moe in self._moe_layers():
                moe.stats = moe.stats[1:]
        # the last `microbatches` calls are this batch's (the first step also calls the loss while the
        # stages learn their shapes)
        raw = self._raw_losses[-self.plan.microbatches:]
        return torch.stack(raw).mean() if raw else None

    def pipeline_loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The per-micro-batch loss the pipeline schedule differentiates (micro-batches are of
        equal size, so the mean of theirs is the batch's)."""
        loss = self.loss_fn(outputs, targets)
        self._raw_losses.append(_local(loss.detach()))
        return self._loss_scale(loss)

    def after_backward(self) -> None:
        """Gradients every rank must agree on before the optimizer step. A gradient that came out
        in another layout than its parameter is brought to the parameter's: partial sums (a
        sequence-parallel LayerNorm's weight, summed over sequence shards) are reduced, a replicated
        gradient of a vocabulary-split embedding keeps this rank's rows. Then the two halves of a
        parameter tied across pipeline stages are added."""
        for p in self.parameters():
            g = p.grad
            if isinstance(g, DTensor) and isinstance(p, DTensor) and tuple(g.placements) != tuple(p.placements):
                p.grad = g.redistribute(p.device_mesh, p.placements)
        if self.plan.ep > 1:
            for name, p in self.named_parameters():
                factor = expert_grad_factor(name, self.plan.ep)
                if p.grad is not None and factor != 1.0:
                    (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(factor)
        if self.pipeline is not None:
            self.pipeline.sync_tied_grads()

    # -- MoE statistics -------------------------------------------------------------------

    def _moe_layers(self):
        for m in self.modules:
            yield from moe_layers(m)

    def take_moe_stats(self) -> torch.Tensor | None:
        """This rank's share of the MoE statistics since the last call, as a (layers, experts +
        fields) tensor over every MoE layer of the model (zeros for layers held elsewhere), ready to
        be summed over all ranks; resets them. None for a dense model."""
        if not self.moe_names:
            return None
        width = self.modules[0].cfg.moe.experts + len(STAT_FIELDS)
        out = torch.zeros(len(self.moe_names), width, device=self.device, dtype=torch.float64)
        for name, moe in self._moe_layers():
            if moe.stats and self.counts_stats:
                out[self.moe_names.index(name)] = torch.stack(moe.stats).sum(0).to(self.device)
            moe.stats = []
        return out

    # -- the global gradient norm ------------------------------------------------------------

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the whole model's gradient, the same number one device would compute.

        Each rank adds the squares of the gradient it holds, weighted by the share of that piece's
        copies it stands for: a piece split over the tensor or ZeRO group is counted by its holder;
        a piece replicated over ``c`` ranks is counted 1/c by each. One all-reduce adds them up.
        (Gradients are in their parameters' layouts by now: no partial sums.) The pieces' norms come
        from one fused kernel per kind of piece (``torch._foreach_norm``), not a loop of reductions."""
        stage_ranks = self.plan.world_size // self.plan.pp
        by_copies: dict[int, list[torch.Tensor]] = {}
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            g = p.grad
            copies = stage_ranks  # ranks of this stage holding an identical copy of this piece
            if isinstance(g, DTensor):  # split over its mesh but for the replicated dims
                mesh = g.device_mesh
                copies = stage_ranks // mesh.size() * math.prod(
                    mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
                g = g.to_local()
            copies *= 2 if name in self.shared_across_stages else 1
            by_copies.setdefault(copies, []).append(at_least_fp32(g.detach()))
        # float64 accumulation: the sum's rounding is then far below that of any fp32 term, so the
        # clipping coefficient does not depend on the order in which a layout adds the pieces
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for copies, grads in by_copies.items():
            norms = torch.stack(torch._foreach_norm(grads, 2)).double()
            total += norms.pow(2).sum() / copies
        if is_distributed():
            dist.all_reduce(total)
        return total.sqrt()

    def clip_grads_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so that their global norm is at most ``max_norm`` (as
        ``torch.nn.utils.clip_grad_norm_``); returns the norm before clipping."""
        norm = self.grad_norm()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                     for p in self.parameters() if p.grad is not None]
            for dtype in {g.dtype for g in grads}:  # one fused multiply per dtype
                torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
        return norm


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------------------------


def parallelize(model: nn.Module, plan: Plan, mesh: DeviceMesh | None, *, spec: ModelSpec, loss_fn: LossFn,
                device: torch.device, seed: int, mixed_precision: torch.dtype | None = None,
                materialize: bool = True, compile: str | None = None) -> ParallelModel:
    """Apply ``plan`` to the meta-device ``model`` (of the family ``spec``) on ``mesh`` and initialize
    it from ``seed``. ``loss_fn(outputs, targets)``: the task's mean loss. ``mixed_precision``: the
    dtype the forward computes in under autocast (bf16, fp16), which data parallelism then gathers
    parameters in; None: the parameters' own. ``materialize=False`` stops before allocating: the
    parameters stay on the meta device (sharded as the plan says), for counting what each rank would
    hold (:mod:`loom.planner.verify`). ``compile``: a ``torch.compile`` backend to compile each
    block with (:mod:`loom.parallel.compile`); None: eager."""
    split, sharding = spec.pipeline_split(model.cfg), spec.sharding
    pm = ParallelModel(plan=plan, mesh=mesh, device=device, loss_fn=loss_fn, modules=[model],
                       moe_names=tuple(name for name, _ in moe_layers(model)))
    if plan.tp > 1:  # resolved on the whole model: a pipeline stage holds only some of the named modules
        from loom.parallel.strategy import resolve_strategies

        strategies = resolve_strategies(model, sharding.table, dict(plan.strategies), plan.tp, plan.dp)
    if mesh is None or plan.world_size == 1:
        apply_recompute(getattr(model, split.blocks), plan.recompute, plan.recompute_every)
        if compile:
            apply_compile(getattr(model, split.blocks), compile)
        if materialize:
            _materialize(pm.modules, device, seed, tie=model.tie_weights)
        return pm

    if plan.pp > 1:
        from loom.parallel.pipeline import build_pipeline

        pipe = build_pipeline(model, split, mesh["pp"], schedule=plan.schedule, microbatches=plan.microbatches,
                              virtual_stages=plan.virtual_stages, loss_fn=pm.pipeline_loss_fn, device=device)
        pm.pipeline, pm.modules = pipe, list(pipe.modules)
        pm.shared_across_stages = pipe.tied_names()

    if plan.tp > 1:
        from torch.distributed.tensor.parallel import loss_parallel

        from loom.parallel.tensor import apply_tensor_parallel, vocab_parallel

        for m in pm.modules:
            apply_tensor_parallel(m, mesh["tp"], strategies, plan.sp, sharding)
        if vocab_parallel(*pm.modules):
            pm.loss_context = loss_parallel

    if plan.ep > 1:
        for m in pm.modules:
            apply_expert_parallel(m, mesh["ep"])
    pm.counts_stats = mesh["tp"].get_local_rank() == 0  # tp ranks see the same tokens

    for m in pm.modules:
        apply_recompute(getattr(m, split.blocks), plan.recompute, plan.recompute_every)
        if compile:
            apply_compile(getattr(m, split.blocks), compile)

    if plan.data_parallel > 1 and not plan.replicated_dp:
        # the zero-bubble schedule splits each backward in two; FSDP must keep the parameters
        # gathered in between (resharding after forward would lose gradients)
        reshard = plan.zero == 3 and not (plan.pp > 1 and plan.schedule == "zero-bubble")
        dense_mesh = dense_data_mesh(mesh, plan.zero)
        expert_mesh = expert_data_mesh(mesh) if plan.dp > 1 else None
        for m in pm.modules:
            apply_data_parallel(m, dense_mesh, plan.zero, mixed_precision, blocks=split.blocks,
                                own_groups=sharding.own_groups, offload=plan.offload != "none",
                                reshard_after_forward=reshard, expert_mesh=expert_mesh, expert_parallel=plan.ep > 1)
    if materialize:
        _materialize(pm.modules, device, seed, offload=plan.offload != "none",
                     tie=pm.pipeline.tie_weights if pm.pipeline is not None else model.tie_weights)
        if plan.replicated_dp:  # DDP holds the parameter objects: after they exist
            apply_replicate(model, mesh["dp_replicate"])  # zero=0: the whole dp axis
    return pm


@torch.no_grad()
def _materialize(modules: list[nn.Module], device: torch.device, seed: int, tie: Callable[[], None],
                 offload: bool = False) -> None:
    """Allocate each module's (sharded) parameters, re-tie tied ones (``tie``), and fill them
    with the single-device initial values: every rank computes a parameter's full initial value
    and keeps its own slice."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for m in modules:
        m.to_empty(device="cpu" if offload else device)
    tie()
    for m in modules:
        for name, p in m.named_parameters():
            full = m.initial_value(name, p.shape, seed)
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                piece = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                p.to_local().copy_(piece)
            else:
                p.copy_(full)
