"""Checkpoints through ``torch.distributed.checkpoint`` (DCP), written atomically.

DCP records every tensor by its global shape and offsets, so the format that one process writes
here is the one that sharded layouts write and that any other layout can load. A checkpoint is
written into ``step_NNNNNNN.tmp-<pid>`` and renamed to ``step_NNNNNNN`` only when complete: a crash
mid-save leaves a ``.tmp`` directory, which is never taken for a checkpoint and is cleared on resume.

Each checkpoint carries ``manifest.json`` (written last, atomically, before the rename): the size
and SHA-256 of every file in it. Loading verifies them first, so a truncated, rotten or half-copied
checkpoint is refused in one line naming it and why, and :func:`load_newest` falls back to the
newest checkpoint that verifies and loads. ``.metadata`` is read through an unpickler that admits
only the checkpoint-metadata types (DCP itself uses plain ``pickle.load``), so a crafted run
directory cannot run code; tensors are read with ``torch.load(weights_only=True)`` as DCP does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import io
import json
import logging
import os
import pathlib
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

log = logging.getLogger("loom.train")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the model; the message is one line for the user."""


CKPT_RE = re.compile(r"^step_(\d{7,})$")
MANIFEST = "manifest.json"
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it assumes a single process when no process group exists; on one device
    that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The checkpoints of a run (every ``step_N`` a save completed), oldest first; whether each is
    intact is for :func:`verify_checkpoint` to say."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CKPT_RE.match(p.name) and p.is_dir()]
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
    try:
        with _single_process_is_intended():
            dcp.save(state, checkpoint_id=tmp)
        if _rank() == 0:  # dcp.save returns on every rank once the metadata is written
            _fsync_tree(tmp)
            write_manifest(tmp)
    except (Exception, CheckpointException) as e:  # a full disk, a lost mount: the older checkpoints stay
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        last = checkpoint_dirs(run_dir)
        raise CheckpointError(f"checkpoint {final} could not be written ({_why(e)}); the newest saved one is "
                              f"{last[-1] if last else 'none'}") from None
    if _rank() == 0:
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
    problem = _on_coordinator(_problem_of, path)  # checksums first: nothing is unpickled from a bad file
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    try:
        if optimizers is None:
            state = {"model": {k: v for m in modules for k, v in m.state_dict().items()}}
            with _single_process_is_intended():
                dcp.load(state, storage_reader=SafeFileSystemReader(path))
            for m in modules:
                m.load_state_dict({k: state["model"][k] for k in m.state_dict()})
            return {}, {}
        parts = [get_state_dict(m, [o], options=_OPTIONS) for m, o in zip(modules, optimizers)]
        state = {"model": {k: v for p in parts for k, v in p[0].items()},
                 "optim": {k: v for p in parts for k, v in p[1].items()}, "trainer": b""}
        saved = set(SafeFileSystemReader(path).read_metadata().state_dict_metadata)
        for name in rng_keys:
            key = f"rng.rank{_rank()}.{name}"
            if key in saved:
                state[key] = torch.get_rng_state() if name == "cpu" else torch.cuda.get_rng_state()
        with _single_process_is_intended():
            dcp.load(state, storage_reader=SafeFileSystemReader(path))
        for m, o, (model_sd, optim_sd) in zip(modules, optimizers, parts):
            set_state_dict(m, [o], model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)
        rng = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith("rng.")}
        return torch.load(io.BytesIO(state["trainer"]), weights_only=True), rng
    # DCP reports shape mismatches and damage with many exception types, and wraps what any rank
    # raised in CheckpointException, which derives from BaseException (not Exception)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this model: {_why(e)}") from None


