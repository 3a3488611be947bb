"""Sparse Mixture-of-Experts feed-forward layers, single-device PyTorch only.

An :class:`MoE` layer replaces a block's dense MLP: a router picks ``k`` of ``E`` expert MLPs for each
token and the layer returns the gate-weighted sum of their outputs. Three routers:

``switch``      Switch Transformer (Fedus et al. 2022): top-1, gate = the chosen expert's softmax
                probability; load-balancing loss α·E·Σ_i f_i·P_i.
``top2``        GShard / GLaM (Lepikhin et al. 2021; Du et al. 2022): the two best experts, gates
                renormalized over the pair; the second is kept with probability 2·g₂ (random routing)
                while training; the same load-balancing loss over the first choices.
``noisy-topk``  Shazeer et al. 2017: H = x·W_g + N(0,1)·softplus(x·W_noise) while training, top k,
                softmax over the k kept; importance and load losses, w·(CV(importance)² + CV(load)²).

Every router is computed in at least fp32 and adds the router z-loss (Zoph et al. 2022), β·mean(logsumexp²).

**Groups.** Capacity and the auxiliary losses are defined per *group* of tokens, as in GShard, and a
group is one sequence of the batch. Expert capacity is ``ceil(k · T · capacity_factor / E)`` tokens
of a sequence of T; a token over capacity is dropped from that expert (its output is zero there, and
the block's residual path carries it on). First choices take places before second choices, earlier
positions before later ones. Because nothing crosses sequences, the routing of a sequence, its
dropped tokens and its losses are the same however the batch is split over devices, micro-batches
or accumulation steps.

**Dispatch** is by sorting: the (token, choice) assignments are sorted by expert, the experts run on
contiguous slices, and the outputs are added back at the tokens' indices, so memory grows with
tokens × k (never with a tokens × experts × capacity one-hot tensor). :class:`Experts` holds all E
experts' weights as stacked tensors (E, ...) and runs them on such sorted tokens; expert parallelism
(:mod:`loom.parallel.expert`) splits those tensors along E and moves tokens with all-to-all around
the same call.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common.numerics import at_least_fp32
from loom.models.config import ModelConfig

# Per layer and forward pass, what the trainer reports (summed over passes and devices):
# tokens routed to each expert before the capacity cut (E values), then these.
STAT_FIELDS = ("assignments", "dropped", "aux_loss", "z_loss", "groups")

_recording = True


@contextlib.contextmanager
def no_stats():
    """Forward passes run inside this (activation recomputation) leave the statistics alone."""
    global _recording
    previous, _recording = _recording, False
    try:
        yield
    finally:
        _recording = previous


@dataclass
class Routing:
    experts: torch.Tensor  # (N, k) int64: chosen experts, best first
    gates: torch.Tensor  # (N, k) fp32: combine weights
    active: torch.Tensor  # (N, k) bool: whether the choice is routed at all (top-2's random routing)
    aux_loss: torch.Tensor  # scalar, weighted
    z_loss: torch.Tensor  # scalar, weighted
    all_active: bool = True  # every choice routed (then no mask is applied: a mask costs a host sync)


class Dispatch(NamedTuple):
    """Where an MoE layer's kept (token, choice) assignments go, sorted by expert."""

    token: torch.Tensor  # (M,) int64: the token of each kept assignment
    gate: torch.Tensor  # (M,): its combine weight
    expert: torch.Tensor  # (M,) int64: its expert (non-decreasing)
    counts: torch.Tensor  # (E,) int64: kept assignments per expert
    dropped: int  # assignments over capacity
    load: torch.Tensor  # (E,) int64: routed assignments per expert, before the capacity cut


