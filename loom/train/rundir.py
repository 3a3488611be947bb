"""The run directory: what a training run leaves behind, and how to open it again.

    RUN_DIR/
      config.yaml        the resolved configuration (every field, after presets and overrides)
      data.json          the corpus: source, token counts, unigram entropy, tokenizer kind
      tokenizer/         the tokenizer, so the run needs nothing else to generate text
      labels.json        a classifier's label names, in class order (``loom predict``)
      metrics.jsonl      one JSON object per logged step
      train.log          what the run printed
      checkpoints/       step_NNNNNNN/ directories in torch.distributed.checkpoint format
      summary.json       final validation loss, throughput, timings
      loss.png           the loss curve (``loom plot``; MoE models: also expert_load.png)
      .lock              held (``flock``) by the job training the run: one job per run directory
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import time
from pathlib import Path

from loom.config import Config, ConfigError, load_config, task_name, tokenizer_is_dir
from loom.data import PreparedData, prepare_data
from loom.data.corpus import corpus_files
from loom.errors import RunError
from loom.tasks import TASKS

__all__ = ["LABELS_FILE", "RunError", "check_data_path", "check_run_dir", "check_run_unlocked", "load_resume_config",
           "load_run_config", "lock_run_dir", "new_run_dir", "prepare_run_data", "run_lock_owner"]


LABELS_FILE = "labels.json"


def new_run_dir(cfg: Config) -> Path:
    """``train.run_dir``, or a new ``runs/<time>-<preset>[-N]`` that no other run has taken."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.preset}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in itertools.count():
        candidate = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.mkdir()  # atomic: two runs started in the same second get different dirs
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def check_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{str(run_dir)!r} is not a loom run directory (no config.yaml in it)")
    return run_dir


def load_run_config(run_dir: Path, overrides: list[str] | None = None, settings: dict | None = None) -> Config:
    return load_config(check_run_dir(run_dir) / "config.yaml", overrides, settings)


def load_resume_config(run_dir: Path, overrides: list[str], settings: dict | None = None) -> Config:
    """The run's config with ``settings`` (a saved plan's) and ``overrides``, which may change how it
    trains (``train.*``, ``parallel.*``) but not what it is (``model.*``, ``data.*``): the checkpoint and
    the token ids depend on those."""
    saved, cfg = load_run_config(run_dir), load_run_config(run_dir, overrides, settings)
    for section in ("model", "data"):
        old, new = vars(getattr(saved, section)), vars(getattr(cfg, section))
        for key in old:
            if old[key] != new[key]:
                raise ConfigError(f"--resume keeps the run's {section}: {section}.{key}={new[key]!r} differs "
                                  f"from the run's {old[key]!r}; start a new run to change it")
    return cfg


def check_data_path(cfg: Config) -> None:
    """A ``data.path`` that cannot be read is one line before a run directory is made."""
    if getattr(TASKS[task_name(cfg)], "load_data", None) is None:
        corpus_files(cfg.data.path)
    elif cfg.data.path is not None and not Path(cfg.data.path).expanduser().is_dir():
        raise ConfigError(f"data.path={cfg.data.path!r}: train.task={task_name(cfg)} reads a folder with one "
                          "subfolder of images per class (DIR/cat/1.png, DIR/dog/2.jpg)")


def prepare_run_data(cfg: Config, tokenizer_dir: Path | None = None) -> PreparedData:
    """The tokenized corpus of ``cfg.data``; with ``tokenizer_dir`` (a run's own tokenizer),
    encoded with that tokenizer rather than one trained for the cache. A task with its own
    ``load_data`` (images) gets what that returns instead."""
    d = cfg.data
    load_data = getattr(TASKS[task_name(cfg)], "load_data", None)
    if load_data is not None:  # a task that reads no text (images)
        return load_data(d.path, cfg.model)
    # data.tokenizer=auto: the task's own kind where it needs one (masked-LM: WordPiece's special tokens)
    kind = d.tokenizer if d.tokenizer != "auto" else getattr(TASKS[task_name(cfg)], "tokenizer_kind", "auto")
    # sft's records: {prompt, response}; a task that says what its corpus is (seq2seq: its pairs) is asked
    corpus = getattr(TASKS[task_name(cfg)], "text_corpus", None)
    path, field = corpus(d.path, d.cache_dir) if corpus else (d.path, {"sft": "response"}.get(task_name(cfg),
                                                                                                d.jsonl_field))
    if tokenizer_is_dir(d.tokenizer) or tokenizer_dir is not None:  # a given folder says which tokenizer
        kind = "auto"
    return prepare_data(path, cfg.model.vocab_size, kind, d.val_fraction, d.cache_dir, field,
                        tokenizer_dir=tokenizer_dir)


LOCK = ".lock"


def lock_run_dir(run_dir: Path, job: str = "") -> contextlib.AbstractContextManager:
    """Hold ``run_dir``'s lock until the returned object is closed (or the process ends, however it
    ends: the kernel releases a ``flock`` with its holder, so a killed job leaves no stale lock).
    A second job on the same run raises :class:`RunError` instead of overwriting its checkpoints."""
    fh = (Path(run_dir) / LOCK).open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise RunError(_in_use(run_dir)) from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "job": job}))
    fh.flush()
    return fh


def check_run_unlocked(run_dir: Path) -> None:
    """Raise :class:`RunError` when a job holds ``run_dir`` now (a check before starting processes)."""
    if (Path(run_dir) / LOCK).is_file():
        lock_run_dir(run_dir).close()


def run_lock_owner(run_dir: Path) -> dict:
    """Who last held the lock: ``{"pid": ..., "job": ...}`` (empty when unknown)."""
    try:
        return json.loads((Path(run_dir) / LOCK).read_text())
    except (OSError, ValueError):
        return {}


def _in_use(run_dir: Path) -> str:
    pid = run_lock_owner(run_dir).get("pid", "?")
    return (f"{str(run_dir)!r} is in use by another job (process {pid}); wait for it to finish or stop it "
            f"before resuming (one job per run directory)")
