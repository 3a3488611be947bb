"""The cost model: step time, FLOP rate and memory per device of one layout, broken down by term.

MindSpore's auto-parallel cost (Zeng et al. 2021, sec. 3.2) is T = α·compute + β₁·intra-node model-parallel
traffic + β₂·inter-node traffic + γ·data-parallel traffic. Here each term is computed from the model's
shape and the layout, per pipeline stage and micro-batch:

compute     FLOPs of the stage's layers (forward, backward = 2× forward, recomputation) ÷ (peak ×
            matmul efficiency). The efficiency grows with the model's width: η = η_max · h / (h + n₀)
            (or is the rate ``loom calibrate`` measured).
tp          per layer and micro-batch, 2 all-reduces forward and 2 backward of the (b, s, h) activation
            (+2 when the forward is recomputed); reduce-scatter + all-gather under sp move the same bytes.
pp          the bubble, (pp − 1) / v stage-micro-batch times for 1F1B / interleaved / GPipe with v
            virtual stages (zero-bubble: a third of it), and the activation send/recv between stages.
dp / ZeRO   the gradient reduction (all-reduce; reduce-scatter + all-gather under ZeRO: the same bytes)
            over the data-parallel group, partly hidden behind the backward (``overlap``); ZeRO-3 adds
            a parameter all-gather per forward and per backward.
ep          per MoE layer and micro-batch, two all-to-alls of the routed tokens forward, two backward.

A collective over a group that fits inside a node runs at the intra-node bandwidth, otherwise at the
inter-node bandwidth; ring algorithms move 2(n−1)/n of the buffer for an all-reduce, (n−1)/n for an
all-gather, reduce-scatter or all-to-all.

Memory per device (the stage that holds the most): weights, gradients and optimizer state (18 bytes per
parameter in mixed precision: fp32 master 4 + bf16 copy 2 + fp32 gradient 4 + Adam 8, sharded by ZeRO), and
activations by Korthikanti et al. 2022 (per layer and micro-batch, bytes):

    none       s·b·h·(34 + 5·a·s/h)            / tp with sp; (10 + 24/tp + 5·a·s/(h·tp)) without
    selective  s·b·h·34 / tp with sp;           (10 + 24/tp) without
    full       2·s·b·h (the layer input)        / tp with sp

times the micro-batches in flight on the first stage (1F1B: pp; interleaved: pp·(1 + (pp−1)/(pp·v));
GPipe: all of them), plus the logits of the last stage and one layer's recomputed activations.

``tflops_per_device`` counts the FLOPs the hardware does (recomputation included), as Megatron-LM
reports its runs; ``mfu`` counts model FLOPs only (PaLM's definition, as ``loom train`` does).

A machine ``loom calibrate`` measured (:mod:`loom.planner.calibrate`; a CPU running gloo processes) adds
what dominates there and is negligible on a GPU cluster, each a measured figure of the profile:

overhead    fixed seconds per block and micro-batch (Python, autograd, kernel launches), more under
            tensor and sequence parallelism (distributed-tensor dispatch), data parallelism (FSDP's hooks,
            and its gradient reduction once per step) and recomputation; per micro-batch for embedding,
            head and loss. The FLOPs run at peak · η · h / (h + n₀) with η and n₀ fitted to whole blocks
            (the n₀ share is the element-wise work, ∝ h per token, which tensor parallelism without
            sequence parallelism leaves whole on every rank: LayerNorms, residual adds).
optimizer   per step: a cost per parameter tensor (more for distributed tensors) and per parameter.
contention  processes share the node's cores: P processes on C < P cores each run at C/P of their own
            speed while all are busy, so a phase where every rank computes takes P/C times a lone
            process's time; a pipeline's ramp-up and drain, where fewer ranks are busy, run faster
            (the schedule is taken slot by slot: m·v + pp − 1 slots of which min(k, pp, …) stages work).
collectives each kind (all-reduce, all-gather, reduce-scatter, all-to-all, send/recv) at its own measured
            latency and bandwidth; the gradient reduction is one collective per block (FSDP's buckets),
            under ZeRO a reduce-scatter of gradients and an all-gather of parameters, under ZeRO-3 the
            all-gathers once per micro-batch for forward and again for backward.
memory      fp32 training (``precision="fp32"``, what a CPU profile sets): 16 bytes per parameter
            (weights 4, gradients 4, Adam 8), fp32 activations as this code saves them (17 (b, s, h)
            tensors per block with flash attention and no dropout; under tensor parallelism 4 whole +
            13/tp, and the buffers of the forward's collectives), plus the runtime's own resident set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from loom.config import ModelConfig
from loom.models import build_model, count_params
from loom.planner.hardware import Cluster

# Fitted to Megatron-LM's Table 1 rows (tests/data/megatron2021_table1_subset.csv, tests/unit/test_planner.py):
ETA_MAX = 0.65  # matmul efficiency of an infinitely wide layer
ETA_N0 = 1200.0  # the hidden width at which it is half way there: η = η_max · h / (h + n₀)
DP_OVERLAP = 0.4  # share of the backward that hides the data-parallel gradient reduction
BYTES_ACT = 2  # bf16/fp16 activations
BYTES_PER_PARAM = {"weights": 4 + 2, "grads": 4, "optimizer": 8}
MEMORY_HEADROOM = 0.92  # the share of device memory a plan may fill (allocator fragmentation, workspaces)
# fp32 training (a CPU): weights, gradients, Adam moments; no second copy
FP32_BYTES_PER_PARAM = {"weights": 4, "grads": 4, "optimizer": 8}
# fp32 (b, s, h)-sized tensors a block saves for backward in this code (flash attention, no dropout):
# LayerNorm inputs and outputs 4, q/k/v 3, the attention output and its re-laid-out copy 2, the MLP's
# hidden activation before and after GELU 4 + 4. Of these, tensor parallelism splits all but the
# LayerNorms' (13); sequence parallelism splits the LayerNorm inputs too.
FP32_SAVED = {"whole": 4, "split": 13, "sp_split": 2}
# selective recomputation keeps the block input and the matmul outputs: q, k, v, the MLP's 4h (split by
# tp) and the two row-parallel projections' outputs (whole)
FP32_SELECTIVE = {"whole": 3, "split": 7}
FP32_BACKWARD_TRANSIENT = 8  # (b, s, h) tensors of gradients alive at once in a block's backward (the MLP's)
# whole (b, s, h) tensors per block that tensor parallelism keeps besides the saved ones until the backward:
# the buffers of the forward's two all-reduces (or reduce-scatters) of partial sums. Measured: a tp=4 rank's
# peak resident set grows by 12.5–14 (b, s, h) per block, where the saved tensors are 7.
FP32_TP_BUFFERS = 6


@dataclass(frozen=True)
class Layout:
    """One candidate layout (what :class:`loom.parallel.plan.Plan` holds, plus the micro-batch size)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sp: bool = False
    zero: int = 0
    recompute: str = "none"
    schedule: str = "1f1b"
    virtual_stages: int = 1
    micro_batch: int = 1  # sequences per micro-batch
    # 0: the model's vocabulary; else the rows of the embedding and output layer, the vocabulary padded
    # so that tp divides it (``model.vocab_size``; ids past the tokenizer's are never targets or sampled)
    vocab_size: int = 0

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp * self.pp

    def describe(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}"] + ([f"ep={self.ep}"] if self.ep > 1 else [])
        parts += [f"mb={self.micro_batch}", f"zero={self.zero}", f"recompute={self.recompute}"]
        if self.sp:
            parts.append("sp")
        if self.pp > 1:
            parts.append(self.schedule + (f"v{self.virtual_stages}" if self.virtual_stages > 1 else ""))
        if self.vocab_size:
            parts.append(f"vocab={self.vocab_size}")
        return " ".join(parts)


