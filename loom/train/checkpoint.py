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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict


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


def save_checkpoint(run_dir: Path, step: int, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                    trainer_state: dict, keep: int = 0, rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the model parts and optimizers this rank holds, ``trainer_state`` (step, loss scaler:
    the coordinator's) and this rank's ``rng`` after ``step`` steps; keep only the newest ``keep``
    checkpoints when ``keep > 0``. Every rank of a job calls this; they write one checkpoint."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f"{final.name}.tmp-{_job_token()}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    blob = io.BytesIO()
    torch.save(trainer_state, blob)  # one opaque leaf: its structure may change between runs
    state = {**_state_dicts(modules, optimizers), "trainer": blob.getvalue()}
    for name, value in (rng or {}).items():
        state[f"rng.rank{_rank()}.{name}"] = value  # a distinct key per rank: each rank writes its own
    with _single_process_is_intended():
        dcp.save(state, checkpoint_id=tmp)
    if _rank() == 0:  # dcp.save returns on every rank once the metadata is written
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep > 0:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, modules: nn.Module | list[nn.Module],
                    optimizers: list[torch.optim.Optimizer] | None = None,
                    rng_keys=()) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load ``path`` into the model parts (and optimizers) this rank holds, whatever layout saved
    it: DCP reads each tensor's slice by its global offsets. Returns the saved trainer state and
    this rank's saved random state (empty when the checkpoint's layout had no such rank)."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    try:
        if optimizers is None:
            state = {"model": {k: v for m in modules for k, v in m.state_dict().items()}}
            with _single_process_is_intended():
                dcp.load(state, checkpoint_id=path)
            for m in modules:
                m.load_state_dict({k: state["model"][k] for k in m.state_dict()})
            return {}, {}
        parts = [get_state_dict(m, [o], options=_OPTIONS) for m, o in zip(modules, optimizers)]
        state = {"model": {k: v for p in parts for k, v in p[0].items()},
                 "optim": {k: v for p in parts for k, v in p[1].items()}, "trainer": b""}
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        for name in rng_keys:
            key = f"rng.rank{_rank()}.{name}"
            if key in saved:
                state[key] = torch.get_rng_state() if name == "cpu" else torch.cuda.get_rng_state()
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path)
        for m, o, (model_sd, optim_sd) in zip(modules, optimizers, parts):
            set_state_dict(m, [o], model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)
        rng = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith("rng.")}
        return torch.load(io.BytesIO(state["trainer"]), weights_only=True), rng
    except Exception as e:  # DCP reports shape mismatches and damage with many exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this model: {first}") from e


def _state_dicts(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """Model and optimizer state of every part, keyed by parameter name (flattened optimizer
    state: ``state.<param>.exp_avg``), so that parts held by different ranks merge into one."""
    model, optim = {}, {}
    for m, o in zip(modules, optimizers):
        msd, osd = get_state_dict(m, [o], options=_OPTIONS)
        model.update(msd)
        optim.update(osd)
    return {"model": model, "optim": optim}


_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _job_token() -> str:
    """A name for the temporary directory that all ranks of this job agree on."""
    token = [str(os.getpid())]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]


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
