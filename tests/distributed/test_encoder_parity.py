"""Layout invariance for an encoder: tiny BERT trained by masked-LM + next-sentence prediction gives,
under every layout, one process's losses at every step, parameters at the end and validation loss
(float64, tests/distributed/parity.py). Rows hold different numbers of predicted tokens, so a layout
whose ranks normalized the masked-LM loss by their own counts would fail here (a test checks that
it does). Fine-tuning a pretrained tiny BERT for classification (``train.init_from``) under tensor
and under pipeline parallelism matches one process fine-tuning from the same run. Each world size
starts its processes once and trains all its layouts; ViT (on scikit-learn's digits) shares the
two-rank processes, as do BERT under ZeRO-1/2 with gradient accumulation, recomputation, MoE layers
under expert parallelism, a checkpoint saved under tp2 + sp and resumed under pp2 and on one process,
and bf16 mixed precision (against one bf16 process at the production tolerances of tests/distributed/test_parity.py)."""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_on_ranks
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

TWO_RANKS = {
    "dp2_zero3": ["parallel.dp=2", "parallel.zero=3"],
    "tp2_sp": ["parallel.tp=2", "parallel.sp=true"],
    "pp2_1f1b": ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4"],
    "tp2_pre_ln": ["parallel.tp=2", "parallel.sp=true", "model.post_ln=false"],
    # the masked-LM loss normalized by each rank's own count of predicted tokens: must fail
    "dp2_local_normalization": ["parallel.dp=2", "sabotage:local_mlm_normalization"],
    "dp2_zero1_accum2": ["parallel.dp=2", "parallel.zero=1", "train.grad_accum=2"],
    "dp2_zero2_accum2_full_recompute": ["parallel.dp=2", "parallel.zero=2", "train.grad_accum=2",
                                        "parallel.recompute=full"],
    "tp2_selective_recompute": ["parallel.tp=2", "parallel.recompute=selective"],
    # MoE layers (Switch) in every other block, their experts split over two ranks
    "ep2_moe": ["model.moe.experts=4", "model.moe.every=2", "parallel.ep=2"],
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


# bf16 mixed precision against one bf16 process, at test_parity.py's production tolerances; BERT at a
# learning rate that lowers its loss within the five steps (a bf16 ViT learning the stripes of a folder of
# images: tests/cli/test_encoders_cli.py; five steps of 8 digits do not lower vit-tiny's loss at any
# learning rate from 1e-3 to 3e-2, so its case asserts no decrease)
BF16 = {"bert": ["parallel.dp=2", "train.precision=bf16", "train.lr=3e-3"],
        "vit": ["parallel.dp=2", "train.precision=bf16"]}
BF16_TOLERANCE = dict(loss_rtol=1e-3, matrix_rtol=0.1)
# a checkpoint saved under one layout (the tied embedding split over the vocabulary, the sequence over
# ranks) resumes under another and on one process with the losses of an uninterrupted run
SAVE_AT, RESUME_TO = 3, 6
SAVED_UNDER = ["parallel.tp=2", "parallel.sp=true"]
RESUMED_UNDER = ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"]


def _two_rank_jobs(cases: list, ckpt_root: str) -> dict:
    """Every case of :func:`train_layouts`, then BERT saved under :data:`SAVED_UNDER` and resumed
    (from a copy) under :data:`RESUMED_UNDER`, in the same processes."""
    import torch.distributed as dist

    out = train_layouts(cases)
    saved, resumed = Path(ckpt_root) / "saved", Path(ckpt_root) / "resumed"
    out["saved"] = train_and_save("bert", SAVED_UNDER, str(saved), SAVE_AT)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.copytree(saved, resumed)
    dist.barrier()
    out["resumed"] = resume_and_train("bert", RESUMED_UNDER, str(resumed), RESUME_TO)
    return out


def _temporary_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def _pretrained() -> str:
    """A tiny BERT pretrained for three steps on one process, saved as a run to fine-tune from."""
    run = _temporary_dir("loom-pretrained-")
    train_and_save("bert", [], run, steps=3)
    return run


def _finetune_tp2() -> list[str]:
    return ["parallel.tp=2", f"train.init_from={_pretrained()}"]


def _finetune_pp2() -> list[str]:
    """The classifier split over two stages: built without the pretraining heads, it ties nothing, so its
    last stage holds no copy of the token embedding."""
    return ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4", f"train.init_from={_pretrained()}"]


@functools.cache
def _results(world: int) -> tuple:
    layouts = {2: TWO_RANKS, 4: FOUR_RANKS}[world]
    cases = [("bert", layout) for layout in layouts.values()]
    if world == 2:
        cases += [("bert-cls", _finetune_tp2()), ("bert-cls", _finetune_pp2())]
        cases += [("vit", layout) for layout in VIT_TWO_RANKS.values()]
        cases += list(BF16.items())
        return tuple(run_on_ranks(world, _two_rank_jobs, cases, _ckpt_root()))
    return tuple(run_on_ranks(world, train_layouts, cases))


@functools.cache
def _ckpt_root() -> str:
    return _temporary_dir("loom-encoder-ckpt-")


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


def test_finetuning_a_pretrained_bert_under_pp2_matches_single_process():
    got, ref = _got_and_ref(_finetune_pp2(), 2, model="bert-cls")
    assert_matches(got, ref)


@pytest.mark.parametrize("name", list(VIT_TWO_RANKS))
def test_vit_two_rank_layout_matches_single_process(name):
    assert_matches(*_got_and_ref(VIT_TWO_RANKS[name], 2, model="vit"))


def test_bert_with_moe_layers_under_ep2_routes_and_trains_as_one_process():
    got, ref = _got_and_ref(TWO_RANKS["ep2_moe"], 2)
    assert len(got["moe"]) == len(ref["moe"]) == len(ref["losses"])
    for step, (g, r) in enumerate(zip(got["moe"], ref["moe"])):
        counts = slice(0, g.size(1) - 3)  # tokens per expert, routed, dropped: equal
        assert torch.equal(g[:, counts], r[:, counts]), f"step {step}: routing differs"
        torch.testing.assert_close(g[:, -3:], r[:, -3:], rtol=RTOL, atol=0)
    assert_matches(got, ref)


@pytest.mark.parametrize("model", list(BF16))
def test_bf16_encoder_trains_and_dp2_tracks_one_process(model):
    got, ref = _got_and_ref(BF16[model], 2, model=model)
    losses = ref["losses"]
    assert all(math.isfinite(x) for x in losses + got["losses"]), losses
    if model == "bert":
        assert losses[-1] < losses[0] - 0.1 and got["losses"][-1] < got["losses"][0] - 0.1, losses
    assert_matches_roughly(got, ref, **BF16_TOLERANCE)


def test_bert_checkpoint_saved_under_tp2_sp_resumes_under_pp2_and_one_process():
    reference = train_single("bert", steps=RESUME_TO)["losses"]  # uninterrupted, one process
    results = _results(2)
    torch.testing.assert_close(torch.tensor(results[0]["saved"]), torch.tensor(reference[:SAVE_AT]), rtol=RTOL,
                               atol=0)
    single = Path(_ckpt_root()) / "single"
    shutil.copytree(Path(_ckpt_root()) / "saved", single)
    continued = {"pp2": results[-1]["resumed"], "single": resume_and_train("bert", [], str(single), RESUME_TO)}
    for name, losses in continued.items():
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[SAVE_AT:]), rtol=RTOL, atol=0,
                                   msg=lambda m, name=name: f"resumed under {name}: {m}")
