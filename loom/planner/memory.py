"""Memory per device: weights, gradients and optimizer state (sharded by ZeRO), and activations.

Mixed precision (a GPU): up to 18 bytes per parameter (fp32 master 4 + bf16 copy 2 + fp32 gradient 4 +
Adam 8, sharded where FSDP2 shards them: :func:`state_bytes`) and activations by Korthikanti et al.
2022 (per layer and micro-batch, bytes):

    none       s·b·h·(34 + 5·a·s/h)            / tp with sp; (10 + 24/tp + 5·a·s/(h·tp)) without
    selective  s·b·h·34 / tp with sp;           (10 + 24/tp) without
    full       2·s·b·h (the layer input)        / tp with sp

(24: GPT's block; :func:`split_activation_bytes` counts it for grouped-query attention, a SwiGLU
MLP or another MLP width) times the micro-batches in flight on the first stage (1F1B: pp;
interleaved: pp·(1 + (pp−1)/(pp·v)); GPipe: all of them), plus the logits of the last stage and one
layer's recomputed activations.

fp32 training (a CPU, as ``loom calibrate`` measures it): 16 bytes per parameter (weights 4, gradients
4, Adam 8), fp32 activations as this code saves them, plus the runtime's own resident set.

Weights, gradients and optimizer state are counted as FSDP2 (``fully_shard``, every ZeRO stage) holds
them (:func:`state_bytes`), which tests/distributed/test_memory_accounting.py checks byte for byte
against the tensors a rank holds during a real step.
"""

from __future__ import annotations

from loom.parallel.plan import Plan
from loom.planner.shape import Shape, rank_params, rank_stages

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
# an encoder-decoder's cross-attention, per layer, in (b, s, h) tensors (source as long as target): its
# norm's input and output (whole; 2 bytes each in Korthikanti's count, plus the output dropout's mask 1)
# and what attention itself keeps (split over tp): q, k, v and the attention output with its re-laid-out
# copy (fp32: 5; mixed precision: Korthikanti's attention, 8 bytes + the 5·a·s scores). Under sequence
# parallelism the memory gathered for the keys and values is one more whole tensor.
FP32_CROSS = {"whole": 2, "split": 5}
CROSS_BYTES = {"whole": 5, "split": 8}


# bytes per element of the master weights (and their gradients and Adam moments) and of the working copy
# FSDP gathers for forward and backward, by training precision
STATE_DTYPE_BYTES = {"bf16": (4, 2), "fp16": (4, 2), "fp32": (4, 4), "fp64": (8, 8)}


def state_bytes(sh: Shape, stages, L: Plan, precision: str = "bf16", grad_accum: int = 1,
                params: list[tuple[float, float]] | None = None) -> list[dict[str, float]]:
    """Per pipeline rank: the bytes of weights, gradients and Adam state a device holds at their largest
    between the blocks' collectives of a step, as FSDP2 keeps them under every ZeRO stage (the engine's
    data parallelism, :mod:`loom.parallel.data`). With n the rank's parameters (after tp/pp/ep) and
    ``shard`` its share of them (``n / (shard_group·ep)`` dense, ``/ shard_group`` experts; n under
    zero=0 or without data parallelism):

    weights     the fp32 master ``shard`` (FSDP keeps it sharded at rest for zero 1, 2 and 3 alike) plus
                the working copy FSDP gathers (bf16 under mixed precision, else the master's dtype): all n
                from forward to backward for zero 0–2 (zero=0 is FSDP over a shard group of one: the
                master and a gathered copy, two fp32 copies in fp32 training; but without tp, pp and ep
                zero=0 is DDP, ``Plan.replicated_dp``: the n parameters alone, no gathered copy, and
                gradients in DDP's buckets, one copy); under zero=3 only the root
                group (embedding, final norm, head) stays gathered between blocks; under a pipeline,
                torch's stages keep every block gathered from its backward to the step's end, zero=3 too.
    grads       ``shard`` after each micro-step's reduce-scatter, except where FSDP keeps whole
                (unsharded) gradients: zero=0, zero=1 between accumulation micro-steps, and every stage
                under a pipeline (torch's stages reduce once, after the last micro-batch).
    optimizer   Adam's two moments of the master shard.

    Not counted here (:func:`memory` adds them): the gradients of the block being reduced and the
    parameters gathered ahead (prefetch) during a block's backward. Parameter shards are counted
    unpadded (FSDP pads dim 0 to a multiple of the shard group). With ``offload`` the master, its
    sharded gradients and the optimizer state are in host memory: counted as ``host``, not the device's.
    ``params``: :func:`rank_params`, if the caller has it."""
    master, work = STATE_DTYPE_BYTES[precision]
    out = []
    for (dense, experts), mine in zip(params or rank_params(sh, stages, L), rank_stages(L)):
        fsdp_dense, fsdp_experts = L.dp * L.ep > 1, L.dp > 1  # what data parallelism wraps
        shard_dense = L.shard_group * L.ep if L.zero and fsdp_dense else 1
        shard_experts = L.shard_group if L.zero and fsdp_experts else 1
        n = dense + experts
        shard = dense / shard_dense + experts / shard_experts
        gathered = dense * fsdp_dense + experts * fsdp_experts
        if L.zero == 3 and L.pp == 1:
            gathered = _root_params(sh, stages, L, mine) * fsdp_dense
        whole_grads = L.pp > 1 or (L.zero == 1 and grad_accum > 1)
        if L.replicated_dp:  # DDP: the parameters themselves, their gradients as views of its buckets
            gathered = 0.0
        held = {"weights": shard * master + gathered * work, "grads": (n if whole_grads else shard) * master,
                "optimizer": shard * 2 * master}
        if L.offload != "none" and precision in ("bf16", "fp16"):  # a GPU: the shard lives in host memory
            held = {"weights": gathered * work, "grads": n * master if whole_grads else 0.0, "optimizer": 0.0,
                    "host": shard * master * 4}  # master, its sharded gradient, two moments
        out.append(held)
    return out


