"""The training loop on one device: config → data → build on meta → initialize or resume → train.

Every source of randomness is a function of the seed and the step (the data sampler, the schedule)
or is saved in the checkpoint (the RNG state, the optimizer moments, the loss scale, the losses not
yet logged), so a resumed run repeats the losses of an uninterrupted one exactly (on a CPU; CUDA
kernels such as attention's backward are not bitwise deterministic).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from loom.config import Config, ConfigError, config_to_yaml
from loom.data import BatchSampler, PreparedData
from loom.data.corpus import corpus_files
from loom.models import GPT, build_model, count_params, flops_per_token, materialize
from loom.runs import RunError, new_run_dir, prepare_run_data, read_json, resolve_device, write_text_atomic
from loom.train.checkpoint import (
    checkpoint_step,
    clear_partial_saves,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from loom.train.evaluate import evaluate, lm_loss
from loom.train.memory import check_training_state_fits
from loom.train.metrics import MetricsFile, peak_flops
from loom.train.optim import build_optimizer, lr_at
from loom.train.precision import LossScaler, autocast

log = logging.getLogger("loom.train")


@dataclass
class Interval:
    """What happened since the last log line."""

    steps: int = 0
    seconds: float = 0.0
    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None  # of the last step

    def reset(self) -> None:
        self.steps, self.seconds, self.losses, self.grad_norm = 0, 0.0, [], None


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step and save a checkpoint; a
    second Ctrl-C aborts at once. Interrupting mid-step could save half-updated weights."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step and saving a checkpoint (Ctrl-C again to abort now)")


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, data: PreparedData, resume: bool = False):
        self.cfg, self.run_dir, self.data = cfg, run_dir, data
        t = cfg.train
        self.device = resolve_device(t.device)
        if self.device.type == "cuda" and t.precision == "fp32":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls, the fp32 peak in the MFU table
        self.peak = peak_flops(self.device, t.precision)
        torch.manual_seed(t.seed)
        self.model: GPT = materialize(build_model(cfg.model), self.device, t.seed)
        self.optimizer = build_optimizer(self.model, t)
        self.scaler = LossScaler(self.device, t.precision)
        self.sampler = BatchSampler(data.train, cfg.model.block_size, t.batch_size, t.seed)
        self.interval = Interval()
        self.start_step = self._resume() if resume else 0
        self.flops_per_token = flops_per_token(cfg.model, cfg.model.block_size)
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", truncate_after_step=self.start_step)
        mode = t.progress
        self.progress_mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode

    # -- one optimizer step --------------------------------------------------------------

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over ``grad_accum`` micro-batches, then one optimizer step.
        Returns the step's mean loss and the gradient norm before clipping (both unsynced)."""
        t = self.cfg.train
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = t.batch_size // t.grad_accum
        total = torch.zeros((), device=self.device)
        for i in range(t.grad_accum):
            x, y = self.sampler.batch(step, rows=slice(i * micro, (i + 1) * micro))
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device, t.precision):
                logits = self.model(x)
            loss = lm_loss(logits, y) / t.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer, grad_norm, step)
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> dict:
        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.start_step, unit="step", dynamic_ncols=True) \
            if self.progress_mode == "bar" else None
        last_eval, started, done = {}, time.perf_counter(), self.start_step
        self.model.train()
        with StopRequest() as stop:
            for step in range(self.start_step, t.steps):
                self._timed_step(step)
                done = step + 1
                record = self._log_record(done, started) if done % t.log_every == 0 or done == t.steps else None
                if done % t.eval_every == 0 or done == t.steps:
                    last_eval = evaluate(self.model, self.data.val, self.cfg.model.block_size, t.batch_size,
                                         t.eval_batches, self.device, t.precision)
                    record = {**(record or {"step": done}), **last_eval}
                if record is not None:
                    self.metrics.write(record)
                    self._show(bar, record)
                if bar is not None:
                    bar.update(1)
                if (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps or stop.requested:
                    self.save(done)
                if stop.requested:
                    log.warning("stopped at step %d; continue with: loom train --resume %s", done, self.run_dir)
                    break
        if bar is not None:
            bar.close()
        self.metrics.close()
        return self._summary(last_eval, time.perf_counter() - started, done)

    def _timed_step(self, step: int) -> None:
        t0 = time.perf_counter()
        loss, self.interval.grad_norm = self.train_step(step)
        if self.device.type == "cuda" and (step + 1) % self.cfg.train.log_every == 0:
            torch.cuda.synchronize(self.device)
        self.interval.seconds += time.perf_counter() - t0
        self.interval.steps += 1
        self.interval.losses.append(loss)

    def _log_record(self, step: int, started: float) -> dict:
        iv, t = self.interval, self.cfg.train
        tokens_per_s = iv.steps * t.batch_size * self.cfg.model.block_size / max(iv.seconds, 1e-9)
        loss = torch.stack(iv.losses).mean().item()
        if not math.isfinite(loss) and not self.scaler.enabled:
            raise RunError(f"training diverged: the loss is {loss} at step {step}; lower train.lr "
                           f"(now {t.lr:g}) or set train.grad_clip, and resume from the last checkpoint")
        record = {
            "step": step,
            "loss": loss,
            "lr": lr_at(step - 1, t),
            "grad_norm": iv.grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / self.peak,
            "elapsed_s": time.perf_counter() - started,
        }
        if self.scaler.enabled:
            record["loss_scale"] = self.scaler.loss_scale
            record["skipped_steps"] = self.scaler.skipped_steps
        iv.reset()
        return record

    # -- checkpoints ---------------------------------------------------------------------

    def save(self, step: int) -> Path:
        state = {
            "step": step,
            "rng_cpu": torch.get_rng_state(),
            "scaler": self.scaler.state_dict(),
            # losses of steps not yet logged, so the first record after a resume averages the same steps
            "pending_losses": torch.stack(self.interval.losses) if self.interval.losses else torch.zeros(0),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return save_checkpoint(self.run_dir, step, self.model, self.optimizer, state, self.cfg.train.keep_checkpoints)

    def _resume(self) -> int:
        clear_partial_saves(self.run_dir)
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.run_dir)
            return 0
        state = load_checkpoint(ckpt, self.model, self.optimizer)
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.scaler.load_state_dict(state["scaler"])
        self.interval.losses = [x.to(self.device) for x in state.get("pending_losses", torch.zeros(0))]
        log.info("resumed from %s (step %d)", ckpt, checkpoint_step(ckpt))
        return int(state["step"])

    # -- what the user sees --------------------------------------------------------------

    def _show(self, bar, record: dict) -> None:
        if self.progress_mode == "bar":
            bar.set_postfix_str(_fmt(record), refresh=False)
        elif self.progress_mode == "log":
            log.info("step %d/%d | %s", record["step"], self.cfg.train.steps, _fmt(record))

    def _summary(self, last_eval: dict, seconds: float, done: int) -> dict:
        summary = {
            "steps": done,
            "finished": done >= self.cfg.train.steps,
            "params": count_params(self.model),
            "unigram_entropy_nats": self.data.meta.get("unigram_entropy_nats"),
            "train_seconds": seconds,
            "skipped_steps": self.scaler.skipped_steps,
            **last_eval,
        }
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def _fmt(r: dict) -> str:
    parts = []
    if "loss" in r:
        parts += [f"loss {r['loss']:.3f}", f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s",
                  f"mfu {100 * r['mfu']:.1f}%"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.3f}")
    return " | ".join(parts)


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Train ``cfg`` in ``run_dir`` (continuing its newest checkpoint when ``resume``)."""
    device = resolve_device(cfg.train.device)  # fail before any work if the device is not there
    check_training_state_fits(cfg, device)
    corpus_files(cfg.data.path)  # a wrong data.path fails before a run directory is made
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise RunError(f"{str(run_dir)!r} already holds a run with checkpoints; continue it with "
                       f"`loom train --resume {run_dir}` or choose another train.run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    with _log_to_file(run_dir / "train.log"):
        data = prepare_run_data(cfg, run_dir / "tokenizer" if resume else None)
        check_data_fits(cfg, data)
        trainer = Trainer(cfg, run_dir, data, resume=resume)
        _write_run_files(cfg, run_dir, data, with_tokenizer=not resume)  # only once the checkpoint loaded
        if trainer.start_step >= cfg.train.steps:
            log.info("%s is already trained to step %d of train.steps=%d; to go further, resume with "
                     "train.steps=N", run_dir, trainer.start_step, cfg.train.steps)
            return read_json(run_dir / "summary.json")
        log.info("run %s: %s, %.2fM parameters, %d steps of %d tokens, %s on %s", run_dir, cfg.model.preset,
                 count_params(trainer.model) / 1e6, cfg.train.steps, cfg.train.batch_size * cfg.model.block_size,
                 cfg.train.precision, trainer.device)
        summary = trainer.run()
        if summary["finished"]:
            log.info("done: val loss %.3f (perplexity %.1f) against a unigram entropy of %.3f nats; %s",
                     summary["val_loss"], summary["val_ppl"], summary["unigram_entropy_nats"] or math.nan, run_dir)
        _plot(run_dir)
        return summary


def check_data_fits(cfg: Config, data: PreparedData) -> None:
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{data.tokenizer.vocab_size} tokens; set model.vocab_size>={data.tokenizer.vocab_size}")
    need = cfg.model.block_size + 1
    for split, tokens in (("train", data.train), ("val", data.val)):
        if len(tokens) < need:
            raise ConfigError(f"the {split} split holds {len(tokens)} tokens, fewer than one sequence of "
                              f"model.block_size+1={need}; use more data or a smaller model.block_size")


def _write_run_files(cfg: Config, run_dir: Path, data: PreparedData, with_tokenizer: bool) -> None:
    write_text_atomic(run_dir / "config.yaml", config_to_yaml(cfg))
    write_text_atomic(run_dir / "data.json", json.dumps({**data.meta, "cache": str(data.dir)}, indent=2) + "\n")
    if with_tokenizer:
        tok_dir = run_dir / "tokenizer"
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        data.tokenizer.save(tok_dir)


@contextlib.contextmanager
def _log_to_file(path: Path):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("loom")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _plot(run_dir: Path) -> None:
    from loom.plot import plot_run  # matplotlib is imported only when a picture is drawn

    try:
        plot_run(run_dir)
    except Exception as e:  # a failed picture must not fail a finished run
        log.warning("could not draw the loss curve: %s", e)
