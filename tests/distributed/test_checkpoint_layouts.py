"""A checkpoint saved under one layout resumes under others and continues with the losses of an
uninterrupted single-process run: DCP stores each tensor by its global shape and offsets. In float64,
at the parity suite's tolerance (tests/distributed/parity.py).

The four-process saves (GPT, Switch) and the resume under ep4 run in the session's four-rank job
(tests/distributed/shared_job.py), then one 2-process start resumes GPT under pp2 and tp2 + sp and
saves Llama; the one-process resumes run in the test process."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_on_ranks
from tests.distributed.parity import RTOL, resume_and_train, train_and_save, train_single

SAVE_AT, STEPS = 3, 6
SAVED_UNDER = ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"]
RESUMED_UNDER = {
    "pp2": (2, ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
}
MOE_SAVED_UNDER = ["parallel.ep=2", "parallel.dp=2", "parallel.zero=1"]
MOE_RESUMED_UNDER = {"ep4": (4, ["parallel.ep=4"])}
LLAMA_SAVED_UNDER = ["parallel.tp=2"]


def _save_and_resume(jobs: list[tuple]) -> dict:
    """On every rank, each job in turn: ``(key, "save", model, layout, run_dir, None)`` trains
    :data:`SAVE_AT` steps and saves; ``(key, "resume", model, layout, run_dir, saved_dir)`` copies
    ``saved_dir`` (saved earlier, by this job or another) to ``run_dir`` and resumes it up to
    :data:`STEPS`. Returns ``{key: losses}``."""
    import torch.distributed as dist

    out = {}
    for key, action, model, layout, run_dir, saved_dir in jobs:
        if action == "save":
            out[key] = train_and_save(model, layout, run_dir, SAVE_AT)
            continue
        dist.barrier()  # every rank's shards of saved_dir are written
        if dist.get_rank() == 0:
            shutil.copytree(saved_dir, run_dir)
        dist.barrier()
        out[key] = resume_and_train(model, layout, run_dir, STEPS)
    return out


def _four_rank_jobs(root: str) -> list[tuple]:
    saved = {m: f"{root}/{m}/saved" for m in ("gpt", "switch")}
    jobs = [("gpt", "save", "gpt", SAVED_UNDER, saved["gpt"], None),
            ("switch", "save", "switch", MOE_SAVED_UNDER, saved["switch"], None)]
    return jobs + [(f"switch_{name}", "resume", "switch", layout, f"{root}/switch/{name}", saved["switch"])
                   for name, (world, layout) in MOE_RESUMED_UNDER.items() if world == 4]


def four_rank_job(tmp_dir: str) -> dict:
    """This suite's four-rank saves and resumes, run in the session's four-rank job
    (tests/distributed/shared_job.py): ``{key: losses}`` and ``"root"``, where the runs are."""
    return {**_save_and_resume(_four_rank_jobs(tmp_dir)), "root": tmp_dir}


@pytest.fixture(scope="module")
def runs(four_rank_job, tmp_path_factory) -> dict:
    """The losses of every multi-process save and resume, by key (a save: rank 0's losses; a resume:
    the last rank's, the last pipeline stage knows the loss), and where each model was saved."""
    four_ranks = four_rank_job["test_checkpoint_layouts"]
    root = four_ranks[0]["root"]
    two = [(f"gpt_{name}", "resume", "gpt", layout, str(tmp_path_factory.mktemp(name) / "run"),
            f"{root}/gpt/saved")
           for name, (world, layout) in RESUMED_UNDER.items() if world == 2]
    llama_saved = str(tmp_path_factory.mktemp("llama") / "saved")
    two += [("llama", "save", "llama", LLAMA_SAVED_UNDER, llama_saved, None)]
    two_ranks = run_on_ranks(2, _save_and_resume, two)
    losses = {key: ranks[0 if action == "save" else -1][key]
              for ranks, jobs in ((four_ranks, _four_rank_jobs(root)), (two_ranks, two)) for key, action, *_ in jobs}
    saved = {"gpt": Path(root) / "gpt" / "saved", "switch": Path(root) / "switch" / "saved",
             "llama": Path(llama_saved)}
    return {"losses": losses, "saved": saved}


@functools.cache
def _reference(model: str) -> list[float]:
    return train_single(model, steps=STEPS)["losses"]  # uninterrupted, one process


def _assert_continues(losses: list[float], reference: list[float], name: str) -> None:
    assert len(losses) == STEPS - SAVE_AT, name
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[SAVE_AT:]), rtol=RTOL, atol=0,
                               msg=lambda m: f"resumed under {name}: {m}")


def _resume_on_one_process(runs, model: str, run: Path) -> list[float]:
    shutil.copytree(runs["saved"][model], run)
    return resume_and_train(model, [], str(run), STEPS)


def _assert_saved_and_resumed(runs, model: str, resumed_under, tmp_path: Path) -> None:
    """The saving run's losses are one process's, and so are those of every resume of its checkpoint
    (under each layout of ``resumed_under`` and on one process)."""
    reference = _reference(model)
    assert len(reference) == STEPS
    torch.testing.assert_close(torch.tensor(runs["losses"][model]), torch.tensor(reference[:SAVE_AT]),
                               rtol=RTOL, atol=0)
    continued = {name: runs["losses"][f"{model}_{name}"] for name in resumed_under}
    continued["single"] = _resume_on_one_process(runs, model, tmp_path / "single")
    for name, losses in continued.items():
        _assert_continues(losses, reference, name)


def test_checkpoint_saved_under_dp2_tp2_resumes_under_pp2_tp2_and_one_process(runs, tmp_path):
    _assert_saved_and_resumed(runs, "gpt", RESUMED_UNDER, tmp_path)


def test_moe_checkpoint_saved_under_ep2_dp2_resumes_under_ep4_and_one_process(runs, tmp_path):
    """Expert weights (split over ep) and their optimizer state are stored as global tensors."""
    _assert_saved_and_resumed(runs, "switch", MOE_RESUMED_UNDER, tmp_path)


def test_llama_checkpoint_saved_under_tp2_resumes_on_one_process(runs, tmp_path):
    """Grouped-query key/value projections (split by key/value heads over tp) and the untied output
    projection (split over the vocabulary) are stored whole and reload into another layout."""
    _assert_saved_and_resumed(runs, "llama", {}, tmp_path)
