"""Checkpoints through ``torch.distributed.checkpoint`` (DCP), written atomically.

DCP records every tensor by its global shape and offsets, so the format that one process writes
here is the one that sharded layouts write and that any other layout can load. A checkpoint is
written into ``step_NNNNNNN.tmp-<pid>`` and renamed to ``step_NNNNNNN`` only when complete: a crash
mid-save leaves a ``.tmp`` directory, which is never taken for a checkpoint and is cleared on resume.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the model; the message is one line for the user."""


CKPT_RE = re.compile(r"^step_(\d{7,})$")
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it assumes a single process when no process group exists; on one device
    that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def checkpoint_step(path: Path) -> int:
    return int(CKPT_RE.match(path.name).group(1))


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep: int = 0) -> Path:
    """Save model, optimizer and ``trainer_state`` (step, RNG, loss scaler) after ``step`` steps;
    keep only the newest ``keep`` checkpoints when ``keep > 0``."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    blob = io.BytesIO()
    torch.save(trainer_state, blob)  # one opaque leaf: its structure may change between runs
    with _single_process_is_intended():
        dcp.save({"model": model_sd, "optim": optim_sd, "trainer": blob.getvalue()}, checkpoint_id=tmp)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load ``path`` into ``model`` (and ``optimizer``, and then return the saved trainer state)."""
    try:
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd, "trainer": b""}
            with _single_process_is_intended():
                dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            return torch.load(io.BytesIO(state["trainer"]), weights_only=True)
        state = {"model": model.state_dict()}
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path)
        model.load_state_dict(state["model"])
        return {}
    except Exception as e:  # DCP reports shape mismatches and damage with many exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this model: {first}") from e


def clear_partial_saves(run_dir: Path) -> None:
    """Remove what an interrupted save left behind."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.glob("step_*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
