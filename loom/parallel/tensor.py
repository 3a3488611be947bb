"""Tensor (operator-level) parallelism and sequence parallelism, applied to a model from outside.

Each module's resolved strategy (:mod:`loom.parallel.strategy`) becomes one of torch's parallel
styles (``torch.distributed.tensor.parallel``), which turn its weights into DTensors on the tp mesh
and convert its inputs and outputs with forward hooks; the model's code stays single-device. The
layout is Megatron-LM's (Shoeybi et al. 2019): query/key/value and the first MLP projection split
by columns keep their output split (attention runs on the local heads, plain tensors), the output
projections split by rows sum their partial products, so each half block costs one all-reduce.

The *residual stream* (embedding output, block inputs and outputs) is a plain tensor on every rank:
whole under plain tensor parallelism, and under sequence parallelism (Korthikanti et al. 2022) this
rank's slice of the sequence (dim 1). There the LayerNorms and dropouts run on the slice, the
gather to the whole sequence happens once at each LayerNorm feeding attention or MLP
(all-gather), and the row-split projections reduce-scatter instead of all-reduce, so activation
memory outside attention and MLP is divided by tp at the same communication volume.
"""

from __future__ import annotations

import contextlib
from fnmatch import fnmatchcase
from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from loom.models import Sharding
from loom.models.common import MLP, Attention, Block, MoE, SwiGLU
from loom.models.common.dropout import on_shard
from loom.parallel.strategy import check_strategies

