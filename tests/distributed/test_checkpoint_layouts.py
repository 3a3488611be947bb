"""A checkpoint saved under one layout resumes under others and continues with the losses of an
uninterrupted single-process run: DCP stores each tensor by its global shape and offsets. In float64,
at the parity suite's tolerance (tests/distributed/parity.py)."""

from __future__ import annotations

import shutil

import torch

from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import RTOL, resume_and_train, train_and_save, train_single

SAVE_AT, STEPS = 3, 6
SAVED_UNDER = ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"]
RESUMED_UNDER = {
    "pp2": (2, ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
}


def test_checkpoint_saved_under_dp2_tp2_resumes_under_pp2_tp2_and_one_process(tmp_path):
    reference = train_single("gpt", steps=STEPS)["losses"]  # uninterrupted, one process
    assert len(reference) == STEPS

    saved = tmp_path / "saved"
    first = run_on_ranks(4, train_and_save, "gpt", SAVED_UNDER, str(saved), SAVE_AT)[0]
    torch.testing.assert_close(torch.tensor(first), torch.tensor(reference[:SAVE_AT]), rtol=RTOL, atol=0)

    continued = {}
    for name, (world, layout) in RESUMED_UNDER.items():
        run = tmp_path / name
        shutil.copytree(saved, run)
        continued[name] = run_on_ranks(world, resume_and_train, "gpt", layout, str(run), STEPS)[-1]
    run = tmp_path / "single"
    shutil.copytree(saved, run)
    continued["single"] = resume_and_train("gpt", [], str(run), STEPS)

    for name, losses in continued.items():
        assert len(losses) == STEPS - SAVE_AT, name
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[SAVE_AT:]), rtol=RTOL, atol=0,
                                   msg=lambda m, name=name: f"resumed under {name}: {m}")


def test_moe_checkpoint_saved_under_ep2_dp2_resumes_under_ep4_and_one_process(tmp_path):
    """Expert weights (split over ep) and their optimizer state are stored as global tensors."""
    reference = train_single("switch", steps=STEPS)["losses"]
    saved = tmp_path / "saved"
    first = run_on_ranks(4, train_and_save, "switch", ["parallel.ep=2", "parallel.dp=2", "parallel.zero=1"],
                         str(saved), SAVE_AT)[0]
    torch.testing.assert_close(torch.tensor(first), torch.tensor(reference[:SAVE_AT]), rtol=RTOL, atol=0)
    for name, world, layout in (("ep4", 4, ["parallel.ep=4"]), ("single", 1, [])):
        run = tmp_path / name
        shutil.copytree(saved, run)
        losses = (run_on_ranks(world, resume_and_train, "switch", layout, str(run), STEPS)[-1] if world > 1
                  else resume_and_train("switch", layout, str(run), STEPS))
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[SAVE_AT:]), rtol=RTOL, atol=0,
                                   msg=lambda m, name=name: f"resumed under {name}: {m}")


def test_llama_checkpoint_saved_under_tp2_resumes_on_one_process(tmp_path):
    """Grouped-query key/value projections (split by key/value heads over tp) and the untied output
    projection (split over the vocabulary) are stored whole and reload into another layout."""
    reference = train_single("llama", steps=STEPS)["losses"]
    saved = tmp_path / "saved"
    first = run_on_ranks(2, train_and_save, "llama", ["parallel.tp=2"], str(saved), SAVE_AT)[0]
    torch.testing.assert_close(torch.tensor(first), torch.tensor(reference[:SAVE_AT]), rtol=RTOL, atol=0)
    losses = resume_and_train("llama", [], str(saved), STEPS)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[SAVE_AT:]), rtol=RTOL, atol=0)
