"""Pipeline parallelism: the blocks split into stages over the ``pp`` ranks, run by torch's schedules.

The model is cut into contiguous *stages* (embedding and first blocks, ..., last blocks and head);
each pp rank holds one or more of them and micro-batches flow through the pipeline. The schedules are
torch.distributed.pipelining's, named by ``parallel.schedule``:

* ``gpipe``: all forwards, then all backwards (GPipe, Huang et al. 2019). One stage per rank.
* ``1f1b``: one forward, one backward in the steady state, so at most ``pp`` micro-batches hold
  activations (PipeDream-Flush, Narayanan et al. 2021). One stage per rank; microbatches >= pp.
* ``interleaved``: ``virtual_stages`` stages per rank in a loop (rank r holds r, r+pp, ...), which
  shrinks the bubble by that factor (interleaved 1F1B, Narayanan et al. 2021).
* ``zero-bubble``: the ZB-V schedule (Qi et al. 2024, section 6): two stages per rank in a V (rank r
  holds r and 2pp-1-r) and the backward split into input and weight gradients, the weight part
  filling the bubbles. The first and last stages share rank 0, so the tied embedding stays one
  Parameter there. (torch's ScheduleInterleavedZeroBubble would loop stages like ``interleaved``.)

Each stage is a copy of the whole model (made on the meta device) with the other blocks deleted
from its block container and the children that only the first or only the last stage runs deleted
elsewhere (the family's :class:`~loom.models.spec.PipelineSplit` names them), so parameter names are
those of the single-device model and checkpoints load into any layout. The model files are not
changed: a copy's ``forward`` is replaced by one that runs ``embed`` (first stage), its blocks, and
``head`` (last stage). What passes between stages is one tensor or a tuple of them (a task's stages
may carry more than the hidden states: an encoder's padding mask travels with them). The targets
are one tensor or a tuple of them (split into micro-batches along the rows alike).

Tied parameters (an output projection that is the input embedding): where the first and last stages
are on different ranks, the last stage's copy keeps the first-stage module that owns the tied tensor
(unused in its forward, but it gives the shared weight its name there too) and
:meth:`Pipeline.sync_tied_grads` sums the two gradients after each step; both copies start equal and
take equal steps, so they stay equal.

Composing with tensor parallel and FSDP: apply them in place to ``Pipeline.modules`` after
:func:`build_pipeline` and before the first step; the stages learn shapes (and DTensor layouts) on
that step. ``to_empty()`` unties weights, so call :meth:`Pipeline.tie_weights` after it. Gradients are
those of the mean loss over this replica's batch (each micro-batch's loss is divided by their
number; torch's ``scale_grads`` is off); FSDP's reduce-scatter then averages over replicas. Measured
on gloo (pp=2 × dp=2): gpipe, 1f1b and interleaved match one process with FSDP as it comes; zero-bubble
needs ``reshard_after_forward=False`` on its FSDP modules (else weight gradients go missing in the
split backward), and ``fully_shard`` makes two Parameters of rank 0's tied weight, both of one name,
which the optimizer must both hold (``sync_tied_grads`` keeps them equal).
"""

from __future__ import annotations

import copy
import functools
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from loom.errors import ConfigError
from loom.models import ModelConfig, PipelineSplit, costs, n_blocks

# --------------------------------------------------------------------------------------------
# Layout: which blocks each stage holds, and which stages each rank holds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """What one pipeline stage holds and runs."""

    index: int
    blocks: range  # block indices, contiguous
    embed: bool  # runs the embedding (first stage)
    head: bool  # runs the head: final norm, output projection (last stage)
    flops: float  # forward FLOPs per token, the cost the split balances


def stage_layout(cfg: ModelConfig, n_stages: int) -> list[StageSpec]:
    """Split the model's blocks into ``n_stages`` contiguous stages by the forward FLOPs of its cost
    description (:func:`loom.models.costs`): :func:`balanced_stages`."""
    n = n_blocks(cfg)
    if n < n_stages:
        raise ConfigError(f"model.n_layer={cfg.n_layer} gives {n} blocks, which cannot fill "
                          f"parallel.pp × parallel.virtual_stages = {n_stages} stages; "
                          "lower parallel.pp or parallel.virtual_stages, or raise model.n_layer")
    c = costs(cfg)
    # the embedding multiplies nothing: its lookup and add (n_embd per token) keep the first stage from
    # looking free
    return balanced_stages([b.flops for b in c.blocks], c.first.flops + cfg.n_embd, c.last.flops, n_stages)