def _root_params(sh: Shape, stages, L: Plan, mine: list[int]) -> float:
    """Parameters per device of a pipeline rank's stages outside their blocks (embedding, final norm,
    head): the root FSDP group, which stays gathered from forward to backward."""
    from loom.planner.shape import stage_params

    total = 0.0
    for si in mine:
        dense, _ = stage_params(sh, stages, si, L)
        blocks = sum(sh.split_params[i] / L.tp + sh.whole_params[i] for i in stages[si])
        total += dense - blocks
    return total


def split_activation_bytes(sh: Shape) -> float:
    """Korthikanti et al.'s 24 (bytes per s·b·h of the 16-bit activations that tensor parallelism
    splits: Q, K 4, V 2, the output projection's input 2, the MLP's 4h before and after GELU 16), for
    this model's shape: keys and values of grouped-query attention's heads, a SwiGLU or other-width MLP."""
    return 2 * (1 + 2 * sh.kv_ratio) + 2 + 2 * sh.mlp_hidden


def memory(sh: Shape, stages, L: Plan, b: int, m: int, acc, fp32: bool = False
            ) -> tuple[dict[str, float], list[dict[str, float]]]:
    if fp32:
        return _memory_fp32(sh, stages, L, b, m, acc)
    h, s, a = sh.h, sh.seq, sh.heads
    replicas = L.dp * L.ep
    per_stage = []
    params = rank_params(sh, stages, L)
    state = state_bytes(sh, stages, L, "bf16", L.grad_accum, params)
    for r, mine in enumerate(rank_stages(L)):
        held = state[r]
        weights, grads, optimizer = held["weights"], held["grads"], held["optimizer"]
        if L.replicated_dp:  # autocast's cache: a bf16 cast of each weight from its first use to backward
            weights += sum(params[r]) * STATE_DTYPE_BYTES["bf16"][1]
        elif L.pp == 1 and replicas > 1:  # a block's gradient before its reduction; under zero=3 two blocks gathered
            block = max((sh.layer_params[i] / L.tp for si in mine for i in stages[si]), default=0.0)
            grads += block * 2
            weights += 2 * block * 2 if L.zero == 3 else 0.0
        layers = sum(len(stages[si]) for si in mine)
        sbh = s * b * h
        split = split_activation_bytes(sh)  # 24 for GPT's block
        if L.recompute == "none":
            per_layer = sbh * ((10 + split + 5 * a * s / h) / L.tp if L.sp
                               else 10 + split / L.tp + 5 * a * s / (h * L.tp))
        elif L.recompute == "selective":
            per_layer = sbh * ((10 + split) / L.tp if L.sp else 10 + split / L.tp)
        else:
            per_layer = 2 * sbh / (L.tp if L.sp else 1)
        activations = per_layer * layers * in_flight(L, m, r)
        cross = sum(sh.cross_layers[i] for si in mine for i in stages[si]) if sh.cross_layers else 0
        activations += (cross * cross_attention_bytes(L, L.recompute, a, s, h) + carried_bytes(sh, L)) \
            * sbh * in_flight(L, m, r)
        if L.recompute == "full":  # one layer's activations live while it is recomputed
            activations += sbh * (10 + split / L.tp + 5 * a * s / (h * L.tp))
        if len(stages) - 1 in mine:
            activations += s * b * sh.vocab / L.tp * 4 * 2  # fp32 logits and their gradient
        gib = 2**30
        per_stage.append({"weights": weights / gib, "grads": grads / gib, "optimizer": optimizer / gib,
                          "activations": activations / gib})
    worst = max(per_stage, key=lambda d: sum(d.values()))
    return dict(worst), per_stage


def cross_attention_bytes(L: Plan, recompute: str, a: int, s: int, h: int) -> float:
    """Bytes per s·b·h that one cross-attention layer keeps for backward in mixed precision
    (:data:`CROSS_BYTES`, Korthikanti et al.'s attention terms); none under full recomputation (its
    block keeps only its inputs, which it shares with the blocks around it)."""
    if recompute == "full":
        return 0.0
    split = CROSS_BYTES["split"] + (5 * a * s / h if recompute == "none" else 0.0)
    if L.sp:
        return (CROSS_BYTES["whole"] + split) / L.tp + 2
    return CROSS_BYTES["whole"] + split / L.tp


