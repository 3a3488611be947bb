"""A training job: its processes, its run directory, its data, and the files it leaves.

    config + plan (resolved once, by the caller) -> join the processes -> run directory -> data
    -> Trainer (build, parallelize, init or resume) -> train -> summary, loss curve

Every process of a job calls :func:`train` with the same config and plan; the coordinator (rank 0)
makes the run directory and prepares the data first, the others follow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

from loom.config import Config, ConfigError, config_to_yaml
from loom.data import DataError, PreparedData
from loom.errors import RunError
from loom.files import read_json, write_text_atomic
from loom.models import build_model, count_params
from loom.parallel.launch import (
    Process,
    barrier,
    broadcast_object,
    collective_timeout,
    init_process,
    restart_count,
)
from loom.parallel.plan import Plan
from loom.train.checkpoint import CheckpointError, latest_checkpoint
from loom.train.hf import initial_tokenizer, starts_from_hf
from loom.train.memory import check_training_state_fits
from loom.train.rundir import LABELS_FILE, check_data_path, lock_run_dir, new_run_dir, prepare_run_data, run_lock_owner
from loom.train.trainer import STEPS_LOGGER, Trainer

log = logging.getLogger("loom.train")


def train(cfg: Config, plan: Plan, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Train ``cfg`` under ``plan`` in ``run_dir`` (continuing its newest checkpoint when ``resume``)."""
    # fail before any work if the device is not there
    process, device = init_process(cfg.train.device, cfg.parallel.timeout_s)
    if not process.is_coordinator:
        logging.getLogger("loom").setLevel(logging.ERROR)  # one voice: rank 0's
    if plan.world_size != process.world_size:
        raise ConfigError(f"the layout {plan.describe()} needs {plan.world_size} processes, but {process.world_size} "
                          f"were started (e.g. --nproc {plan.world_size})")
    check_training_state_fits(cfg, device, plan, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    check_data_path(cfg)  # a wrong data.path fails before a run directory is made
    run_dir, resume = _on_coordinator(process, _make_run_dir, cfg, run_dir, resume)
    run_dir = Path(run_dir)
    with _holding_lock(process, run_dir), \
            _log_to_file(run_dir / "train.log") if process.is_coordinator else contextlib.nullcontext(), \
            collective_timeout(cfg.parallel.timeout_s):
        # a restarted job may have died before it wrote the tokenizer
        tok_dir = run_dir / "tokenizer" if resume and (run_dir / "tokenizer").is_dir() else None
        if not resume and cfg.train.init_from and not starts_from_hf(cfg):
            tok_dir = Path(cfg.train.init_from).expanduser() / "tokenizer"  # reads text as the run it starts from
        elif not resume:  # the model directory's (train.init_from) or data.tokenizer=DIR's; None: train one
            given = _on_coordinator(process, initial_tokenizer, cfg, run_dir)
            tok_dir = Path(given) if given else None
        data = _on_coordinator(process, prepare_run_data, cfg, tok_dir, share=False)
        if not process.is_coordinator:
            data = prepare_run_data(cfg, tok_dir)  # the coordinator has filled the cache
        check_vocabulary(cfg, data)
        trainer = Trainer(cfg, plan, run_dir, data, resume=resume, process=process, device=device)
        if process.is_coordinator:
            # only once the checkpoint loaded; the tokenizer too where the run directory lacks it
            _write_run_files(cfg, run_dir, data, with_tokenizer=not (run_dir / "tokenizer").is_dir(),
                             labels=getattr(trainer.task, "label_names", None))
        if trainer.start_step >= cfg.train.steps:
            log.info("%s is already trained to step %d of train.steps=%d; to go further, resume with "
                     "train.steps=N", run_dir, trainer.start_step, cfg.train.steps)
            return read_json(run_dir / "summary.json")
        log.info("run %s: %s, %.2fM parameters, %d steps of %d tokens, %s on %s%s", run_dir, cfg.model.preset,
                 count_params(build_model(cfg.model)) / 1e6, cfg.train.steps,
                 cfg.train.batch_size * cfg.model.block_size,
                 cfg.train.precision, device,
                 f", {process.world_size} processes: {plan.describe()}" if process.world_size > 1 else "")
        summary = trainer.run()
        if summary["finished"]:
            log.info("done: %s; %s", _final(summary), run_dir)
        if process.is_coordinator:
            _plot(run_dir)
        barrier()
        return summary


def _final(summary: dict) -> str:
    if "val_ppl" in summary:
        return (f"val loss {summary['val_loss']:.3f} (perplexity {summary['val_ppl']:.1f}) against a unigram "
                f"entropy of {summary.get('unigram_entropy_nats') or math.nan:.3f} nats")
    return ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k.startswith("val_") and isinstance(v, float))