def balanced_stages(blocks: list[float], first: float, last: float, n_stages: int) -> list[StageSpec]:
    """Split blocks of costs ``blocks`` into ``n_stages`` contiguous stages of at least one block
    each so that the most expensive stage is as cheap as possible; among such splits, the most even
    one (least sum of squared costs). ``first`` counts on the first stage (the embedding), ``last``
    on the last (the head)."""
    n = len(blocks)
    prefix = [0.0]
    for f in blocks:
        prefix.append(prefix[-1] + f)
    embed, head = first, last

    def cost(s: int, i: int, j: int) -> float:  # stage s holding blocks i..j-1
        return prefix[j] - prefix[i] + (embed if s == 0 else 0.0) + (head if s == n_stages - 1 else 0.0)

    def split(score, cap: float) -> tuple[float, list[int]]:
        """Dynamic program over (stages, blocks): best[s][j] scores blocks 0..j-1 in stages 0..s-1,
        each stage at most ``cap``; ``score(prev, c)`` combines a prefix's score with a stage cost."""
        inf = float("inf")
        best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
        cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
        best[0][0] = 0.0
        for s in range(1, n_stages + 1):
            for j in range(s, n - (n_stages - s) + 1):
                for i in range(s - 1, j):
                    c = cost(s - 1, i, j)
                    if best[s - 1][i] < inf and c <= cap and score(best[s - 1][i], c) < best[s][j]:
                        best[s][j], cut[s][j] = score(best[s - 1][i], c), i
        bounds, j = [n], n
        for s in range(n_stages, 0, -1):
            j = cut[s][j]
            bounds.append(j)
        return best[n_stages][n], bounds[::-1]

    bottleneck, _ = split(max, float("inf"))
    _, bounds = split(lambda prev, c: prev + c * c, bottleneck * (1 + 1e-12))
    return [StageSpec(s, range(bounds[s], bounds[s + 1]), s == 0, s == n_stages - 1,
                      cost(s, bounds[s], bounds[s + 1])) for s in range(n_stages)]


def stage_ids(rank: int, pp: int, virtual_stages: int, schedule: str) -> list[int]:
    """The stages pp rank ``rank`` holds, in stage order: a loop (r, r+pp, ...) for every schedule
    but zero-bubble, whose V puts stages r and 2pp-1-r on rank r."""
    if schedule == "zero-bubble":
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(virtual_stages)]


def check_pipeline_shape(schedule: str, virtual_stages: int, v_key: str = "parallel.virtual_stages",
                         schedule_key: str = "parallel.schedule") -> None:
    """Raise :class:`ConfigError` when ``schedule`` cannot hold ``virtual_stages`` stages per rank."""
    v = f"{v_key}={virtual_stages}"
    if schedule in ("gpipe", "1f1b") and virtual_stages != 1:
        raise ConfigError(f"{schedule_key}={schedule} runs one stage per rank but {v}; set "
                          f"{v_key}=1, or use {schedule_key}=interleaved or zero-bubble")
    if schedule == "interleaved" and virtual_stages < 2:
        raise ConfigError(f"{schedule_key}=interleaved needs {v_key}>=2 (stages per rank), "
                          f"got {virtual_stages}; set it, or use {schedule_key}=1f1b")
    if schedule == "zero-bubble" and virtual_stages != 2:
        raise ConfigError(f"{schedule_key}=zero-bubble (ZB-V) holds exactly 2 stages per rank, but {v}; "
                          f"set {v_key}=2")


