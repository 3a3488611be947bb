"""Layout invariance for an encoder: tiny BERT trained by masked-LM + next-sentence prediction gives,
under every layout, one process's losses at every step, parameters at the end and validation loss
(float64, tests/distributed/parity.py). Rows hold different numbers of predicted tokens, so a layout
whose ranks normalized the masked-LM loss by their own counts would fail here (a test checks that
it does). Fine-tuning a pretrained tiny BERT for classification (``train.init_from``) under tensor
parallelism matches one process fine-tuning from the same run. Each world size starts its processes
once and trains all its layouts; ViT (on scikit-learn's digits) shares the two-rank processes."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import pytest

from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import RTOL, assert_matches, merge_ranks, train_and_save, train_layouts, train_single

TWO_RANKS = {
    "dp2_zero3": ["parallel.dp=2", "parallel.zero=3"],
    "tp2_sp": ["parallel.tp=2", "parallel.sp=true"],
    "pp2_1f1b": ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4"],
    "tp2_pre_ln": ["parallel.tp=2", "parallel.sp=true", "model.post_ln=false"],
    # the masked-LM loss normalized by each rank's own count of predicted tokens: must fail
    "dp2_local_normalization": ["parallel.dp=2", "sabotage:local_mlm_normalization"],
}
FOUR_RANKS = {
    "dp2_tp2": ["parallel.dp=2", "parallel.tp=2"],
}
BROKEN = ("dp2_local_normalization",)
# ViT on the digits, in the same processes
VIT_TWO_RANKS = {
    "dp2": ["parallel.dp=2"],
    "tp2": ["parallel.tp=2"],
    "pp2_1f1b": ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4"],
}


@functools.cache
def _pretrained() -> str:
    """A tiny BERT pretrained for three steps on one process, saved as a run to fine-tune from."""
    run = tempfile.mkdtemp(prefix="loom-pretrained-")
    atexit.register(shutil.rmtree, run, ignore_errors=True)
    train_and_save("bert", [], run, steps=3)
    return run


def _finetune_tp2() -> list[str]:
    return ["parallel.tp=2", f"train.init_from={_pretrained()}"]


@functools.cache
def _results(world: int) -> tuple:
    layouts = {2: TWO_RANKS, 4: FOUR_RANKS}[world]
    cases = [("bert", layout) for layout in layouts.values()]
    if world == 2:
        cases.append(("bert-cls", _finetune_tp2()))
        cases += [("vit", layout) for layout in VIT_TWO_RANKS.values()]
    return tuple(run_on_ranks(world, train_layouts, cases))


@functools.cache
def _reference(*settings: str) -> dict:
    return train_single("bert", list(settings))


@functools.cache
def _reference_of(model: str, *settings: str) -> dict:
    return train_single(model, list(settings))


def _got_and_ref(layout: list[str], world: int, model: str = "bert") -> tuple[dict, dict]:
    settings = [o for o in layout if not o.startswith(("parallel.", "sabotage:"))]
    ref = _reference(*settings) if model == "bert" else _reference_of(model, *settings)
    return merge_ranks(list(_results(world)), (model, *layout)), ref


@pytest.mark.parametrize("name", [n for n in TWO_RANKS if n not in BROKEN])
def test_bert_two_rank_layout_matches_single_process(name):
    assert_matches(*_got_and_ref(TWO_RANKS[name], 2))


@pytest.mark.slow  # four processes on two cores (CI runs it)
@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_bert_four_rank_layout_matches_single_process(name):
    assert_matches(*_got_and_ref(FOUR_RANKS[name], 4))


def test_masked_lm_normalized_per_rank_fails_the_parity_check():
    got, ref = _got_and_ref(TWO_RANKS["dp2_local_normalization"], 2)
    with pytest.raises(AssertionError):
        assert_matches(got, ref)
    rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    assert rel > 1e4 * RTOL, f"normalizing per rank moved the loss by only {rel:.1e}"


def test_finetuning_a_pretrained_bert_under_tp2_matches_single_process():
    got, ref = _got_and_ref(_finetune_tp2(), 2, model="bert-cls")
    assert_matches(got, ref)


@pytest.mark.parametrize("name", list(VIT_TWO_RANKS))
def test_vit_two_rank_layout_matches_single_process(name):
    assert_matches(*_got_and_ref(VIT_TWO_RANKS[name], 2, model="vit"))
