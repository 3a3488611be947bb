"""Layout invariance for the encoder-decoder: tiny Vaswani (post-LN, sinusoidal positions, label
smoothing 0.1) and T5 (pre-RMSNorm, relative position bias) Transformers and a T5 with Switch's MoE
layers, trained on source/target pairs, give under every layout one process's losses at every step,
parameters at the end and validation loss (float64, tests/distributed/parity.py). Rows hold
different numbers of target tokens, so a layout whose ranks normalized the loss by their own counts
would fail here (a test checks that it does). Each world size starts its processes once and trains
all its layouts."""

from __future__ import annotations

import functools

import pytest

from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import RTOL, assert_matches, merge_ranks, train_layouts, train_single

PP2 = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4"]
TWO_RANKS = {
    ("encdec", "dp2_zero3"): ["parallel.dp=2", "parallel.zero=3"],
    # label smoothing under tp is refused (loom/config.py): these layouts train without it
    ("encdec", "tp2_sp"): ["parallel.tp=2", "parallel.sp=true", "train.label_smoothing=0"],
    # stage 0 holds the encoder, stage 1 the decoder: the encoder's output travels with the target's states
    ("encdec", "pp2"): PP2,
    ("t5", "tp2_sp"): ["parallel.tp=2", "parallel.sp=true"],
    ("t5", "pp2"): PP2,
    # 3 + 3 blocks: stage 0 holds the encoder and the decoder's first block, whose position bias (from the
    # decoder's one relative-bias table) stage 1 receives in the state; the table's gradient comes back
    ("t5", "pp2_bias_across_stages"): ["model.n_layer=3", "model.decoder_layers=3", *PP2],
    ("encdec-switch", "ep2"): ["parallel.ep=2"],
    # the loss normalized by each rank's own count of target tokens: must fail
    ("encdec", "dp2_local_normalization"): ["parallel.dp=2", "sabotage:local_target_normalization"],
}
FOUR_RANKS = {
    ("encdec", "dp2_tp2"): ["parallel.dp=2", "parallel.tp=2", "train.label_smoothing=0"],
}
BROKEN = (("encdec", "dp2_local_normalization"),)


@functools.cache
def _results(world: int) -> tuple:
    layouts = {2: TWO_RANKS, 4: FOUR_RANKS}[world]
    return tuple(run_on_ranks(world, train_layouts, [(model, layout) for (model, _), layout in layouts.items()]))


@functools.cache
def _reference(model: str, *settings: str) -> dict:
    return train_single(model, list(settings))


def _got_and_ref(key: tuple[str, str], world: int) -> tuple[dict, dict]:
    model = key[0]
    layout = {2: TWO_RANKS, 4: FOUR_RANKS}[world][key]
    settings = [o for o in layout if not o.startswith(("parallel.", "sabotage:"))]
    return merge_ranks(list(_results(world)), (model, *layout)), _reference(model, *settings)


@pytest.mark.parametrize("key", [k for k in TWO_RANKS if k not in BROKEN], ids="-".join)
def test_encoder_decoder_two_rank_layout_matches_single_process(key):
    assert_matches(*_got_and_ref(key, 2))


@pytest.mark.slow  # four processes on two cores (CI runs it)
@pytest.mark.parametrize("key", list(FOUR_RANKS), ids="-".join)
def test_encoder_decoder_four_rank_layout_matches_single_process(key):
    assert_matches(*_got_and_ref(key, 4))


def test_seq2seq_loss_normalized_per_rank_fails_the_parity_check():
    got, ref = _got_and_ref(BROKEN[0], 2)
    with pytest.raises(AssertionError):
        assert_matches(got, ref)
    rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    assert rel > 1e4 * RTOL, f"normalizing per rank moved the loss by only {rel:.1e}"
