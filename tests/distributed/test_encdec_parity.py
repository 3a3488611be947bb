"""Layout invariance for the encoder-decoder: tiny Vaswani (post-LN, sinusoidal positions, label
smoothing 0.1) and T5 (pre-RMSNorm, relative position bias) Transformers and a T5 with Switch's MoE
layers, trained on source/target pairs, give under every layout one process's losses at every step,
parameters at the end and validation loss (float64, tests/distributed/parity.py). Rows hold
different numbers of target tokens, so a layout whose ranks normalized the loss by their own counts
would fail here (a test checks that it does), as would label smoothing whose gradient is wrong on a
vocabulary split over tp ranks. The same processes train the pipeline's interleaved and zero-bubble
schedules (the encoder's output and the target's states travel through four stages on two ranks),
ZeRO-1/2 with gradient accumulation, recomputation, bf16 mixed precision (against one bf16 process at
the production tolerances of tests/distributed/test_parity.py), and a checkpoint saved under tp2 + sp
resumed under pp2 and on one process. Every case runs in the session's shared gloo job of its world
size (tests/distributed/shared_job.py)."""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.parity import (
    RTOL,
    assert_matches,
    assert_matches_roughly,
    merge_ranks,
    resume_and_train,
    train_and_save,
    train_layouts,
    train_single,
)

PP2 = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4"]
# two virtual stages per rank: transformer-tiny's 4 blocks one per stage, encoder on stages 0-1, decoder on 2-3
PP2_V2 = ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.microbatches=4"]
TWO_RANKS = {
    ("encdec", "dp2_zero3"): ["parallel.dp=2", "parallel.zero=3"],
    # label smoothing 0.1 on logits split over the vocabulary
    ("encdec", "tp2_sp"): ["parallel.tp=2", "parallel.sp=true"],
    # stage 0 holds the encoder, stage 1 the decoder: the encoder's output travels with the target's states
    ("encdec", "pp2"): PP2,
    ("encdec", "pp2_interleaved"): [*PP2_V2, "parallel.schedule=interleaved"],
    ("encdec", "pp2_zero_bubble"): [*PP2_V2, "parallel.schedule=zero-bubble"],
    ("encdec", "dp2_zero1_accum2"): ["parallel.dp=2", "parallel.zero=1", "train.grad_accum=2"],
    ("encdec", "dp2_zero2_accum2_full_recompute"): ["parallel.dp=2", "parallel.zero=2", "train.grad_accum=2",
                                                    "parallel.recompute=full"],
    ("encdec", "tp2_sp_selective_recompute"): ["parallel.tp=2", "parallel.sp=true", "parallel.recompute=selective"],
    ("t5", "tp2_sp"): ["parallel.tp=2", "parallel.sp=true"],
    ("t5", "pp2"): PP2,
    # 3 + 3 blocks: stage 0 holds the encoder and the decoder's first block, whose position bias (from the
    # decoder's one relative-bias table) stage 1 receives in the state; the table's gradient comes back
    ("t5", "pp2_bias_across_stages"): ["model.n_layer=3", "model.decoder_layers=3", *PP2],
    # each stack's one bias table gathered and resharded by FSDP; the bias it makes carried block to block
    ("t5", "dp2_zero3"): ["parallel.dp=2", "parallel.zero=3"],
    ("encdec-switch", "ep2"): ["parallel.ep=2"],
    # the loss normalized by each rank's own count of target tokens: must fail
    ("encdec", "dp2_local_normalization"): ["parallel.dp=2", "sabotage:local_target_normalization"],
    # smoothing's uniform term from log_softmax, whose gradient loss_parallel leaves to nll_loss: must fail
    ("encdec", "tp2_log_softmax_smoothing"): ["parallel.tp=2", "sabotage:log_softmax_smoothing"],
}
FOUR_RANKS = {
    ("encdec", "dp2_tp2"): ["parallel.dp=2", "parallel.tp=2"],
    # two pipeline stages of two tensor-parallel ranks each
    ("encdec", "pp2_tp2_sp"): ["parallel.tp=2", "parallel.sp=true", *PP2],
    # ZeRO-3 inside pipeline stages: a stage's first block receives what the stage before it sent
    ("encdec", "dp2_pp2_zero3"): ["parallel.dp=2", "parallel.zero=3", *PP2],
}
BROKEN = (("encdec", "dp2_local_normalization"), ("encdec", "tp2_log_softmax_smoothing"))
# bf16 mixed precision against one bf16 process, at test_parity.py's production tolerances
BF16 = {
    ("encdec", "dp2_zero3_bf16"): ["parallel.dp=2", "parallel.zero=3", "train.precision=bf16"],
    ("encdec", "tp2_sp_bf16"): ["parallel.tp=2", "parallel.sp=true", "train.precision=bf16"],
    ("encdec", "pp2_bf16"): [*PP2, "train.precision=bf16"],
}
BF16_TOLERANCE = dict(loss_rtol=1e-3, matrix_rtol=0.1)
# ZeRO's mixed precision (FSDP's param_dtype) holds every parameter in bf16 for the forward, the shared
# embedding, norms and biases too, where one process's autocast keeps them fp32: the first step's loss
# differs by 1.2e-4, and Adam's first steps carry that to 1.3e-3 by the third (measured; 1e-3 holds for
# the tp and pp layouts, which compute as one process does)
BF16_LOSS_RTOL = {("encdec", "dp2_zero3_bf16"): 5e-3}
# a checkpoint saved under one layout (the tied embedding split over the vocabulary, the sequence over
# ranks) resumes under another (encoder and decoder on different ranks) and on one process with the
# losses of an uninterrupted run
SAVE_AT, RESUME_TO = 3, 6
SAVED_UNDER = ["parallel.tp=2", "parallel.sp=true"]
RESUMED_UNDER = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"]


