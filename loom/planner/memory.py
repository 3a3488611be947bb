"""Memory per device: weights, gradients and optimizer state (sharded by ZeRO), and activations.

Mixed precision (a GPU): 18 bytes per parameter (fp32 master 4 + bf16 copy 2 + fp32 gradient 4 + Adam 8,
sharded by ZeRO) and activations by Korthikanti et al. 2022 (per layer and micro-batch, bytes):

    none       s·b·h·(34 + 5·a·s/h)            / tp with sp; (10 + 24/tp + 5·a·s/(h·tp)) without
    selective  s·b·h·34 / tp with sp;           (10 + 24/tp) without
    full       2·s·b·h (the layer input)        / tp with sp

(24: GPT's block; :func:`split_activation_bytes` counts it for grouped-query attention, a SwiGLU
MLP or another MLP width) times the micro-batches in flight on the first stage (1F1B: pp;
interleaved: pp·(1 + (pp−1)/(pp·v)); GPipe: all of them), plus the logits of the last stage and one
layer's recomputed activations.

fp32 training (a CPU, as ``loom calibrate`` measures it): 16 bytes per parameter (weights 4, gradients
4, Adam 8), fp32 activations as this code saves them, plus the runtime's own resident set.
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
    for r, ((dense, experts), mine) in enumerate(zip(rank_params(sh, stages, L), rank_stages(L))):
        shard_dense = replicas if L.zero else 1
        shard_exp = L.dp if L.zero else 1
        weights = (dense / (shard_dense if L.zero == 3 else 1) + experts / (shard_exp if L.zero == 3 else 1)) * 4 \
            + (dense + experts) * 2  # fp32 master (sharded under ZeRO-3) + the bf16 working copy
        grads = (dense / (shard_dense if L.zero >= 2 else 1) + experts / (shard_exp if L.zero >= 2 else 1)) * 4
        optimizer = (dense / shard_dense + experts / shard_exp) * 8
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
        if L.recompute == "full":  # one layer's activations live while it is recomputed
            activations += sbh * (10 + split / L.tp + 5 * a * s / (h * L.tp))
        if len(stages) - 1 in mine:
            activations += s * b * sh.vocab / L.tp * 4 * 2  # fp32 logits and their gradient
        gib = 2**30
        per_stage.append({"weights": weights / gib, "grads": grads / gib, "optimizer": optimizer / gib,
                          "activations": activations / gib})
    worst = max(per_stage, key=lambda d: sum(d.values()))
    return dict(worst), per_stage


def in_flight(L: Plan, m: int, r: int) -> float:
    """Micro-batches whose activations pipeline rank ``r`` holds at once."""
    if L.pp == 1:
        return 1
    if L.schedule == "gpipe":
        return m
    if L.virtual_stages > 1:
        return min(m, L.pp * (1 + (L.pp - 1) / (L.pp * L.virtual_stages)))
    return min(m, L.pp - r)


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
        whole = FP32_SAVED["whole"]
        # FP32_SAVED's split 13 = q, k, v 3 + attention output 2 + MLP 8, for this model's shape
        split = FP32_SAVED["split"] - 3 - 8 + (1 + 2 * sh.kv_ratio) + sh.mlp_hidden
        selective = FP32_SELECTIVE["split"] - 3 - 4 + (1 + 2 * sh.kv_ratio) + sh.mlp_matmul_out
        full_layer = (whole - FP32_SAVED["sp_split"] * (1 - 1 / tp) * L.sp + split / tp
                      + (FP32_TP_BUFFERS if tp > 1 else 0)) * sbh
        if L.recompute == "none":
            per_layer = full_layer
        elif L.recompute == "selective":
            per_layer = (FP32_SELECTIVE["whole"] + selective / tp) * sbh
        else:
            per_layer = sbh / (tp if L.sp else 1)  # the block's input
        activations = per_layer * layers * in_flight(L, m, r)
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