VOCAB_PARALLEL = "_loom_vocab_parallel"  # set on an output projection whose outputs are split over the vocabulary


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, strategies: dict[str, str],
                          sequence_parallel: bool, sharding: Sharding) -> None:
    """Split ``model`` in place over the 1-D ``tp_mesh`` by ``strategies`` (module name -> name,
    from :func:`~loom.parallel.strategy.resolve_strategies`; modules with weights not named there
    are replicated). ``sharding``: the family's facts about its modules (positional embeddings, an
    attention fed from outside the stream).

    Works on a meta-device model (then nothing is communicated: initialize the DTensor parameters
    afterwards) and on one with weights, which rank 0's copy defines. Every parameter becomes a
    DTensor on ``tp_mesh``; names do not change; tied parameters stay tied. A Linear outside attention
    and MLP reads the stream; with ``vocab`` its outputs (logits) are a DTensor split over the
    vocabulary: compute the loss and call backward inside :func:`loss_context`."""
    check_strategies(model, strategies, tp_mesh.size())
    on_meta = any(p.is_meta for p in model.parameters())
    src = None if on_meta else 0  # meta tensors hold nothing to scatter or broadcast
    stream = Shard(1) if sequence_parallel else Replicate()  # residual stream (B, T, C)
    # embeddings looked up by position return (T, C): their sequence dimension is 0, not 1
    positional = Shard(0) if sequence_parallel else Replicate()
    tied = _tied_groups(model)
    parents = {f"{n}.{c}" if n else c: m for n, m in model.named_modules() for c, _ in m.named_children()}
    moe_prefixes: list[str] = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MoE):
            parallelize_module(mod, tp_mesh, _WholeOnEachRank(stream))
            moe_prefixes.append(name + ".")
            continue
        if any(name.startswith(p) for p in moe_prefixes):
            continue
        if next(mod.parameters(recurse=False), None) is None:
            if (sequence_parallel and isinstance(mod, nn.Dropout)
                    and not any(fnmatchcase(name, p) for p in sharding.whole_inputs)):
                # it drops elements of this rank's slice of the stream: a mask of its own per slice
                mod.forward = on_shard(mod, tp_mesh.get_local_rank())
            if sequence_parallel and name in sharding.positional:
                # a fixed (sinusoidal) encoding computes every position's row: keep this rank's
                parallelize_module(mod, tp_mesh, PrepareModuleOutput(output_layouts=Replicate(),
                                                                     desired_output_layouts=positional))
            continue
        parent, leaf = parents.get(name), name.rsplit(".", 1)[-1]
        strategy = strategies.get(name, "replicate")
        # a module behind a head that gathered the stream reads the whole sequence, not this rank's slice
        whole = any(fnmatchcase(name, p) for p in sharding.whole_inputs)
        inp = Replicate() if whole else stream
        if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and whole:
            styles = [_Replicated(Replicate(), Replicate())]
        elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
            # Inside a block it feeds colwise projections: hand them the whole sequence as a
            # replicated DTensor (one gather for q, k and v; their partial input gradients sum
            # before the single reduce-scatter/all-reduce). Elsewhere (a final norm) it is the stream.
            feeds = isinstance(parent, Block)
            if sequence_parallel:
                styles = [SequenceParallel(use_local_output=not feeds)]
                if feeds:
                    styles.append(PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                                                      use_local_output=False))
            else:
                styles = [_Replicated(Replicate(), Replicate(), local=not feeds)]
        elif isinstance(mod, nn.Embedding):
            out, idx = (positional if name in sharding.positional else stream), Replicate()
            if sequence_parallel and name in sharding.local_positions:
                # looked up inside the sequence-parallel region, from positions past + arange(T / tp)
                mod.register_forward_pre_hook(partial(_rank_positions, tp_mesh))
                idx = Shard(0)  # each rank's positions, shifted to its own slice
            styles = [RowwiseParallel(input_layouts=idx, output_layouts=out) if strategy == "vocab"
                      else _Replicated(idx, out)]
        elif isinstance(mod, nn.Linear) and isinstance(parent, (Attention, MLP, SwiGLU)):
            consumer = leaf in ("out_proj", "proj", "down_proj")  # reads the split activation, writes the stream
            extra = _extra_splits(mod, strategy)
            if strategy == "colwise":
                styles = [_Colwise(extra)]
            elif strategy == "rowwise":
                styles = [_Rowwise(extra, output_layouts=stream)]
            else:
                styles = [_Replicated(Replicate(), stream if consumer else Replicate())]
        elif isinstance(mod, nn.Linear):  # an output projection: reads the stream
            styles = [_Colwise(_extra_splits(mod, strategy), input_layouts=inp, output_layouts=Shard(-1),
                               use_local_output=False)
                      if strategy == "vocab" else _Replicated(inp, Replicate())]
            setattr(mod, VOCAB_PARALLEL, strategy == "vocab")
        else:
            styles = [_Replicated(Replicate(), Replicate())]
        frozen = [k for k, p in mod.named_parameters(recurse=False) if not p.requires_grad]  # train.freeze
        for style in styles:
            parallelize_module(mod, tp_mesh, style, src_data_rank=src)
        for k in frozen:  # torch's SequenceParallel makes new parameters that all require gradients
            getattr(mod, k).requires_grad_(False)
    for name, mod in model.named_modules():
        if isinstance(mod, Attention) and strategies.get(f"{name}.q_proj") == "colwise":
            mod.rng_stream = tp_mesh.get_local_rank()  # its attention dropout reads this rank's heads only
    if sequence_parallel:
        modules = dict(model.named_modules())
        for name, mod in modules.items():
            if isinstance(mod, (Attention, MLP)) and any(fnmatchcase(name, p) for p in sharding.stream_inputs):
                # a post-LayerNorm block's attention (x, mask) or MLP (x) reads this rank's slice of the
                # stream: gather it (its backward reduce-scatters the input gradient back to the slice)
                layouts = (Shard(1), None) if isinstance(mod, Attention) else (Shard(1),)
                parallelize_module(mod, tp_mesh, PrepareModuleInput(
                    input_layouts=layouts, desired_input_layouts=(Replicate(), *layouts[1:])))
        for name in (n for n in sharding.outside_query if n in modules):  # a pipeline stage may lack it
            # the query arrives as this rank's sequence slice; keys and values come from a LayerNorm
            # that already gathered them
            parallelize_module(modules[name], tp_mesh, PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)))
        for name, mod in modules.items():
            if any(fnmatchcase(name, p) for p in sharding.cross_attention):
                # (x, memory, mask, cache): gather the decoder's slice (a no-op where a norm gathered it
                # already) and the encoder output's slice
                parallelize_module(mod, tp_mesh, PrepareModuleInput(
                    input_layouts=(Shard(1), Shard(1), None, None),
                    desired_input_layouts=(Replicate(), Replicate(), None, None)))
    for owners in tied:  # distributed one by one above: tie them again
        first_owner, first_leaf = owners[0]
        for owner, leaf in owners[1:]:
            setattr(owner, leaf, getattr(first_owner, first_leaf))


def _tied_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, attribute) of every parameter that several modules share, grouped by parameter."""
    seen: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for leaf, p in mod.named_parameters(recurse=False):
            seen.setdefault(id(p), []).append((mod, leaf))
    return [owners for owners in seen.values() if len(owners) > 1]


def _rank_positions(mesh: DeviceMesh, module: nn.Module, args: tuple) -> tuple:
    """Positions ``past + arange(T / tp)`` computed from a local slice -> this rank's positions."""
    (pos,) = args
    return (pos + mesh.get_local_rank() * pos.numel(),)