class Router(nn.Module):
    """Linear gate ``x -> logits`` over the experts, in fp32, and the routing rule of ``kind``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.kind, self.k, self.n_experts, self.random_routing = m.router, m.top_k, m.experts, m.random_routing
        self.aux_weight, self.z_weight = m.aux_loss_weight, m.z_loss_weight
        self.gate = nn.Linear(cfg.n_embd, m.experts, bias=False)
        if self.kind == "noisy-topk":
            self.noise = nn.Linear(cfg.n_embd, m.experts, bias=False)

    def forward(self, x: torch.Tensor, group_size: int) -> Routing:
        """``x``: (N, C) tokens, ``N / group_size`` groups of consecutive tokens."""
        with torch.autocast(x.device.type, enabled=False):
            x = at_least_fp32(x)
            logits = F.linear(x, self.gate.weight.to(x.dtype))  # (N, E)
            z = torch.logsumexp(logits, dim=-1).pow(2).mean() * self.z_weight
            if self.kind == "noisy-topk":
                return self._noisy_topk(x, logits, group_size, z)
            return self._softmax_topk(logits, group_size, z)

    def _softmax_topk(self, logits: torch.Tensor, group_size: int, z: torch.Tensor) -> Routing:
        probs = logits.softmax(dim=-1)  # (N, E)
        gates, experts = probs.topk(self.k, dim=-1)  # (N, k)
        active = torch.ones_like(experts, dtype=torch.bool)
        random_routing = self.kind == "top2" and self.training and self.random_routing
        if self.kind == "top2":
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-9)
            if random_routing:  # GShard's random routing: keep the second with probability 2·g2
                active[:, 1] = torch.rand(gates.size(0), device=gates.device) < 2 * gates[:, 1].detach()
        # f_i: fraction of the group's tokens whose first choice is i; P_i: mean probability of i
        e = self.n_experts
        g = logits.size(0) // group_size
        first = F.one_hot(experts[:, 0], e).to(probs.dtype).view(g, group_size, e).mean(dim=1)  # (G, E)
        mean_p = probs.view(g, group_size, e).mean(dim=1)  # (G, E)
        aux = self.aux_weight * e * (first * mean_p).sum(dim=-1).mean()
        return Routing(experts, gates, active, aux, z, all_active=not random_routing)

    def _noisy_topk(self, x: torch.Tensor, clean: torch.Tensor, group_size: int, z: torch.Tensor) -> Routing:
        std = F.softplus(F.linear(x, self.noise.weight.to(x.dtype))) + 1e-2  # (N, E)
        noisy = clean + torch.randn_like(clean) * std if self.training else clean
        k, e = self.k, self.n_experts
        top = noisy.topk(min(k + 1, e), dim=-1)
        experts = top.indices[:, :k]
        gates = top.values[:, :k].softmax(dim=-1)
        active = torch.ones_like(experts, dtype=torch.bool)
        g = x.size(0) // group_size
        importance = torch.zeros_like(clean).scatter(1, experts, gates).view(g, group_size, e).sum(dim=1)
        if k < e:  # P(expert i stays in the top k when its noise is drawn again), eq. 8-9
            kth_in, kth_out = top.values[:, k:k + 1], top.values[:, k - 1:k]
            is_in = noisy > kth_in
            threshold = torch.where(is_in, kth_in, kth_out)
            p_in = torch.distributions.Normal(0.0, 1.0).cdf((clean - threshold) / std)
            load = p_in.view(g, group_size, e).sum(dim=1)
        else:
            load = torch.full_like(importance, float(group_size))
        aux = self.aux_weight * (_cv_squared(importance) + _cv_squared(load))
        return Routing(experts, gates, active, aux, z)


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over the experts, per group (rows), averaged over groups."""
    return (v.var(dim=-1, unbiased=False) / (v.mean(dim=-1).pow(2) + 1e-10)).mean()