def check_pipeline(cfg: ModelConfig, pp: int, virtual_stages: int, schedule: str, microbatches: int,
                   batch_per_replica: int) -> None:
    """Raise :class:`ConfigError` for a pipeline that cannot run; needs no process group."""
    check_pipeline_shape(schedule, virtual_stages)
    stage_layout(cfg, pp * virtual_stages)
    m = f"parallel.microbatches={microbatches}"
    if schedule == "1f1b" and microbatches < pp:
        raise ConfigError(f"{m} is fewer than parallel.pp={pp}, which the 1f1b schedule cannot run; "
                          f"use at least {pp} micro-batches, or parallel.schedule=gpipe")
    rounds = max(1, microbatches // pp)  # torch's interleaved schedule runs the micro-batches in rounds
    if schedule == "interleaved" and microbatches % rounds:
        raise ConfigError(f"{m} is not a whole number of rounds of parallel.pp={pp} micro-batches, which the "
                          f"interleaved schedule needs; use a multiple of {pp}")
    if batch_per_replica % microbatches:
        raise ConfigError(f"the batch of {batch_per_replica} sequences per data-parallel replica is not divisible "
                          f"by {m}; each micro-batch must hold the same number of whole sequences")


# --------------------------------------------------------------------------------------------
# Stage copies
# --------------------------------------------------------------------------------------------


def _run_stage(model: nn.Module, *args, embed: bool, head: bool, blocks: str):
    """A stage copy's forward: the task's inputs or the previous stage's state (one tensor or a tuple)
    in, the next state or the model's output out."""
    h = model.embed(*args) if embed else (args if len(args) > 1 else args[0])
    for block in getattr(model, blocks).values():
        h = block(*h) if isinstance(h, tuple) else block(h)
    if head:
        h = model.head(*h) if isinstance(h, tuple) else model.head(h)
    return h


def stage_module(model: nn.Module, split: PipelineSplit, spec: StageSpec, keep_tied: bool = False) -> nn.Module:
    """A copy of ``model`` that holds and runs only stage ``spec``; ``keep_tied`` keeps, on a last stage
    that is not the first, the first-stage modules that own a tied parameter, so it keeps its name."""
    m = copy.deepcopy(model)
    container = getattr(m, split.blocks)
    for name in [k for k in container if int(k) not in spec.blocks]:
        del container[name]
    tied_owners = {b.rsplit(".", 1)[0].split(".")[0] for _, b in split.tied} if keep_tied else set()
    for name, child in list(m.named_children()):
        if name == split.blocks:
            continue
        if name in split.first:
            needed = spec.embed or name in tied_owners
        elif name in split.last:
            needed = spec.head
        elif next(child.parameters(), None) is None:
            needed = True  # parameterless (a dropout): harmless anywhere
        else:
            raise ValueError(f"{type(model).__name__}.{name} holds parameters but its family's pipeline split "
                             "names it neither first- nor last-stage")
        if not needed:
            delattr(m, name)
    m.forward = types.MethodType(functools.partial(_run_stage, embed=spec.embed, head=spec.head,
                                                   blocks=split.blocks), m)
    return m


# --------------------------------------------------------------------------------------------
# The pipeline on one rank
# --------------------------------------------------------------------------------------------

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B,
             "zero-bubble": ScheduleZBVZeroBubble}


