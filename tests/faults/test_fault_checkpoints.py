"""Checkpoints that are damaged, crafted or never should have been written: each fault made for real
on a real run, and the promise checked — one line naming the checkpoint and why, the right exit code,
no traceback, the previous good checkpoint intact and used, and the losses after recovery equal to an
uninterrupted run's (bit-exact on a CPU)."""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import signal

import pytest
import torch

from loom.config import load_config
from loom.models import build_model, materialize
from loom.train.checkpoint import checkpoint_dirs, save_checkpoint, write_manifest
from loom.train.metrics import read_metrics
from tests.conftest import TINY_OVERRIDES


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8 (and its losses, the reference)."""
    from tests.helpers import train

    run = tmp_path_factory.mktemp("faults") / "run"
    train(load_config(None, [*TINY_OVERRIDES, f"data.path={tiny_corpus}", f"train.run_dir={run}",
                             "model.dropout=0.1"]), run)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000004", "step_0000008"]
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _shard(ckpt):
    return next(ckpt.glob("*.distcp"))


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _other_shape_checkpoint(run):
    """A checkpoint of a model with another width, complete with a valid manifest."""
    cfg = load_config(None, ["model=gpt-tiny", "model.n_embd=32"])
    model = materialize(build_model(cfg.model), "cpu", 0)
    opt = torch.optim.AdamW(model.parameters())
    shutil.rmtree(run / "checkpoints" / "step_0000008")
    save_checkpoint(run, 8, [model], [opt], {"step": 8})


DAMAGE = {
    "truncated_shard": lambda c, run: os.truncate(_shard(c), _shard(c).stat().st_size // 2),
    "garbage_shard": lambda c, run: _shard(c).write_bytes(os.urandom(_shard(c).stat().st_size)),
    "truncated_metadata": lambda c, run: os.truncate(c / ".metadata", 100),
    "missing_metadata": lambda c, run: (c / ".metadata").unlink(),
    "flipped_bytes": lambda c, run: _flip_byte(_shard(c), _shard(c).stat().st_size // 2),
    "shape_mismatch": lambda c, run: _other_shape_checkpoint(run),
}
WHY = {
    "truncated_shard": "truncated", "garbage_shard": "checksum", "truncated_metadata": "truncated",
    "missing_metadata": ".metadata is missing", "flipped_bytes": "checksum", "shape_mismatch": "Size mismatch",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_names_it_and_repeats_the_losses(damage, run, trained, loom_cli):
    newest = run / "checkpoints" / "step_0000008"
    DAMAGE[damage](newest, run)
    code, _, err = loom_cli("train", "--resume", str(run))
    assert code == 0, err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "step_0000008" in line and "trying the one before" in line]
    assert len(said) == 1 and WHY[damage] in said[0], err
    assert "resumed from" in err and "step_0000004 (step 4)" in err
    assert losses(run) == losses(trained)  # bit-exact: the same steps 5..8 again


def test_when_no_checkpoint_loads_it_is_one_line_and_exit_2(run, loom_cli):
    for ckpt in checkpoint_dirs(run):
        _flip_byte(_shard(ckpt), 10_000)
    code, _, err = loom_cli("train", "--resume", str(run))
    assert code == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if line.startswith("loom: error:")]
    assert len(error) == 1 and "no checkpoint of" in error[0]
    assert "step_0000008:" in error[0] and "step_0000004:" in error[0]


def test_generate_eval_and_export_verify_and_fall_back(run, loom_cli):
    import json

    from safetensors import safe_open

    _flip_byte(_shard(run / "checkpoints" / "step_0000008"), 12_345)
    code, out, err = loom_cli("eval", str(run))
    assert code == 0 and json.loads(out)["step"] == 4
    assert "step_0000008 is damaged" in err and "checksum" in err
    code, out, err = loom_cli("export", str(run))
    assert code == 0 and "step_0000008 is damaged" in err
    with safe_open(out.strip(), "pt") as f:
        assert f.metadata()["step"] == "4"
    code, out, err = loom_cli("generate", str(run), "--max-new-tokens", "4")
    assert code == 0 and "step_0000008 is damaged" in err and "Traceback" not in err


def test_no_checkpoint_is_written_from_nan_weights_and_the_error_names_the_last_finite_one(
        tiny_config, tmp_path, loom_cli, monkeypatch):
    import loom.train.trainer as trainer_module

    real = trainer_module.Trainer.train_step

    def poisoned(self, step):  # a weight turns NaN in step 6, between two log records
        out = real(self, step)
        if step == 5:
            with torch.no_grad():
                next(self.model.modules[0].parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(trainer_module.Trainer, "train_step", poisoned)
    run = tmp_path / "run"
    code, _, err = loom_cli("train", "model=gpt-tiny", f"data.path={tiny_config().data.path}", "train.steps=8",
                            "train.batch_size=4", "train.log_every=7", "train.eval_every=100", "train.ckpt_every=2",
                            "train.progress=none", f"train.run_dir={run}")
    assert code == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if line.startswith("loom: error:")]
    assert len(error) == 1 and "non-finite values at step 6" in error[0] and "no checkpoint written" in error[0]
    assert f"last finite checkpoint, {run / 'checkpoints' / 'step_0000004'}" in error[0]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000002", "step_0000004"]


def test_eval_of_nan_weights_is_one_line_never_nan_as_json(run, loom_cli):
    from loom.infer.load import load_for_inference

    _, model, _, _ = load_for_inference(run, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(run, 12, [model], [torch.optim.AdamW(model.parameters())], {"step": 12})
    code, out, err = loom_cli("eval", str(run))
    assert code == 2 and out == "" and "NaN" not in out
    assert "loom: error:" in err and "step 12" in err and "non-finite" in err


class _RunsCode:
    """What a crafted ``.metadata`` holds: unpickling it calls ``os.system``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("command", [["train", "--resume"], ["eval"], ["export"], ["generate"]])
def test_a_crafted_metadata_is_refused_and_runs_nothing(command, run, tmp_path, loom_cli):
    marker = tmp_path / "pwned"
    crafted = pickle.dumps(_RunsCode(f"touch {marker}"))
    pickle.loads(crafted)  # the pickle is real: plain unpickling runs it ...
    assert marker.exists()
    marker.unlink()
    for ckpt in checkpoint_dirs(run):  # every checkpoint crafted, checksums made to match
        (ckpt / ".metadata").write_bytes(crafted)
        write_manifest(ckpt)
    code, out, err = loom_cli(*command, str(run))
    assert not marker.exists()  # ... but loom's reading does not
    assert code == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if line.startswith("loom: error:")]
    assert len(error) == 1 and "posix.system" in error[0] and "refused" in error[0]


def test_a_save_that_cannot_be_written_keeps_the_older_checkpoint(run, trained, loom_cli):
    """A full disk, as a write that fails (the file-size limit: EFBIG instead of ENOSPC)."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    shard = _shard(run / "checkpoints" / "step_0000008").stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (shard // 2, hard))
    try:
        code, _, err = loom_cli("train", "--resume", str(run), "train.steps=12")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert code == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if line.startswith("loom: error:")]
    assert len(error) == 1 and "step_0000012 could not be written" in error[0] and "step_0000008" in error[0]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000004", "step_0000008"]
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    code, _, err = loom_cli("train", "--resume", str(run), "train.steps=12")  # room again: it goes on
    assert code == 0 and "resumed from" in err and "step 8" in err