def expert_ffn(x: torch.Tensor, counts: list[int] | torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
               w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """Tokens ``x`` (M, C) sorted by expert, ``counts[e]`` of them for expert ``e`` -> (M, C): expert
    e's GELU MLP on its slice. Weights: w1 (E, C, H), b1 (E, H), w2 (E, H, C), b2 (E, C).

    The output depends on ``x`` and on every weight in autograd even when no expert got a token
    (M = 0): under expert parallelism the backward of the all-to-all that brought ``x`` is a
    collective, and a rank whose experts received nothing must still take part in it (or its peers
    wait forever), and its weights must get a (zero) gradient like their data-parallel replicas'.

    Where torch has a grouped matrix multiply for the dtype (``torch._grouped_mm``: fp32/bf16/fp16 on
    a CPU, bf16 on Hopper GPUs), all experts run as two grouped GEMMs with no host sync; otherwise
    (float64, other devices) as a loop of two matmuls per expert."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if _grouped_mm_runs(x.device, dtype, w1.shape[1:]):
        return _grouped_expert_ffn(x.to(dtype), counts, w1, b1, w2, b2)
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
    outs = []
    for e, xe in enumerate(torch.split(x, counts)):
        if xe.numel() == 0:
            continue
        h = xe @ w1[e].to(xe.dtype)
        if b1 is not None:
            h = h + b1[e].to(xe.dtype)
        h = F.gelu(h, approximate="tanh") @ w2[e].to(xe.dtype)
        outs.append(h + b2[e].to(xe.dtype) if b2 is not None else h)
    if outs:
        return torch.cat(outs)
    unused = sum(w.sum() for w in (w1, b1, w2, b2) if w is not None) * 0
    return x * 0 + unused.to(x.dtype)  # (0, C), still in the graph


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype, inner: torch.Size) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: its kernels want rows of 16-byte multiples."""
    if not hasattr(torch, "_grouped_mm") or any(n * torch.finfo(dtype).bits // 8 % 16 for n in inner):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


def _grouped_expert_ffn(x: torch.Tensor, counts: list[int] | torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                        w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """:func:`expert_ffn` as two grouped GEMMs: expert e multiplies rows offs[e-1]:offs[e] of ``x``."""
    dtype = x.dtype
    counts = torch.as_tensor(counts, device=x.device)
    offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's tokens
    rows = None
    if b1 is not None or b2 is not None:  # each row's expert, for its biases
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts, output_size=x.size(0))
    h = torch._grouped_mm(x, w1.to(dtype), offs=offs)  # (M, H)
    if b1 is not None:
        h = h + b1.to(dtype).index_select(0, rows)
    y = torch._grouped_mm(F.gelu(h, approximate="tanh"), w2.to(dtype), offs=offs)  # (M, C)
    return y + b2.to(dtype).index_select(0, rows) if b2 is not None else y


class Experts(nn.Module):
    """E expert MLPs (C -> H -> C, GELU), their weights stacked along a leading expert dimension."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, c, h = cfg.moe.experts, cfg.n_embd, cfg.expert_ffn
        self.w1 = nn.Parameter(torch.empty(e, c, h))
        self.w2 = nn.Parameter(torch.empty(e, h, c))
        self.b1 = nn.Parameter(torch.empty(e, h)) if cfg.bias else None
        self.b2 = nn.Parameter(torch.empty(e, c)) if cfg.bias else None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` (M, C) sorted by expert, ``counts`` (E,) tokens per expert -> (M, C)."""
        return expert_ffn(x, counts, self.w1, self.b1, self.w2, self.b2)


class MoE(nn.Module):
    """The MoE feed-forward layer: route, dispatch by sorting, run the experts, combine."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.n_experts, self.k, self.capacity_factor = m.experts, m.top_k, m.capacity_factor
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        # what d(loss)/d(aux losses) is in backward: the factor the training loop applies to the
        # language-model loss before backward (1/accumulation steps, the fp16 loss scale)
        self.aux_grad_scale = 1.0
        self.stats: list[torch.Tensor] = []  # one row of E + len(STAT_FIELDS) statistics per training forward

    def capacity(self, group_size: int) -> int:
        if self.capacity_factor <= 0:
            return group_size  # no limit: a token picks an expert at most once
        return max(1, math.ceil(self.k * group_size * self.capacity_factor / self.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        flat = x.reshape(b * t, c)
        route = self.router(flat, group_size=t)
        d = self._dispatch(route, b, t)
        # index_select, not flat[token]: its backward is an index_add, where advanced indexing's is a
        # sorting index_put
        y = self.experts(flat.index_select(0, d.token), d.counts)  # (M, C), sorted by expert
        # summed in the stream's dtype: under autocast the grouped experts give bf16/fp16 rows
        out = torch.zeros_like(flat).index_add_(0, d.token, (y * d.gate.to(y.dtype)[:, None]).to(flat.dtype))
        out = self.drop(out.view(b, t, c))
        if self.training and _recording:
            self._record(route, d, b)
        if self.training and torch.is_grad_enabled():
            out = _AuxLossGrad.apply(out, route.aux_loss + route.z_loss, self.aux_grad_scale)
        return out

    def _dispatch(self, route: Routing, groups: int, group_size: int) -> Dispatch:
        """The kept assignments sorted by (expert, sequence, choice, position), in one sort: within a
        (expert, sequence) run that order is the sequence's queue for the expert (first choices first,
        then by position), so an assignment's place in its queue is its rank in the run, and those
        placed at or past the capacity are dropped."""
        n, k = route.experts.shape
        e_count = self.n_experts
        expert = route.experts.reshape(-1)  # assignment a = token * k + choice
        a = torch.arange(n * k, device=expert.device)
        gate = route.gates.reshape(-1)
        if not route.all_active:  # one selection (one host sync) for all three
            a = route.active.reshape(-1).nonzero().squeeze(1)
            expert, gate = expert.index_select(0, a), gate.index_select(0, a)
        token, choice = a // k, a % k
        group, pos = token // group_size, token % group_size
        segment = expert * groups + group  # (expert, sequence) queue of each assignment
        order = ((segment * k + choice) * group_size + pos).argsort()
        seg_counts = torch.bincount(segment, minlength=e_count * groups)  # (E * G,)
        cap = self.capacity(group_size)
        if cap >= group_size:  # no queue can overflow: a token takes an expert at most once
            kept = order
            counts = seg_counts.view(e_count, groups).sum(1)
            dropped = 0
        else:
            seg = segment[order]
            place = torch.arange(order.numel(), device=order.device) - (seg_counts.cumsum(0) - seg_counts)[seg]
            kept = order[place < cap]  # one host sync
            counts = seg_counts.clamp(max=cap).view(e_count, groups).sum(1)
            dropped = order.numel() - kept.numel()
        return Dispatch(token.index_select(0, kept), gate.index_select(0, kept), expert.index_select(0, kept),
                        counts, dropped, seg_counts.view(e_count, groups).sum(1))

    @torch.no_grad()
    def _record(self, route: Routing, d: Dispatch, groups: int) -> None:
        f64 = torch.float64  # counts exact, losses as computed (float64 under fp64)
        load = d.load.to(f64)
        routed = float(d.token.numel() + d.dropped)  # assignments routed, kept or not
        extra = torch.stack([route.aux_loss.detach().to(f64), route.z_loss.detach().to(f64)]) * groups
        fixed = torch.tensor([routed, float(d.dropped)], dtype=f64, device=load.device)
        self.stats.append(torch.cat([load, fixed, extra, fixed.new_full((1,), float(groups))]))


class _AuxLossGrad(torch.autograd.Function):
    """Identity on the layer's output whose backward also sends ``scale`` into the auxiliary loss, so
    the loss joins the gradient from inside the model, wherever the language-model loss is computed
    (on another pipeline stage, too) (the device used by Megatron-LM's MoE layers)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """The MoE layers of ``model`` by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def moe_initial_value(name: str, shape: torch.Size, n_layer: int, generator: torch.Generator) -> torch.Tensor:
    """GPT-2 style initial values of an MoE layer's parameter: N(0, 0.02) router and first expert
    projections, the second scaled by 1/sqrt(2 n_layer) (a residual output), zero biases."""
    leaf = name.rpartition(".")[2]
    if leaf in ("b1", "b2"):
        return torch.zeros(shape)
    std = 0.02 / math.sqrt(2 * n_layer) if leaf == "w2" else 0.02
    return torch.empty(shape).normal_(0.0, std, generator=generator)
