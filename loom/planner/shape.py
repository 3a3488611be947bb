"""What the cost model needs of a model, counted exactly as the engine holds it.

Read off the family's cost description (:func:`loom.models.costs`: parameters and FLOPs per block,
first and last stage) and its model on the meta device, whose parameters are sorted by how the
engine's own strategy resolution (:func:`loom.parallel.strategy.resolve_strategies`) treats them:
*split* over tp (column- and row-split weights, the vocabulary-split embedding and output layer, a
column-split projection's bias), *whole* on every tp rank (LayerNorms, the bias added after a row-split
projection's reduction, replicated modules, an MoE router) and *experts* (split over ep).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.models import ModelConfig, build_model, costs, spec_of
from loom.models.common import SwiGLU
from loom.parallel.expert import EXPERT_PARAM
from loom.parallel.plan import Plan
from loom.parallel.strategy import resolve_strategies


@dataclass(frozen=True)
class Shape:
    cfg: ModelConfig
    h: int
    heads: int
    vocab: int
    seq: int
    blocks: int  # entries of the block container (what pipeline stages share out)
    split_params: list[int]  # per block, divided by tp
    whole_params: list[int]  # per block, held whole by every tp rank
    expert_params: list[int]  # per block, divided by ep (0 for dense blocks)
    layer_flops: list[float]  # forward FLOPs per token per block (active parameters)
    head_flops: float  # forward FLOPs per token of the last stage's own modules (output projection, ...)
    first_split: int  # the first stage's own modules: split over tp (a vocabulary-parallel embedding)
    first_whole: int  # ... whole (a position embedding)
    last_split: int  # the last stage's own modules, split (e.g. PanGu-α's top query layer's projections)
    last_whole: int  # ... whole (the final LayerNorm, ...)
    tied: int  # a last stage on a rank of its own holds its copy of a tied parameter: split over tp
    moe_tokens_per_layer: list[int]  # k for MoE blocks, 0 otherwise
    total_params: int
    splits: dict = field(default_factory=dict, compare=False)  # n_stages -> blocks per stage (cache)
    # parameter tensors (what per-tensor optimizer costs count): per block, first and last stage's own
    layer_tensors: tuple[int, ...] = ()
    first_tensors: int = 2
    last_tensors: int = 2
    tied_whole: int = 0  # ... or whole, when its module is replicated
    # what a block's activations are made of, in (b, s, h) tensors (the memory model's activation terms):
    kv_ratio: float = 1.0  # key/value heads per query head (grouped-query attention: < 1)
    mlp_hidden: float = 8.0  # the MLP's hidden activations saved for backward (GELU 4h: before and after, 8)
    mlp_matmul_out: float = 4.0  # ... of them, the outputs of its first matrix multiplies (GELU: 4; SwiGLU: 2·ffn/h)

    @property
    def layer_params(self) -> list[int]:
        return [a + b for a, b in zip(self.split_params, self.whole_params)]


def model_shape(cfg: ModelConfig, seq: int) -> Shape:
    spec = spec_of(cfg)
    model = build_model(cfg)
    split = spec.pipeline_split(cfg)
    strategies = resolve_strategies(model, spec.sharding.table, {}, tp=1, dp=1)
    c = costs(cfg, seq)
    n = spec.n_blocks(cfg)
    per_block = [[0, 0, 0, 0] for _ in range(n)]  # split, whole, experts, tensors
    first, last = [0, 0, 0], [0, 0, 0]  # split, whole, tensors
    prefix = split.blocks + "."
    for name, p in model.named_parameters():  # a tied parameter once, under its source's name
        owner, _, leaf = name.rpartition(".")
        strategy = strategies.get(owner, "replicate")
        kind = 2 if EXPERT_PARAM in name else 0 if strategy in ("colwise", "vocab") or (
            strategy == "rowwise" and leaf != "bias") else 1
        if name.startswith(prefix):
            row = per_block[int(name[len(prefix):].split(".", 1)[0])]
            row[kind] += p.numel()
            row[3] += 1
        else:
            part = first if name.split(".", 1)[0] in split.first else last
            part[min(kind, 1)] += p.numel()
            part[2] += 1
    tied = tied_whole = 0
    for target, source in split.tied:
        size = model.get_parameter(source).numel()
        if strategies.get(target.rpartition(".")[0], "replicate") == "vocab":
            tied += size
        else:
            tied_whole += size
    return Shape(cfg, cfg.n_embd, cfg.n_head, cfg.vocab_size, seq, n,
                 split_params=[r[0] for r in per_block], whole_params=[r[1] for r in per_block],
                 expert_params=[r[2] for r in per_block], layer_flops=[b.flops for b in c.blocks],
                 head_flops=c.last.flops, first_split=first[0], first_whole=first[1], last_split=last[0],
                 last_whole=last[1], tied=tied, moe_tokens_per_layer=[b.experts_top_k for b in c.blocks],
                 total_params=c.params, layer_tensors=tuple(r[3] for r in per_block), first_tensors=first[2],
                 last_tensors=last[2], tied_whole=tied_whole, **_activation_widths(cfg, model))


def _activation_widths(cfg: ModelConfig, model) -> dict:
    """Grouped-query attention saves keys and values of n_kv_head heads; a GELU MLP of width f saves
    its hidden activation before and after the GELU (2·f/h tensors), a SwiGLU MLP the gate, its SiLU,
    the up projection and their product (4·f/h), of which the gate and up are matmul outputs."""
    r = cfg.ffn / cfg.n_embd
    gated = any(isinstance(m, SwiGLU) for m in model.modules())
    return dict(kv_ratio=cfg.kv_heads / cfg.n_head, mlp_hidden=(4 if gated else 2) * r,
                mlp_matmul_out=(2 if gated else 1) * r)


def stage_blocks(sh: Shape, n_stages: int) -> list[list[int]]:
    """The blocks of each pipeline stage, as the pipeline splits them (FLOP-balanced)."""
    if n_stages not in sh.splits:
        from loom.parallel.pipeline import stage_layout

        sh.splits[n_stages] = [list(spec.blocks) for spec in stage_layout(sh.cfg, n_stages)]
    return sh.splits[n_stages]


def rank_stages(plan: Plan) -> list[list[int]]:
    """The stages each pipeline rank holds (several under interleaved and zero-bubble schedules)."""
    from loom.parallel.pipeline import stage_ids

    v = plan.virtual_stages if plan.pp > 1 else 1
    return [stage_ids(r, plan.pp, v, plan.schedule) if v > 1 else [r] for r in range(plan.pp)]


def stage_params(sh: Shape, stages: list[list[int]], si: int, plan: Plan) -> tuple[float, float]:
    """(dense parameters, expert parameters) per device of stage ``si`` of ``stages``: what tensor
    parallelism splits divided by tp, what it keeps whole, experts divided by ep."""
    blocks = stages[si]
    split = sum(sh.split_params[i] for i in blocks)
    whole = sum(sh.whole_params[i] for i in blocks)
    if si == 0:
        split, whole = split + sh.first_split, whole + sh.first_whole
    if si == len(stages) - 1:
        split, whole = split + sh.last_split, whole + sh.last_whole
        if 0 not in _holder(si, plan):  # the last stage's own copy of a tied parameter
            split, whole = split + sh.tied, whole + sh.tied_whole
    experts = sum(sh.expert_params[i] for i in blocks)
    return split / plan.tp + whole, experts / plan.ep


def _holder(si: int, plan: Plan) -> list[int]:
    """All stages held by the pipeline rank that holds stage ``si``."""
    for held in rank_stages(plan):
        if si in held:
            return held
    return [si]


def rank_params(sh: Shape, stages: list[list[int]], plan: Plan) -> list[tuple[float, float]]:
    """(dense, experts) per device of each pipeline rank."""
    out = []
    for held in rank_stages(plan):
        parts = [stage_params(sh, stages, si, plan) for si in held]
        out.append((sum(p[0] for p in parts), sum(p[1] for p in parts)))
    return out