def _extra_splits(mod: nn.Linear, strategy: str) -> dict[str, int | None]:
    """A linear layer's parameters beside ``weight`` and ``bias`` (a LoRA adapter's factors) -> the
    dimension that ``strategy`` splits (None: whole on every rank), as the module declares them in
    ``TP_SPLITS``; a parameter it does not declare cannot be split safely."""
    declared = getattr(mod, "TP_SPLITS", {}).get(strategy, {})
    extra = [k for k, _ in mod.named_parameters(recurse=False) if k not in ("weight", "bias")]
    missing = [k for k in extra if k not in declared]
    if missing:  # a programming error of the module, not a user's: the split would be a guess
        raise ValueError(f"{type(mod).__name__} declares no {strategy} split for {', '.join(missing)} (TP_SPLITS)")
    return {k: declared[k] for k in extra}


def _distribute_params(module: nn.Module, mesh: DeviceMesh, splits: dict[str, int | None], src) -> None:
    """Each parameter ``splits`` names -> a DTensor split along its dimension there (None: replicated)."""
    for key, dim in splits.items():
        p = getattr(module, key)
        dt = distribute_tensor(p, mesh, [Replicate() if dim is None else Shard(dim)], src_data_rank=src)
        module.register_parameter(key, nn.Parameter(dt, requires_grad=p.requires_grad))


class _Colwise(ColwiseParallel):
    """torch's ``ColwiseParallel`` (weight and bias split along the outputs) whose module may hold
    further parameters split as the module declares (``extra``: name -> dimension or None), e.g. a
    LoRA adapter's B along its outputs and A whole."""

    def __init__(self, extra: dict[str, int | None], **kwargs):
        super().__init__(**kwargs)
        self.extra = extra

    def _partition_linear_fn(self, name, module, device_mesh):
        splits = {"weight": 0, **({"bias": 0} if module.bias is not None else {}), **self.extra}
        _distribute_params(module, device_mesh, splits, self.src_data_rank)


class _Rowwise(RowwiseParallel):
    """torch's ``RowwiseParallel`` (weight split along the inputs, bias whole) with further parameters
    split as the module declares (``extra``), e.g. a LoRA adapter's A along its inputs and B whole:
    its partial product joins the weight's before the one all-reduce (or reduce-scatter)."""

    def __init__(self, extra: dict[str, int | None], **kwargs):
        super().__init__(**kwargs)
        self.extra = extra

    def _partition_linear_fn(self, name, module, device_mesh):
        super()._partition_linear_fn(name, module, device_mesh)
        _distribute_params(module, device_mesh, self.extra, self.src_data_rank)


class _Replicated(ParallelStyle):
    """Every rank holds the whole module: parameters become replicated DTensors, the input
    (``input_layout``) is gathered to whole, the output leaves as ``output_layout`` (a local slice of
    a replicated result needs no communication). Built from torch's ``distribute_module`` and
    ``PrepareModuleInputOutput``."""

    def __init__(self, input_layout: Placement, output_layout: Placement, local: bool = True):
        self.io = PrepareModuleInputOutput(input_layouts=input_layout, desired_input_layouts=Replicate(),
                                           output_layouts=Replicate(), desired_output_layouts=output_layout,
                                           use_local_output=local)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for key, p in list(mod.named_parameters(recurse=False)):
                dt = distribute_tensor(p.detach(), mesh, [Replicate()], src_data_rank=self.src_data_rank)
                mod.register_parameter(key, nn.Parameter(dt, requires_grad=p.requires_grad))

        distribute_module(module, device_mesh, replicate)
        return self.io._apply(module, device_mesh)


class _WholeOnEachRank(ParallelStyle):
    """An MoE layer under tensor parallelism: every tp rank runs the whole layer on the whole
    sequence with plain (not DTensor) weights, the same numbers on each: the input is gathered
    (under sp) and handed over as a local tensor, the output leaves as ``output_layout`` (this
    rank's slice under sp). Gradients are whole on every rank: the output slice's backward
    all-gathers, the input's keeps the slice. (Experts are split over ep, not over tp.)"""

    def __init__(self, output_layout: Placement):
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def before(mod, args):
            x, *rest = args
            if isinstance(x, DTensor):
                x = x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Replicate()])
            return (x, *rest)

        def after(mod, args, out):
            whole = DTensor.from_local(out, mesh, [Replicate()], run_check=False)
            return whole.redistribute(mesh, [self.output_layout]).to_local()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
        return module


def vocab_parallel(*models: nn.Module) -> bool:
    """Whether an output projection of ``models`` splits its outputs over the vocabulary."""
    return any(getattr(m, VOCAB_PARALLEL, False) for model in models for m in model.modules())


def loss_context(*models: nn.Module) -> contextlib.AbstractContextManager:
    """Where to compute the loss and call backward: torch's ``loss_parallel()`` when an output
    projection of ``models`` splits its outputs over the vocabulary (each rank reduces its slice of
    the softmax: the whole logits are never gathered), otherwise a no-op."""
    return loss_parallel() if vocab_parallel(*models) else contextlib.nullcontext()
