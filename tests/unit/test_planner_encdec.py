"""The planner's cost of an encoder-decoder: a pipeline stage sends two tensors (the encoder's output
travels with the decoder's hidden states) and every decoder block keeps its cross-attention's
activations, which Korthikanti et al.'s per-layer count (written for a decoder-only block) leaves out."""

from __future__ import annotations

import dataclasses

import pytest

from loom.config import load_config
from loom.planner.cost import estimate, plan_for_batch
from loom.planner.hardware import parse_cluster
from loom.planner.shape import model_shape

SEQ, BATCH = 512, 64
CLUSTER = parse_cluster("8xa100-80g")


def _t5_small():
    cfg = load_config(None, ["model=t5-small"]).model
    return cfg, model_shape(cfg, SEQ)


def test_the_shape_knows_which_blocks_cross_attend_and_what_a_stage_sends():
    _, sh = _t5_small()
    assert sh.cross_layers == (0,) * 6 + (1,) * 6  # encoder blocks, then decoder blocks
    assert sh.stage_tensors == 2
    gpt = model_shape(load_config(None, ["model=gpt2-350m"]).model, SEQ)
    assert not any(gpt.cross_layers) and gpt.stage_tensors == 1


def test_a_stage_sends_the_encoder_output_with_the_decoder_states():
    """The send/recv time is linear in the tensors sent: the second one costs what the first does."""
    cfg, sh = _t5_small()
    plan = plan_for_batch(BATCH, dp=4, pp=2)
    p2p = [estimate(cfg, plan, CLUSTER, BATCH, SEQ, shape=dataclasses.replace(sh, stage_tensors=k)).time_s["pp_p2p"]
           for k in (0, 1, 2)]
    assert p2p[2] - p2p[1] == pytest.approx(p2p[1] - p2p[0]) and p2p[1] > p2p[0]
    assert estimate(cfg, plan, CLUSTER, BATCH, SEQ, shape=sh).time_s["pp_p2p"] == pytest.approx(p2p[2])


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_decoder_blocks_keep_their_cross_attention_activations(recompute):
    """Per decoder block, in bf16 bytes per s·b·h: Korthikanti's attention terms (5 whole: the norm's
    input, the query projection's input, a dropout mask; 8 split and 5·a·s/h of scores, dropped by
    selective recomputation), nothing under full recomputation; plus the memory carried beside the
    stream, one 2-byte tensor per micro-batch."""
    cfg, sh = _t5_small()
    plan = plan_for_batch(BATCH, dp=8, recompute=recompute)
    without = dataclasses.replace(sh, cross_layers=(0,) * 12, stage_tensors=1)
    act = [estimate(cfg, plan, CLUSTER, BATCH, SEQ, shape=s).memory_gb["activations"] for s in (sh, without)]
    sbh = SEQ * plan.micro_batch(BATCH) * cfg.n_embd
    scores = 5 * cfg.n_head * SEQ / cfg.n_embd
    per_block = {"none": 5 + 8 + scores, "selective": 5 + 8, "full": 0}[recompute]
    assert (act[0] - act[1]) * 2**30 == pytest.approx((6 * per_block + 2) * sbh)