def two_rank_job(tmp_dir: str) -> dict:
    """This suite's two-rank layouts, then transformer-tiny saved under :data:`SAVED_UNDER` and resumed
    (from a copy) under :data:`RESUMED_UNDER`, in the session's two-rank job."""
    import torch.distributed as dist

    out = train_layouts([(model, layout) for (model, _), layout in {**TWO_RANKS, **BF16}.items()])
    saved, resumed = Path(tmp_dir) / "saved", Path(tmp_dir) / "resumed"
    out["saved"] = train_and_save("encdec", SAVED_UNDER, str(saved), SAVE_AT)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.copytree(saved, resumed)
    dist.barrier()
    out["resumed"] = resume_and_train("encdec", RESUMED_UNDER, str(resumed), RESUME_TO)
    out["root"] = tmp_dir
    return out


def four_rank_job(tmp_dir: str) -> dict:
    """This suite's four-rank layouts, in the session's four-rank job."""
    return train_layouts([(model, layout) for (model, _), layout in FOUR_RANKS.items()])


@functools.cache
def _reference(model: str, *settings: str) -> dict:
    return train_single(model, list(settings))


def _got_and_ref(key: tuple[str, str], ranks: list) -> tuple[dict, dict]:
    model = key[0]
    layout = {**TWO_RANKS, **FOUR_RANKS, **BF16}[key]
    settings = [o for o in layout if not o.startswith(("parallel.", "sabotage:"))]
    return merge_ranks(ranks, (model, *layout)), _reference(model, *settings)


@pytest.mark.parametrize("key", [k for k in TWO_RANKS if k not in BROKEN], ids="-".join)
def test_encoder_decoder_two_rank_layout_matches_single_process(key, two_rank_job):
    assert_matches(*_got_and_ref(key, two_rank_job["test_encdec_parity"]))


@pytest.mark.slow  # four processes on two cores (CI runs it)
@pytest.mark.parametrize("key", list(FOUR_RANKS), ids="-".join)
def test_encoder_decoder_four_rank_layout_matches_single_process(key, four_rank_job):
    assert_matches(*_got_and_ref(key, four_rank_job["test_encdec_parity"]))


def test_seq2seq_loss_normalized_per_rank_fails_the_parity_check(two_rank_job):
    got, ref = _got_and_ref(BROKEN[0], two_rank_job["test_encdec_parity"])
    with pytest.raises(AssertionError):
        assert_matches(got, ref)
    rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    assert rel > 1e4 * RTOL, f"normalizing per rank moved the loss by only {rel:.1e}"


def test_label_smoothing_through_log_softmax_under_tp_fails_the_parity_check(two_rank_job):
    """The first step's loss is right (the forward is), every later one is not (the gradient was)."""
    got, ref = _got_and_ref(BROKEN[1], two_rank_job["test_encdec_parity"])
    assert abs(got["losses"][0] - ref["losses"][0]) <= RTOL * abs(ref["losses"][0])
    with pytest.raises(AssertionError):
        assert_matches(got, ref)
    rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    assert rel > 1e4 * RTOL, f"smoothing through log_softmax moved the loss by only {rel:.1e}"


@pytest.mark.parametrize("key", list(BF16), ids="-".join)
def test_bf16_encoder_decoder_tracks_one_bf16_process(key, two_rank_job):
    got, ref = _got_and_ref(key, two_rank_job["test_encdec_parity"])
    assert all(math.isfinite(x) for x in ref["losses"] + got["losses"]), (ref["losses"], got["losses"])
    tolerance = {**BF16_TOLERANCE, "loss_rtol": BF16_LOSS_RTOL.get(key, BF16_TOLERANCE["loss_rtol"])}
    assert_matches_roughly(got, ref, **tolerance)


def test_encdec_checkpoint_saved_under_tp2_sp_resumes_under_pp2_and_one_process(two_rank_job, tmp_path):
    reference = train_single("encdec", steps=RESUME_TO)["losses"]  # uninterrupted, one process
    ranks = two_rank_job["test_encdec_parity"]
    torch.testing.assert_close(torch.tensor(ranks[0]["saved"]), torch.tensor(reference[:SAVE_AT]), rtol=RTOL,
                               atol=0)
    shutil.copytree(Path(ranks[0]["root"]) / "saved", tmp_path / "single")
    continued = {"pp2": ranks[-1]["resumed"],  # the last stage knows the loss
                 "single": resume_and_train("encdec", [], str(tmp_path / "single"), RESUME_TO)}
    for name, losses in continued.items():
        assert len(losses) == RESUME_TO - SAVE_AT, name
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[SAVE_AT:]), rtol=RTOL, atol=0,
                                   msg=lambda m, name=name: f"resumed under {name}: {m}")