def layout_model(cfg: ModelConfig, layout: Layout) -> ModelConfig:
    """The model ``layout`` trains: ``cfg`` with the layout's padded vocabulary, if it has one."""
    return replace(cfg, vocab_size=layout.vocab_size) if layout.vocab_size else cfg


@dataclass
class Estimate:
    layout: Layout
    step_time_s: float
    time_s: dict[str, float]  # by term: compute, recompute, tp, pp_bubble, pp_p2p, dp, ep
    tflops_per_device: float  # hardware FLOPs (recomputation included) / time / device
    mfu: float  # model FLOPs / time / (device peak)
    memory_gb_per_device: float  # GiB on the fullest device
    memory_gb: dict[str, float]  # of that device, by kind
    memory_per_stage_gb: list[dict[str, float]] = field(default_factory=list)  # per pipeline rank
    microbatches: int = 1
    fits: bool = True
    params_per_device: int = 0  # parameters held by the fullest device (before ZeRO sharding)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = d.pop("layout")
        return d


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the cost model needs of a model, counted exactly as the engine holds it: per block the
    parameters tensor parallelism splits, those every tp rank keeps whole (LayerNorms, the biases
    added after a row-split projection, an MoE router), and the experts (split over ep)."""

    cfg: ModelConfig
    h: int
    heads: int
    vocab: int
    seq: int
    blocks: int  # decoder blocks (PanGu's top query layer is counted with the head)
    split_params: list[int]  # per block, divided by tp
    whole_params: list[int]  # per block, held whole by every tp rank
    expert_params: list[int]  # per block, divided by ep (0 for dense blocks)
    layer_flops: list[float]  # forward FLOPs per token per block (active parameters)
    head_flops: float  # forward FLOPs per token of the head (output projection, top query layer)
    first_split: int  # the first stage's: the token embedding (vocabulary-parallel)
    first_whole: int  # ... the position embedding
    last_split: int  # the last stage's: PanGu's top query layer (split part)
    last_whole: int  # ... the final LayerNorm, PanGu's query embedding and its layer's whole part
    tied: int  # the output projection's copy of the token embedding on a last stage of its own (split)
    moe_tokens_per_layer: list[int]  # k for MoE blocks, 0 otherwise
    total_params: int
    splits: dict = field(default_factory=dict, compare=False)  # n_stages -> blocks per stage (cache)
    # parameter tensors (what per-tensor optimizer costs count): per block, first and last stage's own
    layer_tensors: tuple[int, ...] = ()
    first_tensors: int = 2
    last_tensors: int = 2

    @property
    def layer_params(self) -> list[int]:
        return [a + b for a, b in zip(self.split_params, self.whole_params)]


def _block_params(cfg: ModelConfig, moe: bool) -> tuple[int, int, int]:
    """(split over tp, whole, experts) parameters of one block."""
    h, f, bias = cfg.n_embd, cfg.ffn, int(cfg.bias)
    norms = 2 * (h + bias * h)
    attn_split, attn_whole = 4 * h * h + 3 * bias * h, bias * h  # q, k, v (+ biases) and out_proj | its bias
    if moe:
        e, fe = cfg.moe.experts, cfg.expert_ffn
        router = h * e * (2 if cfg.moe.router == "noisy-topk" else 1)
        return attn_split, attn_whole + norms + router, e * (2 * h * fe + bias * (fe + h))
    return attn_split + 2 * h * f + bias * f, attn_whole + norms + bias * h, 0


def model_shape(cfg: ModelConfig, seq: int) -> Shape:
    h, f = cfg.n_embd, cfg.ffn
    blocks = cfg.n_layer - 1 if cfg.arch == "pangu" else cfg.n_layer
    split, whole, experts, flops, moe_k = [], [], [], [], []
    for i in range(blocks):
        moe = cfg.moe.is_moe_block(i)
        a, b, c = _block_params(cfg, moe)
        split.append(a)
        whole.append(b)
        experts.append(c)
        if moe:
            e, fe, k = cfg.moe.experts, cfg.expert_ffn, cfg.moe.top_k
            flops.append(2.0 * (4 * h * h + h * e + k * 2 * h * fe) + 4.0 * h * seq)
            moe_k.append(k)
        else:
            flops.append(2.0 * (4 * h * h + 2 * h * f) + 4.0 * h * seq)
            moe_k.append(0)
    pangu = cfg.arch == "pangu"
    top_split, top_whole, _ = _block_params(cfg, False) if pangu else (0, 0, 0)
    top = (2.0 * (4 * h * h + 2 * h * f) + 4.0 * h * seq) if pangu else 0.0
    ln_f = h + int(cfg.bias) * h
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    layer_tensors = tuple(sum(n.startswith(f"layers.{i}.") for n in names) for i in range(blocks))
    first_tensors = sum(n.startswith(("tok_emb.", "pos_emb.")) for n in names)
    return Shape(cfg, h, cfg.n_head, cfg.vocab_size, seq, blocks, split, whole, experts, flops,
                 2.0 * h * cfg.vocab_size + top, cfg.vocab_size * h, cfg.block_size * h, top_split,
                 ln_f + top_whole + (cfg.block_size * h if pangu else 0), cfg.vocab_size * h, moe_k,
                 count_params(model), layer_tensors=layer_tensors, first_tensors=first_tensors,
                 last_tensors=len(names) - sum(layer_tensors) - first_tensors)


def stage_blocks(sh: Shape, n_stages: int) -> list[list[int]]:
    """The blocks of each pipeline stage, as the pipeline splits them (FLOP-balanced)."""
    if n_stages not in sh.splits:
        from loom.parallel.pipeline import stage_layout

        sh.splits[n_stages] = [list(spec.blocks) for spec in stage_layout(sh.cfg, n_stages)]
    return sh.splits[n_stages]


def rank_stages(layout: Layout) -> list[list[int]]:
    """The stages each pipeline rank holds (several under interleaved and zero-bubble schedules)."""
    from loom.parallel.pipeline import stage_ids

    v = layout.virtual_stages if layout.pp > 1 else 1
    return [stage_ids(r, layout.pp, v, layout.schedule) if v > 1 else [r] for r in range(layout.pp)]


# --------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------


def _bandwidth(cluster: Cluster, group: int, stride: int) -> tuple[float, float]:
    """(bytes/s, latency) of a group of ``group`` ranks ``stride`` apart in rank order: inside one node
    when it fits there."""
    a = cluster.accelerator
    if group * stride <= a.devices_per_node:
        return a.intra_node_bw, a.intra_latency_s
    return a.inter_node_bw, a.inter_latency_s


def _link(cluster: Cluster, kind: str, group: int, stride: int) -> tuple[float, float]:
    """(bytes/s, latency) of collective ``kind`` over ``group`` ranks ``stride`` apart: the figures
    ``loom calibrate`` measured for that kind when the group is inside a node and it measured them."""
    if group * stride <= cluster.accelerator.devices_per_node:
        measured = cluster.accelerator.collective(kind)
        if measured is not None:
            return measured
    return _bandwidth(cluster, group, stride)


def all_reduce_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def all_gather_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Also reduce-scatter and all-to-all: each rank moves (n-1)/n of the buffer."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bw + (n - 1) * lat


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def contention(cluster: Cluster, layout: Layout) -> float:
    """How many times slower a process runs while every process of its node computes: processes per
    node ÷ the cores they share (1 where each device is its own, as GPUs are)."""
    acc = cluster.accelerator
    if not acc.cores_per_node:
        return 1.0
    return max(1.0, min(layout.world_size, acc.devices_per_node) / acc.cores_per_node)


def efficiency(acc, h: int) -> float:
    """Achieved / peak FLOP rate of a model of width ``h``."""
    if acc.matmul_efficiency is None:
        return ETA_MAX * h / (h + ETA_N0)
    if acc.matmul_half_width:
        return acc.matmul_efficiency * h / (h + acc.matmul_half_width)
    return acc.matmul_efficiency


def estimate(cfg: ModelConfig, layout: Layout, cluster: Cluster, global_batch: int, seq: int,
             shape: Shape | None = None, precision: str | None = None) -> Estimate:
    """Predicted step time and memory of ``layout`` training ``cfg`` on ``cluster`` with batches of
    ``global_batch`` sequences of ``seq`` tokens with Adam, in ``precision``: ``bf16`` mixed precision
    or ``fp32`` (default: what the accelerator trains in, bf16 but on a CPU)."""
    cfg = layout_model(cfg, layout)
    sh = shape if shape is not None and shape.vocab == cfg.vocab_size else model_shape(cfg, seq)
    L = layout
    acc = cluster.accelerator
    fp32 = (precision or acc.precision) == "fp32"
    h, s, b = sh.h, seq, L.micro_batch
    replicas = L.dp * L.ep
    m = max(1, global_batch // (replicas * b))  # micro-batches per step per pipeline
    v = L.virtual_stages if L.pp > 1 else 1
    stages = stage_blocks(sh, L.pp * v)  # as the pipeline splits the model
    held = rank_stages(L)  # the stages of each pipeline rank
    # a calibrated machine knows its achieved rate (measured by `loom calibrate`, by width)
    flops_rate = acc.peak_flops * efficiency(acc, h)
    tokens = b * s
    act = tokens * h * (4 if fp32 else BYTES_ACT)  # one (b, s, h) activation
    kappa = contention(cluster, L)

    tp_bw, tp_lat = _link(cluster, "all_reduce", L.tp, 1)
    ep_bw, ep_lat = _link(cluster, "all_to_all", L.ep, L.tp)
    pp_bw, pp_lat = _link(cluster, "send_recv", 2, L.tp * replicas)
    # per block and micro-batch: seconds of fixed cost (a calibrated CPU's; 0 elsewhere)
    block_overhead = acc.layer_overhead_s + (acc.tp_layer_overhead_s if L.tp > 1 else 0.0) \
        + (acc.sp_layer_overhead_s if L.tp > 1 and L.sp else 0.0) + (acc.dp_layer_overhead_s if replicas > 1 else 0.0) \
        + {"none": 0.0, "selective": acc.selective_overhead_s, "full": acc.full_overhead_s}[L.recompute]

    # per pipeline rank and micro-batch: forward+backward compute, recomputation, tp and ep communication
    per_stage = []
    for mine in held:
        blocks = [i for si in mine for i in stages[si]]
        fwd = sum(sh.layer_flops[i] for i in blocks) * tokens / L.tp
        head = sh.head_flops * tokens / L.tp if len(stages) - 1 in mine else 0.0
        recompute = {"none": 0.0, "selective": 4.0 * h * s * tokens * len(blocks) / L.tp,
                     "full": fwd}[L.recompute]
        compute = 3 * (fwd + head) / flops_rate
        re_t = recompute / flops_rate
        if acc.matmul_half_width and L.tp > 1 and not L.sp:
            # the width-proportional (element-wise) share of a calibrated rate: the LayerNorms and residual
            # adds run whole on every tp rank unless sequence parallelism splits them
            whole = acc.matmul_half_width / h * (L.tp - 1) / (acc.peak_flops * acc.matmul_efficiency)
            compute += 3 * fwd * whole
            re_t += recompute * whole
        n_ar = 4 + (2 if L.recompute == "full" else 0)
        if L.sp and acc.collective("all_gather") and acc.collective("reduce_scatter"):
            # sequence parallel: each all-reduce is an all-gather and a reduce-scatter (measured apart)
            one = all_gather_s(act, L.tp, *_link(cluster, "all_gather", L.tp, 1)) \
                + all_gather_s(act, L.tp, *_link(cluster, "reduce_scatter", L.tp, 1))
        else:
            one = all_reduce_s(act, L.tp, tp_bw, tp_lat)
        tp_t = len(blocks) * n_ar * one
        moe_blocks = [i for i in blocks if sh.moe_tokens_per_layer[i]]
        ep_t = sum(4 * all_gather_s(act * sh.moe_tokens_per_layer[i], L.ep, ep_bw, ep_lat) for i in moe_blocks)
        overhead = len(blocks) * block_overhead + acc.microbatch_overhead_s * (
            (0.5 if 0 in mine else 0.0) + (0.5 if len(stages) - 1 in mine else 0.0))
        per_stage.append({"compute": compute, "recompute": re_t, "overhead": overhead, "tp": tp_t, "ep": ep_t,
                          "hw_flops": 3 * (fwd + head) + recompute})
    # seconds of a stage's micro-batch while every process computes: the processor's work slowed by
    # contention, and the communication
    cpu_terms, comm_terms = ("compute", "recompute", "overhead"), ("tp", "ep")
    slowest = max(per_stage, key=lambda d: kappa * sum(d[k] for k in cpu_terms) + sum(d[k] for k in comm_terms))
    t_mb = kappa * sum(slowest[k] for k in cpu_terms) + sum(slowest[k] for k in comm_terms)
    p2p = (2 * act / L.tp / pp_bw + 2 * pp_lat) * v if L.pp > 1 else 0.0  # send forward, receive backward
    time = {k: slowest[k] * m * (kappa if k in cpu_terms else 1.0) for k in (*cpu_terms, *comm_terms)}
    if L.pp == 1:
        time["pp_bubble"] = 0.0
    elif acc.cores_per_node:
        time["pp_bubble"] = _contended_pipeline(cluster, L, m, v, sum(slowest[k] for k in cpu_terms),
                                                sum(slowest[k] for k in comm_terms)) - m * t_mb
    else:
        time["pp_bubble"] = (L.pp - 1) / v * t_mb
    if L.schedule == "zero-bubble":
        time["pp_bubble"] /= 3
    time["pp_p2p"] = p2p * m

    # data parallel: gradients of this device's parameters over the replicas (experts over dp only)
    dense_dev, expert_dev = max(_rank_params(sh, stages, L), key=sum)
    time["dp"] = _data_parallel_s(cluster, L, dense_dev, expert_dev, m, fp32,
                                  buckets=max(len(stages[si]) for si in range(len(stages))) * v + 1,
                                  backward=time["compute"] * 2 / 3)
    time["optimizer"] = kappa * _optimizer_s(sh, stages, L, acc, dense_dev, expert_dev)
    if replicas > 1 and acc.dp_sync_layer_overhead_s:  # FSDP's gradient reduction, per block it syncs
        syncs = m if L.zero >= 2 and L.pp == 1 else 1
        blocks_here = max(sum(len(stages[si]) for si in held_) for held_ in held)
        time["overhead"] += kappa * syncs * blocks_here * acc.dp_sync_layer_overhead_s
    step = sum(time.values())

    hw_flops = sum(d["hw_flops"] for d in per_stage) * L.tp * m * replicas  # the whole job's
    model_flops = 3.0 * (sum(sh.layer_flops) + sh.head_flops) * s * global_batch  # 6N + 12·L·h·s per token
    world = L.world_size
    memory, per_stage_mem = _memory(sh, stages, L, m, acc, fp32)
    return Estimate(
        layout=L, step_time_s=step, time_s=time,
        tflops_per_device=hw_flops / step / world / 1e12,
        mfu=model_flops / step / world / acc.peak_flops,
        memory_gb_per_device=sum(memory.values()), memory_gb=memory, memory_per_stage_gb=per_stage_mem,
        microbatches=m, fits=sum(memory.values()) * 2**30 <= acc.memory_bytes * MEMORY_HEADROOM,
        params_per_device=int(dense_dev + expert_dev))


def _contended_pipeline(cluster: Cluster, L: Layout, m: int, v: int, cpu_s: float, comm_s: float) -> float:
    """Seconds of a pipeline's m micro-batches on processes that share cores: the schedule in slots of one
    stage-micro-batch (1/v of a rank's), m·v + pp − 1 of them; in slot j, k = min(j, pp, slots + 1 − j)
    stages work, and with them k/pp of the node's processes, each slowed by max(1, busy / cores)."""
    acc = cluster.accelerator
    procs = min(L.world_size, acc.devices_per_node)
    slots = m * v + L.pp - 1
    total = 0.0
    for j in range(1, slots + 1):
        busy = procs * min(j, L.pp, slots + 1 - j) / L.pp
        total += (cpu_s * max(1.0, busy / acc.cores_per_node) + comm_s) / v
    return total


def _data_parallel_s(cluster: Cluster, L: Layout, dense: float, experts: float, m: int, fp32: bool,
                     buckets: int, backward: float) -> float:
    """The gradient reduction over the replicas (and ZeRO's parameter gathers), less what the backward
    hides. One collective per block (``buckets``): the latency counts that often."""
    replicas = L.dp * L.ep
    if replicas <= 1:
        return 0.0
    param_bytes = 4 if fp32 else 2  # what FSDP gathers: the working copy
    grad_bytes = 4
    dp_ar = _link(cluster, "all_reduce", replicas, L.tp)
    ex_ar = _link(cluster, "all_reduce", L.dp, L.tp * L.ep)

    def lat(link):  # the latency of `buckets` collectives
        return link[0], link[1] * buckets

    if L.zero == 0:
        comm = all_reduce_s(dense * grad_bytes, replicas, *lat(dp_ar))
        if experts:
            comm += all_reduce_s(experts * grad_bytes, L.dp, *lat(ex_ar))
    else:
        rs = _link(cluster, "reduce_scatter", replicas, L.tp)
        ag = _link(cluster, "all_gather", replicas, L.tp)
        ex_rs = _link(cluster, "reduce_scatter", L.dp, L.tp * L.ep)
        ex_ag = _link(cluster, "all_gather", L.dp, L.tp * L.ep)
        reductions = m if L.zero >= 2 and L.pp == 1 else 1  # ZeRO-2/3 reduce every accumulation micro-step
        gathers = 2 * m if L.zero == 3 else 1  # ZeRO-3: for each micro-batch's forward and backward
        comm = reductions * all_gather_s(dense * grad_bytes, replicas, *lat(rs))
        comm += gathers * all_gather_s(dense * param_bytes, replicas, *lat(ag))
        if experts:
            comm += reductions * all_gather_s(experts * grad_bytes, L.dp, *lat(ex_rs))
            comm += gathers * all_gather_s(experts * param_bytes, L.dp, *lat(ex_ag))
    return max(0.0, comm - DP_OVERLAP * backward) if not cluster.accelerator.cores_per_node else comm


def _optimizer_s(sh: Shape, stages: list[list[int]], L: Layout, acc, dense: float, experts: float) -> float:
    """A calibrated machine's optimizer step (with gradient clipping) on the fullest pipeline rank: per
    parameter tensor (distributed tensors cost more) and per parameter of its shard."""
    if not (acc.optimizer_tensor_s or acc.optimizer_param_s or acc.dtensor_tensor_s):
        return 0.0
    tensors = 0
    for held in rank_stages(L):
        n = 0
        for si in held:
            n += sum(sh.layer_tensors[i] for i in stages[si]) if sh.layer_tensors else 0
            n += sh.first_tensors if si == 0 else 0
            n += sh.last_tensors if si == len(stages) - 1 else 0
        tensors = max(tensors, n)
    distributed = L.tp > 1 or L.dp * L.ep > 1
    shard = dense / (L.dp * L.ep if L.zero else 1) + experts / (L.dp if L.zero else 1)
    return tensors * (acc.optimizer_tensor_s + (acc.dtensor_tensor_s if distributed else 0.0)) \
        + shard * acc.optimizer_param_s


def _stage_params(sh: Shape, stages: list[list[int]], si: int, L: Layout) -> tuple[float, float]:
    """(dense parameters, expert parameters) per device of stage ``si`` of ``stages``: what tensor
    parallelism splits divided by tp, what it keeps whole, experts divided by ep."""
    blocks = stages[si]
    split = sum(sh.split_params[i] for i in blocks)
    whole = sum(sh.whole_params[i] for i in blocks)
    if si == 0:
        split, whole = split + sh.first_split, whole + sh.first_whole
    if si == len(stages) - 1:
        split, whole = split + sh.last_split, whole + sh.last_whole
        if 0 not in _holder(si, L):  # the output projection's own copy of the embedding
            split += sh.tied
    experts = sum(sh.expert_params[i] for i in blocks)
    return split / L.tp + whole, experts / L.ep


def _holder(si: int, L: Layout) -> list[int]:
    """All stages held by the pipeline rank that holds stage ``si``."""
    for held in rank_stages(L):
        if si in held:
            return held
    return [si]


def _rank_params(sh: Shape, stages: list[list[int]], L: Layout) -> list[tuple[float, float]]:
    """(dense, experts) per device of each pipeline rank."""
    out = []
    for held in rank_stages(L):
        parts = [_stage_params(sh, stages, si, L) for si in held]
        out.append((sum(p[0] for p in parts), sum(p[1] for p in parts)))
    return out


def _memory(sh: Shape, stages, L: Layout, m: int, acc, fp32: bool = False
            ) -> tuple[dict[str, float], list[dict[str, float]]]:
    if fp32:
        return _memory_fp32(sh, stages, L, m, acc)
    h, s, b, a = sh.h, sh.seq, L.micro_batch, sh.heads
    replicas = L.dp * L.ep
    per_stage = []
    for r, ((dense, experts), mine) in enumerate(zip(_rank_params(sh, stages, L), rank_stages(L))):
        shard_dense = replicas if L.zero else 1
        shard_exp = L.dp if L.zero else 1
        weights = (dense / (shard_dense if L.zero == 3 else 1) + experts / (shard_exp if L.zero == 3 else 1)) * 4 \
            + (dense + experts) * 2  # fp32 master (sharded under ZeRO-3) + the bf16 working copy
        grads = (dense / (shard_dense if L.zero >= 2 else 1) + experts / (shard_exp if L.zero >= 2 else 1)) * 4
        optimizer = (dense / shard_dense + experts / shard_exp) * 8
        layers = sum(len(stages[si]) for si in mine)
        sbh = s * b * h
        if L.recompute == "none":
            per_layer = sbh * ((34 + 5 * a * s / h) / L.tp if L.sp else 10 + 24 / L.tp + 5 * a * s / (h * L.tp))
        elif L.recompute == "selective":
            per_layer = sbh * (34 / L.tp if L.sp else 10 + 24 / L.tp)
        else:
            per_layer = 2 * sbh / (L.tp if L.sp else 1)
        activations = per_layer * layers * _in_flight(L, m, r)
        if L.recompute == "full":  # one layer's activations live while it is recomputed
            activations += sbh * (10 + 24 / L.tp + 5 * a * s / (h * L.tp))
        if len(stages) - 1 in mine:
            activations += s * b * sh.vocab / L.tp * 4 * 2  # fp32 logits and their gradient
        gib = 2**30
        per_stage.append({"weights": weights / gib, "grads": grads / gib, "optimizer": optimizer / gib,
                          "activations": activations / gib})
    worst = max(per_stage, key=lambda d: sum(d.values()))
    return dict(worst), per_stage


def _in_flight(L: Layout, m: int, r: int) -> float:
    """Micro-batches whose activations pipeline rank ``r`` holds at once."""
    if L.pp == 1:
        return 1
    if L.schedule == "gpipe":
        return m
    if L.virtual_stages > 1:
        return min(m, L.pp * (1 + (L.pp - 1) / (L.pp * L.virtual_stages)))
    return min(m, L.pp - r)


def _memory_fp32(sh: Shape, stages, L: Layout, m: int, acc) -> tuple[dict[str, float], list[dict[str, float]]]:
    """fp32 training, as on a CPU: :data:`FP32_BYTES_PER_PARAM` (ZeRO shards them; FSDP keeps a shard of
    weights and gradients beside the gathered ones), activations as this code saves them, and the
    runtime's own memory (``Accelerator.runtime_bytes``, measured by ``loom calibrate``)."""
    h, s, b, tp = sh.h, sh.seq, L.micro_batch, L.tp
    replicas = L.dp * L.ep
    sbh = s * b * h * 4  # bytes of one fp32 (b, s, h) tensor
    per_stage = []
    for r, ((dense, experts), mine) in enumerate(zip(_rank_params(sh, stages, L), rank_stages(L))):
        n = dense + experts
        shard = dense / replicas + experts / L.dp if L.zero else n
        biggest_block = max((sh.layer_params[i] / tp for si in mine for i in stages[si]), default=0.0)
        # FSDP (data parallelism) keeps a rank's shard of the weights and of the reduced gradients beside
        # the gathered ones (also when the shard is everything, ZeRO-0); ZeRO-3 gathers two blocks at a
        # time (one prefetched), ZeRO-2/3 reduce each block's gradients as soon as they are complete
        fsdp = shard if replicas > 1 else 0.0
        if L.zero == 3:
            weights, grads = shard + 2 * biggest_block, shard + biggest_block
        elif L.zero == 2:
            weights, grads = n + fsdp, shard + biggest_block
        else:
            weights, grads = n + fsdp, n + fsdp
        weights, grads = weights * 4, grads * 4
        optimizer = shard * FP32_BYTES_PER_PARAM["optimizer"]
        layers = sum(len(stages[si]) for si in mine)
        whole, split = FP32_SAVED["whole"], FP32_SAVED["split"]
        full_layer = (whole - FP32_SAVED["sp_split"] * (1 - 1 / tp) * L.sp + split / tp
                      + (FP32_TP_BUFFERS if tp > 1 else 0)) * sbh
        if L.recompute == "none":
            per_layer = full_layer
        elif L.recompute == "selective":
            per_layer = (FP32_SELECTIVE["whole"] + FP32_SELECTIVE["split"] / tp) * sbh
        else:
            per_layer = sbh / (tp if L.sp else 1)  # the block's input
        activations = per_layer * layers * _in_flight(L, m, r)
        if L.recompute != "none":  # one block's activations live again while it is recomputed
            activations += full_layer
        activations += FP32_BACKWARD_TRANSIENT * sbh / tp
        if len(stages) - 1 in mine:  # logits, their log-softmax and the gradients of both
            activations += 4 * s * b * sh.vocab / tp * 4
        gib = 2**30
        per_stage.append({"weights": weights / gib, "grads": grads / gib, "optimizer": optimizer / gib,
                          "activations": activations / gib,
                          "runtime": (acc.runtime_bytes + (acc.tp_runtime_bytes if tp > 1 else 0.0)) / gib})
    worst = max(per_stage, key=lambda d: sum(d.values()))
    return dict(worst), per_stage