def _make_run_dir(cfg: Config, run_dir: Path | None, resume: bool) -> tuple[str, bool]:
    """The run directory, and whether to resume it: a worker group that an elastic agent started
    again resumes the run its job began (the lock file names the job that last trained it). The job
    is known by the agent's run id; the restart count alone cannot tell, since on several nodes only
    the agent whose worker failed counts a restart (the others restart for the new rendezvous)."""
    if run_dir is None and not cfg.train.run_dir and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise ConfigError("with restarts (torchrun --max-restarts) set train.run_dir=DIR, so that restarted "
                          "workers find the run their first start began")
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    job = _job_id()
    ours = run_lock_owner(run_dir).get("job") == job if job not in ("", "none") else restart_count() > 0
    if not resume and latest_checkpoint(run_dir) is not None:
        if ours:
            return str(run_dir), True
        raise RunError(f"{str(run_dir)!r} already holds a run with checkpoints; continue it with "
                       f"`loom train --resume {run_dir}` or choose another train.run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return str(run_dir), resume or ours


def _job_id() -> str:
    """This job's id, the same in every restart of its workers (the elastic agent's run id)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


@contextlib.contextmanager
def _holding_lock(process: Process, run_dir: Path):
    """The run directory's lock, held by the coordinator while the job runs (one job per run)."""
    lock = _on_coordinator(process, lock_run_dir, run_dir, _job_id(), share=False)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def _on_coordinator(process: Process, fn, *args, share: bool = True):
    """``fn(*args)`` on rank 0; its result (``share``) or its error reaches every rank, so that a
    bad run directory or corpus stops all processes with the same message instead of a hang."""
    result, error = None, None
    if process.is_coordinator:
        try:
            result = fn(*args)
        except Exception as e:  # re-raised below on every rank
            error = e
    if process.world_size > 1:
        error = broadcast_object(error)
        if share and error is None:
            result = broadcast_object(result)
    if error is not None:
        raise error
    return result


def check_vocabulary(cfg: Config, data: PreparedData) -> None:
    if data.tokenizer is not None and data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{data.tokenizer.vocab_size} tokens; set model.vocab_size>={data.tokenizer.vocab_size}")


def _write_run_files(cfg: Config, run_dir: Path, data: PreparedData, with_tokenizer: bool,
                     labels: list[str] | None = None) -> None:
    write_text_atomic(run_dir / "config.yaml", config_to_yaml(cfg))
    cache = {"cache": str(data.dir)} if getattr(data, "dir", None) else {}  # images: read, not cached
    write_text_atomic(run_dir / "data.json", json.dumps({**data.meta, **cache}, indent=2) + "\n")
    if labels is not None:  # a classifier's class names, for loom predict
        write_text_atomic(run_dir / LABELS_FILE, json.dumps(labels) + "\n")
    if with_tokenizer and data.tokenizer is not None:
        tok_dir = run_dir / "tokenizer"
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        data.tokenizer.save(tok_dir)


USER_ERRORS = (ConfigError, RunError, DataError, CheckpointError)


@contextlib.contextmanager
def _log_to_file(path: Path):
    """``train.log``: what rank 0 logs, the step lines whatever ``train.progress`` shows (they come
    through ``loom.steps``, which the terminal does not see), and the error that stopped the run: the
    one line the user saw, or an unexpected exception's traceback."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger("loom"), logging.getLogger(STEPS_LOGGER)]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    except BaseException as e:
        if isinstance(e, USER_ERRORS):
            message, exc_info = f"loom: error: {e}", None
        elif isinstance(e, KeyboardInterrupt):
            message, exc_info = "loom: interrupted", None
        elif isinstance(e, SystemExit):
            raise
        else:
            message, exc_info = f"the run stopped on an unexpected error: {type(e).__name__}: {e}", \
                (type(e), e, e.__traceback__)
        # to the file only: the terminal shows it once, from the command line
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), exc_info))
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def _plot(run_dir: Path) -> None:
    from loom.plot import plot_run  # matplotlib is imported only when a picture is drawn

    try:
        plot_run(run_dir)
    except Exception as e:  # a failed picture must not fail a finished run
        log.warning("could not draw the loss curve: %s", e)