def load_newest(run_dir: Path, modules: nn.Module | list[nn.Module],
                optimizers: list[torch.optim.Optimizer] | None = None,
                rng_keys=()) -> tuple[Path, dict, dict[str, torch.Tensor]] | None:
    """Load the newest checkpoint of ``run_dir`` that verifies and loads (see :func:`load_checkpoint`),
    saying which newer ones were skipped and why; None when the run has no checkpoint. Raises
    :class:`CheckpointError` (one line, every checkpoint and its fault) when none can be loaded.

    A checkpoint that failed part-way may have written some tensors; the next one tried writes
    every tensor again, so nothing of the damaged one survives."""
    skipped = []
    for path in reversed(checkpoint_dirs(Path(run_dir))):
        try:
            state, rng = load_checkpoint(path, modules, optimizers, rng_keys)
        except CheckpointError as e:
            log.warning("%s; trying the one before", e)
            skipped.append(f"{path.name}: {str(e).split(': ', 1)[-1]}")
            continue
        if skipped:
            log.warning("using %s, the newest checkpoint that loads (skipped: %s)", path, "; ".join(skipped))
        return path, state, rng
    if skipped:
        raise CheckpointError(f"no checkpoint of {run_dir} can be loaded: {'; '.join(skipped)}")
    return None


def _why(e: BaseException) -> str:
    """The first line of what went wrong, looking inside DCP's per-rank wrapper."""
    if isinstance(e, CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else getattr(inner, "exc", inner)
        if isinstance(inner, BaseException):
            e = inner
    text = str(e).strip() or ("a file ends early (truncated?)" if isinstance(e, EOFError) else "")
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# -- integrity: checksums ----------------------------------------------------------------

def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Record the size and SHA-256 of every file of ``ckpt``, atomically, as its last file."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(ckpt.iterdir()) if f.is_file() and f.name != MANIFEST}
    tmp = ckpt / f".{MANIFEST}.tmp"
    with tmp.open("w") as fh:
        json.dump({"format": 1, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt / MANIFEST)


def verify_checkpoint(ckpt: Path) -> None:
    """Raise :class:`CheckpointError` when ``ckpt`` is not intact: a file missing, of another size
    than saved, or with other bytes than saved."""
    problem = _problem_of(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}")


def _problem_of(ckpt: Path) -> str | None:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "it is not a directory"
    manifest = ckpt / MANIFEST
    if not manifest.is_file():  # saved before checksums existed: only its structure can be checked
        return None if (ckpt / ".metadata").is_file() else ".metadata is missing (and no manifest.json)"
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {str(name): (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    if ".metadata" not in expected:
        return f"{MANIFEST} lists no .metadata"
    for name, (size, digest) in sorted(expected.items()):
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were saved (truncated or overwritten)"
        if _sha256(f) != digest:
            return f"{name} does not match its saved checksum (its bytes changed since the save)"
    return None


def _on_coordinator(fn, *args):
    """``fn(*args)`` computed on rank 0, its result on every rank."""
    result = [fn(*args) if _rank() == 0 else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


# -- no code from files: the metadata unpickler ------------------------------------------

def _allowed_globals() -> dict[tuple[str, str], object]:
    """What a DCP ``.metadata`` pickle may name: DCP's metadata dataclasses and enums, torch.Size,
    dtypes and layouts, paths. Nothing that runs code when called with pickled arguments."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("torch", "Size"): torch.Size, ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
               ("collections", "OrderedDict"): __import__("collections").OrderedDict}
    for name in dir(metadata):
        obj = getattr(metadata, name)
        if isinstance(obj, type) and obj.__module__ == metadata.__name__ and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            allowed[(metadata.__name__, name)] = obj
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath, pathlib.Path):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    _allowed: dict | None = None

    def find_class(self, module: str, name: str):
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        try:
            return _MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f".metadata names {module}.{name}, which is not checkpoint metadata; refused, since "
                f"unpickling it could run code") from None


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by :class:`_MetadataUnpickler` instead of ``pickle.load``."""

    def __init__(self, path) -> None:
        super().__init__(str(path))

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def nonfinite_state(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """Names of this rank's parameters and optimizer-state tensors holding NaN or infinity (its
    local shards: no communication)."""
    bad = []
    for m, o in zip(modules, optimizers):
        names = {id(p): n for n, p in m.named_parameters()}
        for name, p in m.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(_local(p)).all()):
                bad.append(name)
        for p, st in o.state.items():
            for key, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(_local(v)).all()):
                    bad.append(f"optimizer state {key} of {names.get(id(p), 'a parameter')}")
    return bad


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


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