def carried_bytes(sh: Shape, L: Plan, nbytes: int = BYTES_ACT) -> float:
    """Bytes per s·b·h of what the blocks carry beside the stream (an encoder-decoder's memory in the
    decoder, the embedded target in the encoder): one tensor per micro-batch in flight, not a copy per block."""
    return (sh.stage_tensors - 1) * nbytes / (L.tp if L.sp else 1)


def in_flight(L: Plan, m: int, r: int) -> float:
    """Micro-batches whose activations pipeline rank ``r`` holds at once."""
    if L.pp == 1:
        return 1
    if L.schedule == "gpipe":
        return m
    if L.virtual_stages > 1:
        return min(m, L.pp * (1 + (L.pp - 1) / (L.pp * L.virtual_stages)))
    return min(m, L.pp - r)


def fp32_saved_per_layer(L: Plan, recompute: str, sh: Shape | None = None) -> float:
    """(b, s, h)-sized tensors one block saves for backward in fp32 under ``recompute`` (this code's
    blocks: SDPA attention, no dropout), per tp rank; ``sh`` adapts GPT's block to this model's shape
    (keys and values of grouped-query attention, a SwiGLU or other-width MLP). Measured against the
    tensors a block really keeps alive from forward to backward in tests/unit/test_activation_memory.py."""
    tp = L.tp
    kv = 1 + 2 * (sh.kv_ratio if sh is not None else 1.0)  # q, k, v
    if recompute == "none":
        # FP32_SAVED's split 13 = q, k, v 3 + attention output 2 + MLP 8
        split = FP32_SAVED["split"] - 3 - 8 + kv + (sh.mlp_hidden if sh is not None else 8)
        return FP32_SAVED["whole"] - FP32_SAVED["sp_split"] * (1 - 1 / tp) * L.sp + split / tp
    if recompute == "selective":
        split = FP32_SELECTIVE["split"] - 3 - 4 + kv + (sh.mlp_matmul_out if sh is not None else 4)
        return FP32_SELECTIVE["whole"] + split / tp
    return 1 / (tp if L.sp else 1)  # the block's input


def _memory_fp32(sh: Shape, stages, L: Plan, b: int, m: int, acc) -> tuple[dict[str, float], list[dict[str, float]]]:
    """fp32 training, as on a CPU: :data:`FP32_BYTES_PER_PARAM` (ZeRO shards them; FSDP keeps a shard of
    weights and gradients beside the gathered ones), activations as this code saves them, and the
    runtime's own memory (``Accelerator.runtime_bytes``, measured by ``loom calibrate``)."""
    h, s, tp = sh.h, sh.seq, L.tp
    replicas = L.dp * L.ep
    sbh = s * b * h * 4  # bytes of one fp32 (b, s, h) tensor
    per_stage = []
    for r, ((dense, experts), mine) in enumerate(zip(rank_params(sh, stages, L), rank_stages(L))):
        n = dense + experts
        shard = dense / replicas + experts / L.dp if L.zero else n
        biggest_block = max((sh.layer_params[i] / tp for si in mine for i in stages[si]), default=0.0)
        # FSDP (data parallelism) keeps a rank's shard of the weights and of the reduced gradients beside
        # the gathered ones (also when the shard is everything, ZeRO-0); ZeRO-3 gathers two blocks at a
        # time (one prefetched), ZeRO-2/3 reduce each block's gradients as soon as they are complete
        fsdp = shard if replicas > 1 and not L.replicated_dp else 0.0  # DDP (zero=0 alone) keeps no shard
        # under a pipeline torch's stages keep every block gathered and its gradient whole until the
        # step's end (one reduction per step): ZeRO-2 and 3 then hold what ZeRO-1 does
        zero = L.zero if L.pp == 1 else min(L.zero, 1)
        if zero == 3:
            weights, grads = shard + 2 * biggest_block, shard + biggest_block
        elif zero == 2:
            weights, grads = n + fsdp, shard + biggest_block
        else:
            weights, grads = n + fsdp, n + fsdp
        weights, grads = weights * 4, grads * 4
        optimizer = shard * FP32_BYTES_PER_PARAM["optimizer"]
        layers = sum(len(stages[si]) for si in mine)
        full_layer = (fp32_saved_per_layer(L, "none", sh) + (FP32_TP_BUFFERS if tp > 1 else 0)) * sbh
        per_layer = full_layer if L.recompute == "none" else fp32_saved_per_layer(L, L.recompute, sh) * sbh
        activations = per_layer * layers * in_flight(L, m, r)
        cross = sum(sh.cross_layers[i] for si in mine for i in stages[si]) if sh.cross_layers else 0
        if L.recompute != "full":
            whole = FP32_CROSS["whole"] + (1 if L.sp else 0)
            activations += cross * (whole + FP32_CROSS["split"] / tp) * sbh * in_flight(L, m, r)
        activations += carried_bytes(sh, L, 1) * sbh * in_flight(L, m, r)
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