class Pipeline:
    """This rank's stages and the schedule that runs them; build it with :func:`build_pipeline`.

    ``modules``: this rank's stage copies, in stage order (what an optimizer, TP and FSDP act on);
    ``stage_ids``: their stage indices; ``is_first`` / ``is_last``: whether this rank holds the first /
    last stage (the one that reads the task's inputs / the one that computes the loss)."""

    def __init__(self, modules: list[nn.Module], stage_ids: list[int], owner: dict[int, int], split: PipelineSplit,
                 group: dist.ProcessGroup, schedule: str, microbatches: int, loss_fn: Callable, device: torch.device):
        n_stages = len(owner)
        self.modules, self.stage_ids, self.group, self.split = modules, stage_ids, group, split
        self.is_first, self.is_last = 0 in stage_ids, n_stages - 1 in stage_ids
        # the pp rank across the tied parameters: the last stage's for the first stage's rank, and vice versa
        self.tied_peer = owner[n_stages - 1] if self.is_first else owner[0]
        self.tied_stages = {0, n_stages - 1}
        self.owner = owner  # stage -> pp rank
        self.tie_weights()
        # PipelineStage infers shapes on the first step, from whatever the parameters are by then, so
        # tensor parallel and FSDP may still replace them (in the same modules) before that step.
        stages = [PipelineStage(m, s, n_stages, device, group=group) for m, s in zip(modules, stage_ids)]
        # Each micro-batch's loss is divided by their number, so the gradients sum to those of the mean
        # over the batch; torch's own scaling (scale_grads) would divide a weight that two local stages
        # share (ZB-V's tied embedding) twice.
        self._loss_fn, self._targets = loss_fn, None
        scaled = functools.partial(_scaled_loss, loss_fn=self._loss_of_rows, n=microbatches)
        cls = SCHEDULES[schedule]
        self.schedule = cls(stages[0] if schedule in ("gpipe", "1f1b") else stages,
                            n_microbatches=microbatches, loss_fn=scaled, scale_grads=False)

    def step(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward over the batch (``inputs``: what the first stage reads, each (B, ...);
        ``targets``: what the loss reads), split into micro-batches along the rows; accumulates into
        ``.grad`` the gradient of the mean loss over the batch. Returns that loss (detached) on the
        rank holding the last stage, None elsewhere. Only the first stage's rank reads ``inputs`` and
        only the last stage's reads ``targets``; every pp rank must call it."""
        losses: list[torch.Tensor] = []
        args = tuple(inputs) if self.is_first else ()
        self._targets = None
        if self.is_last and not isinstance(targets, torch.Tensor):
            # several target tensors (a task with two losses): the schedule splits one tensor, so it
            # splits the row indices and the loss picks each micro-batch's rows of every target
            self._targets = tuple(targets)
            targets = torch.arange(self._targets[0].size(0), device=self._targets[0].device)
        self.schedule.step(*args, target=targets if self.is_last else None, losses=losses, return_outputs=False)
        return torch.stack(losses).sum().detach() if self.is_last else None

    @torch.no_grad()
    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """Forward only (evaluation): the whole batch through the stages in order, each rank running its
        stages and passing the state on; returns the model's output on the rank holding the last stage
        (None elsewhere). Works for every placement of stages, the V of zero-bubble included."""
        me = dist.get_rank(self.group)
        device = inputs[0].device
        h = None
        for s in range(len(self.owner)):
            if self.owner[s] != me:
                continue
            if s == 0:
                h = tuple(inputs)
            elif self.owner[s - 1] != me:
                h = _recv_tensors(self.group, self.owner[s - 1], device)
            h = self.modules[self.stage_ids.index(s)](*(h if isinstance(h, tuple) else (h,)))
            if s + 1 < len(self.owner) and self.owner[s + 1] != me:
                _send_tensors(h if isinstance(h, tuple) else (h,), self.group, self.owner[s + 1])
        return h if self.is_last else None

    def _loss_of_rows(self, output, target: torch.Tensor) -> torch.Tensor:
        """The task's loss of a micro-batch; with several target tensors ``target`` holds its rows."""
        if self._targets is not None:
            target = tuple(t[target] for t in self._targets)
        return self._loss_fn(output, target)

    def tie_weights(self) -> None:
        """Make each tied pair one Parameter in each copy, and across the copies on this rank (ZB-V's
        first and last stages). Call again after ``to_empty()``, which replaces parameters one by one
        and so unties them."""
        for tied, source in self.split.tied:
            shared = None
            for m in self.modules:
                if _has_parameter(m, source):
                    shared = shared if shared is not None else m.get_parameter(source)
                    _set_parameter(m, source, shared)
                    if _has_module(m, tied.rsplit(".", 1)[0]):
                        _set_parameter(m, tied, shared)

    def tied_names(self) -> frozenset[str]:
        """Names of the parameters two pipeline ranks hold (the sources of tied pairs, where the first
        and last stages are on different ranks): counted once in norms."""
        if self.is_first and self.is_last or not (self.is_first or self.is_last):
            return frozenset()
        return frozenset(source for _, source in self.split.tied)

    def sync_tied_grads(self) -> None:
        """Sum the gradient of each tied parameter over its copies: between the first stage's rank and
        the last stage's, or on one rank that holds both as two Parameters (which ``fully_shard`` makes of
        one). A no-op on the other ranks and where one Parameter serves both."""
        for _, source in self.split.tied:
            self._sync_one(source)

    def _sync_one(self, source: str) -> None:
        copies = [m.get_parameter(source) for m, s in zip(self.modules, self.stage_ids)
                  if s in self.tied_stages and _has_parameter(m, source)]
        for p in copies:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [getattr(p.grad, "_local_tensor", p.grad) for p in copies]  # DTensor: this rank's shard,
        if self.is_first and self.is_last:  # laid out the same in both copies
            if len(copies) == 2 and copies[0] is not copies[1]:
                grads[0].add_(grads[1])
                grads[1].copy_(grads[0])
        elif grads:
            other = torch.empty_like(grads[0])
            ops = [dist.P2POp(dist.isend, grads[0], group=self.group, group_peer=self.tied_peer),
                   dist.P2POp(dist.irecv, other, group=self.group, group_peer=self.tied_peer)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            grads[0].add_(other)  # a + b == b + a in floating point: both ranks get the same sum


def _has_module(m: nn.Module, name: str) -> bool:
    try:
        m.get_submodule(name)
        return True
    except AttributeError:
        return False


def _has_parameter(m: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return _has_module(m, owner) and isinstance(getattr(m.get_submodule(owner), leaf, None), nn.Parameter)


def _set_parameter(m: nn.Module, name: str, p: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(m.get_submodule(owner), leaf, p)


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool]


def _send_tensors(ts: tuple[torch.Tensor, ...], group, peer: int) -> None:
    """Send tensors with their count, shapes and dtypes first, so the receiver needs no guess."""
    ts = tuple(t.full_tensor() if hasattr(t, "full_tensor") else t for t in ts)
    dist.send(torch.tensor([len(ts)], dtype=torch.int64, device=ts[0].device), group=group, group_dst=peer)
    for t in ts:
        header = torch.tensor([t.dim(), _DTYPES.index(t.dtype), *t.shape], dtype=torch.int64, device=t.device)
        dist.send(torch.tensor([header.numel()], dtype=torch.int64, device=t.device), group=group, group_dst=peer)
        dist.send(header, group=group, group_dst=peer)
        dist.send(t.contiguous(), group=group, group_dst=peer)


def _recv_tensors(group, peer: int, device: torch.device) -> torch.Tensor | tuple[torch.Tensor, ...]:
    count = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(count, group=group, group_src=peer)
    out = []
    for _ in range(int(count)):
        size = torch.empty(1, dtype=torch.int64, device=device)
        dist.recv(size, group=group, group_src=peer)
        header = torch.empty(int(size), dtype=torch.int64, device=device)
        dist.recv(header, group=group, group_src=peer)
        t = torch.empty(header[2:].tolist(), dtype=_DTYPES[int(header[1])], device=device)
        dist.recv(t, group=group, group_src=peer)
        out.append(t)
    return out[0] if len(out) == 1 else tuple(out)


def _scaled_loss(output: torch.Tensor, target: torch.Tensor, *, loss_fn: Callable, n: int) -> torch.Tensor:
    """One micro-batch's share of the batch's mean loss (the micro-batches are of equal size)."""
    return loss_fn(output, target) / n


def build_pipeline(model: nn.Module, split: PipelineSplit, pp_mesh_or_group, *, schedule: str, microbatches: int,
                   virtual_stages: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   device: torch.device | str) -> Pipeline:
    """Split ``model`` (the whole model, on the meta device) into ``pp × virtual_stages`` stages as its
    family's ``split`` says and return this rank's :class:`Pipeline`. ``pp_mesh_or_group`` is the pp
    axis: a 1-D DeviceMesh or a ProcessGroup. ``loss_fn(outputs, targets)`` is a mean over the
    micro-batch."""
    group = pp_mesh_or_group.get_group() if isinstance(pp_mesh_or_group, DeviceMesh) else pp_mesh_or_group
    pp, rank = dist.get_world_size(group), dist.get_rank(group)
    specs = stage_layout(model.cfg, pp * virtual_stages)
    owner = {s: r for r in range(pp) for s in stage_ids(r, pp, virtual_stages, schedule)}
    ids = stage_ids(rank, pp, virtual_stages, schedule)
    modules = [stage_module(model, split, specs[s], keep_tied=specs[s].head) for s in ids]
    return Pipeline(modules, ids, owner, split, group, schedule, microbatches, loss_fn, torch.device(device))
