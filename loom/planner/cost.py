"""The cost model: step time, FLOP rate and memory per device of one plan, broken down by term.

The model's shape is :mod:`loom.planner.shape`'s, communication :mod:`loom.planner.comm`'s, memory
:mod:`loom.planner.memory`'s; this module adds them up into an :class:`Estimate`.

MindSpore's auto-parallel cost (Zeng et al. 2021, sec. 3.2) is T = α·compute + β₁·intra-node model-parallel
traffic + β₂·inter-node traffic + γ·data-parallel traffic. Here each term is computed from the model's
shape and the layout, per pipeline stage and micro-batch:

compute     FLOPs of the stage's layers (forward, backward = 2× forward, recomputation) ÷ (peak ×
            matmul efficiency). The efficiency grows with the model's width: η = η_max · h / (h + n₀)
            (or is the rate ``loom calibrate`` measured).
tp          per layer and micro-batch, 2 all-reduces forward and 2 backward of the (b, s, h) activation
            (+2 when the forward is recomputed); reduce-scatter + all-gather under sp move the same bytes.
pp          the bubble, (pp − 1) / v stage-micro-batch times for 1F1B / interleaved / GPipe with v
            virtual stages (zero-bubble: a third of it), and the activation send/recv between stages
            (each tp rank sends the whole (b, s, h) activation, or its 1/tp slice under sp).
dp / ZeRO   the gradient reduction (all-reduce; reduce-scatter + all-gather under ZeRO: the same bytes)
            over the data-parallel group, partly hidden behind the backward (``overlap``); ZeRO-3 adds
            a parameter all-gather per forward and per backward.
ep          per MoE layer and micro-batch, two all-to-alls of the routed tokens forward, two backward.

A collective over a group that fits inside a node runs at the intra-node bandwidth, otherwise at the
inter-node bandwidth; ring algorithms move 2(n−1)/n of the buffer for an all-reduce, (n−1)/n for an
all-gather, reduce-scatter or all-to-all.

Memory per device (the stage that holds the most): weights, gradients and optimizer state as FSDP2 holds
them under each ZeRO stage (:func:`loom.planner.memory.state_bytes`: fp32 master, bf16 working copy,
fp32 gradient, Adam 8 bytes, each sharded where the engine shards it), and
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

from loom.models import ModelConfig
from loom.parallel.plan import Plan
from loom.planner.comm import all_gather_s, all_reduce_s, data_parallel_s, link
from loom.planner.hardware import Cluster
from loom.planner.memory import BYTES_ACT, MEMORY_HEADROOM, memory
from loom.planner.shape import Shape, model_shape, rank_params, rank_stages, stage_blocks

# Fitted to Megatron-LM's Table 1 rows (tests/data/megatron2021_table1_subset.csv, tests/unit/test_planner.py):
ETA_MAX = 0.65  # matmul efficiency of an infinitely wide layer
ETA_N0 = 1200.0  # the hidden width at which it is half way there: η = η_max · h / (h + n₀)

__all__ = ["MEMORY_HEADROOM", "Estimate", "estimate", "padded_model", "plan_for_batch"]


def plan_for_batch(global_batch: int, micro_batch: int = 1, **layout) -> Plan:
    """The :class:`Plan` of ``layout`` (dp, tp, pp, ep, sp, zero, recompute, schedule, virtual_stages)
    whose replicas each take micro-batches of ``micro_batch`` sequences out of ``global_batch``: as
    many pipeline micro-batches as that makes under pp > 1, else as many accumulation steps; ZeRO
    over the whole dp group."""
    plan = Plan(**layout)
    steps = max(1, global_batch // (plan.data_parallel * micro_batch))
    return replace(plan, shard_group=plan.dp if plan.zero else 1,
                   virtual_stages=plan.virtual_stages if plan.pp > 1 else 1,
                   microbatches=steps if plan.pp > 1 else 1, grad_accum=1 if plan.pp > 1 else steps)


def padded_model(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """The model a plan trains: ``cfg`` with the vocabulary padded for tensor parallelism, if it is."""
    return replace(cfg, vocab_size=vocab_size) if vocab_size else cfg


@dataclass
class Estimate:
    plan: Plan
    global_batch: int
    step_time_s: float
    time_s: dict[str, float]  # by term: compute, recompute, tp, pp_bubble, pp_p2p, dp, ep
    tflops_per_device: float  # hardware FLOPs (recomputation included) / time / device
    mfu: float  # model FLOPs / time / (device peak)
    memory_gb_per_device: float  # GiB on the fullest device
    memory_gb: dict[str, float]  # of that device, by kind
    memory_per_stage_gb: list[dict[str, float]] = field(default_factory=list)  # per pipeline rank
    microbatches: int = 1  # per optimizer step and pipeline (pipeline micro-batches × accumulation steps)
    fits: bool = True
    params_per_device: int = 0  # parameters held by the fullest device (before ZeRO sharding)
    # 0: the model's vocabulary; else the rows of the embedding and output layer, the vocabulary padded
    # so that tp divides it (``model.vocab_size``; ids past the tokenizer's are never targets or sampled)
    vocab_size: int = 0

    @property
    def micro_batch(self) -> int:
        """Sequences per micro-batch of one replica."""
        return self.plan.micro_batch(self.global_batch)

    def describe(self) -> str:
        """The plan in the planner's words, e.g. ``dp=16 tp=8 pp=8 mb=1 zero=1 recompute=full sp 1f1b``."""
        p = self.plan
        parts = [f"dp={p.dp}", f"tp={p.tp}", f"pp={p.pp}"] + ([f"ep={p.ep}"] if p.ep > 1 else [])
        parts += [f"mb={self.micro_batch}", f"zero={p.zero}", f"recompute={p.recompute}"]
        if p.sp:
            parts.append("sp")
        if p.pp > 1:
            parts.append(p.schedule + (f"v{p.virtual_stages}" if p.virtual_stages > 1 else ""))
        if self.vocab_size:
            parts.append(f"vocab={self.vocab_size}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        return d


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def contention(cluster: Cluster, layout: Plan) -> float:
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


def estimate(cfg: ModelConfig, plan: Plan, cluster: Cluster, global_batch: int, seq: int,
             shape: Shape | None = None, precision: str | None = None, vocab_size: int = 0) -> Estimate:
    """Predicted step time and memory of ``plan`` training ``cfg`` (its vocabulary padded to
    ``vocab_size``, if given) on ``cluster`` with batches of ``global_batch`` sequences of ``seq``
    tokens with Adam, in ``precision``: ``bf16`` mixed precision or ``fp32`` (default: what the
    accelerator trains in, bf16 but on a CPU)."""
    cfg = padded_model(cfg, vocab_size)
    sh = shape if shape is not None and shape.vocab == cfg.vocab_size else model_shape(cfg, seq)
    L = plan
    acc = cluster.accelerator
    fp32 = (precision or acc.precision) == "fp32"
    h, s, b = sh.h, seq, plan.micro_batch(global_batch)
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

    tp_bw, tp_lat = link(cluster, "all_reduce", L.tp, 1)
    ep_bw, ep_lat = link(cluster, "all_to_all", L.ep, L.tp)
    pp_bw, pp_lat = link(cluster, "send_recv", 2, L.tp * replicas)
    # per block and micro-batch: seconds of fixed cost (a calibrated CPU's; 0 elsewhere)
    block_overhead = acc.layer_overhead_s + (acc.tp_layer_overhead_s if L.tp > 1 else 0.0) \
        + (acc.sp_layer_overhead_s if L.tp > 1 and L.sp else 0.0) + (acc.dp_layer_overhead_s if replicas > 1 else 0.0) \
        + {"none": 0.0, "selective": acc.selective_overhead_s, "full": acc.full_overhead_s}[L.recompute]

    # per pipeline rank and micro-batch: forward+backward compute, recomputation, tp and ep communication
    per_stage = []
    for mine in held:
        blocks = [i for si in mine for i in stages[si]]
        # every tp rank runs the whole MoE layer (its experts are split over ep, not tp): expert FLOPs
        # are not divided by tp
        experts = sum(_expert_flops(sh, i) for i in blocks)
        fwd = (sum(sh.layer_flops[i] for i in blocks) - experts) * tokens / L.tp + experts * tokens
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
            one = all_gather_s(act, L.tp, *link(cluster, "all_gather", L.tp, 1)) \
                + all_gather_s(act, L.tp, *link(cluster, "reduce_scatter", L.tp, 1))
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
    # send forward, receive backward: every tensor a stage hands on (an encoder-decoder's: memory and target)
    p2p = (2 * sh.stage_tensors * stage_send_bytes(act, L) / pp_bw + 2 * pp_lat) * v if L.pp > 1 else 0.0
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
    dense_dev, expert_dev = max(rank_params(sh, stages, L), key=sum)
    time["dp"] = data_parallel_s(cluster, L, dense_dev, expert_dev, m, fp32,
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
    mem, per_stage_mem = memory(sh, stages, L, b, m, acc, fp32)
    return Estimate(
        plan=L, global_batch=global_batch, vocab_size=vocab_size, step_time_s=step, time_s=time,
        tflops_per_device=hw_flops / step / world / 1e12,
        mfu=model_flops / step / world / acc.peak_flops,
        memory_gb_per_device=sum(mem.values()), memory_gb=mem, memory_per_stage_gb=per_stage_mem,
        microbatches=m, fits=sum(mem.values()) * 2**30 <= acc.memory_bytes * MEMORY_HEADROOM,
        params_per_device=int(dense_dev + expert_dev))


def stage_send_bytes(act: float, L: Plan) -> float:
    """Bytes each device sends to the next pipeline stage per tensor handed on, of a (b, s, h) activation
    of ``act`` bytes: the residual stream is a plain tensor (:mod:`loom.parallel.tensor`), this rank's
    1/tp slice of the sequence under sequence parallelism, else the whole of it on every tp rank, and
    each tp rank sends its own to its peer in the next stage (no scatter before the send and all-gather
    after it, Megatron-LM's optimization)."""
    return act / L.tp if L.sp else act


def _expert_flops(sh: Shape, i: int) -> float:
    """Forward FLOPs per token of block ``i``'s experts: each token meets k of the E experts."""
    k = sh.moe_tokens_per_layer[i]
    return 2.0 * sh.expert_params[i] * k / sh.cfg.moe.experts if k else 0.0


def _contended_pipeline(cluster: Cluster, L: Plan, m: int, v: int, cpu_s: float, comm_s: float) -> float:
    """Seconds of a pipeline's m micro-batches on processes that share cores: the schedule in slots of one
    stage-micro-batch (1/v of a rank's), m·v + pp − 1 of them; in slot j, k = min(j, pp, m·v, slots + 1 − j)
    stages work (no more than there are micro-batches: GPipe may run fewer than pp), and with them k/pp
    of the node's processes, each slowed by max(1, busy / cores)."""
    acc = cluster.accelerator
    procs = min(L.world_size, acc.devices_per_node)
    slots = m * v + L.pp - 1
    total = 0.0
    for j in range(1, slots + 1):
        busy = procs * min(j, L.pp, m * v, slots + 1 - j) / L.pp
        total += (cpu_s * max(1.0, busy / acc.cores_per_node) + comm_s) / v
    return total


def _optimizer_s(sh: Shape, stages: list[list[int]], L: Plan, acc, dense: float, experts: float) -> float:
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
