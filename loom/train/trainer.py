"""The trainer of one process: build its share of the model under the plan, initialize or resume it,
then the loop (steps, logging, evaluation, checkpoints, Ctrl-C).

    config + plan -> build on meta -> parallelize(model, plan, mesh, loss) -> init or load -> train

Every source of randomness is a function of the seed and the step (the task's batches, the schedule)
or is saved in the checkpoint (the RNG state, the optimizer moments, the loss scale, the losses not
yet logged), so a resumed run repeats the losses of an uninterrupted one exactly (on a CPU; CUDA
kernels such as attention's backward are not bitwise deterministic).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from loom.config import Config, task_name
from loom.data import PreparedData
from loom.errors import ConfigError, RunError
from loom.files import write_text_atomic
from loom.models import build_model, count_params, flops_per_token, spec_of
from loom.models.common import STAT_FIELDS
from loom.parallel.launch import Process, barrier, resolve_device
from loom.parallel.mesh import all_reduce_sum, build_mesh, coordinates
from loom.parallel.parallelize import ParallelModel, parallelize
from loom.parallel.plan import Plan
from loom.tasks import build_task, slice_rows, to_device
from loom.train.checkpoint import (
    checkpoint_step,
    clear_partial_saves,
    latest_checkpoint,
    load_newest,
    nonfinite_state,
    save_checkpoint,
)
from loom.train.finetune import prepare_for_finetuning
from loom.train.hf import load_hf_weights, starts_from_hf
from loom.train.init_from import init_from_run
from loom.train.metrics import MetricsFile, TensorBoardWriter, peak_flops, raise_cpu_peak
from loom.train.optim import lr_at
from loom.train.precision import autocast, compute_dtype, note_cpu_precision, param_dtype
from loom.train.step import TrainingStep, mean_over_replicas
from loom.train.stop import StopAgreement

log = logging.getLogger("loom.train")
# the step lines for train.log when the terminal shows a bar or nothing: not under "loom", whose
# handler is the terminal's (the run's file handler listens to both)
STEPS_LOGGER = "loom_steps"
steps_log = logging.getLogger(STEPS_LOGGER)
steps_log.setLevel(logging.INFO)
steps_log.propagate = False


@dataclass
class Interval:
    """What happened since the last log line."""

    steps: int = 0
    seconds: float = 0.0
    units: int = 0  # tokens trained on (all replicas)
    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None  # of the last step
    moe: torch.Tensor | None = None  # this rank's MoE statistics, summed over the steps

    def reset(self) -> None:
        self.steps, self.seconds, self.units, self.losses, self.grad_norm, self.moe = 0, 0.0, 0, [], None, None


class StopRequest:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM asks the loop to stop after the current step and
    save a checkpoint; a second signal aborts at once. Interrupting mid-step could save half-updated
    weights. A signal within a second of the first is the same request arriving twice (a terminal's
    Ctrl-C reaches the worker directly and again through its launcher), not a second one."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    SAME_REQUEST_S = 1.0

    def __init__(self) -> None:
        self.signum = 0  # the first signal received; 0: none
        self._at = 0.0
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if time.monotonic() - self._at < self.SAME_REQUEST_S:
                return
            raise KeyboardInterrupt
        self.signum, self._at = signum, time.monotonic()
        # straight to the file descriptor: a signal can arrive while the main thread is inside a write
        # to the same stream, and logging from here would then fail with a re-entrant write
        msg = f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint (again to abort now)\n"
        try:
            os.write(2, msg.encode())
        except OSError:  # no stderr to tell: the stop still happens
            pass


class Trainer:
    """One process's part of a training job: its share of the model under the plan, its slice of
    every batch, and (on the coordinator, rank 0) the files and the progress the user sees.

    ``run_dir=None`` trains in memory (no checkpoints, metrics or summary)."""

    def __init__(self, cfg: Config, plan: Plan, run_dir: Path | None, data: PreparedData, resume: bool = False,
                 process: Process | None = None, device: torch.device | None = None):
        self.cfg, self.plan, self.run_dir, self.data = cfg, plan, run_dir, data
        t = cfg.train
        self.process = process or Process()
        if plan.world_size != self.process.world_size:
            raise RunError(f"the plan ({plan.describe()}) is for {plan.world_size} processes, but this job has "
                           f"{self.process.world_size}")
        self.device = device or resolve_device(t.device)
        if self.device.type == "cuda" and t.precision == "fp32":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls, the fp32 peak in the MFU table
        if self.process.is_coordinator:
            note_cpu_precision(self.device, t.precision)
        self.peak = self._peak_flops()
        mesh = build_mesh(plan, self.device.type) if self.process.world_size > 1 else None
        self.coord = coordinates(mesh) if mesh is not None else None
        self.replica = self.coord.data(plan.ep) if self.coord else 0  # which slice of each batch
        torch.manual_seed(t.seed + (self.replica * 7919 + self.coord.pp * 104729 if self.coord else 0))
        self.task = build_task(task_name(cfg), data, cfg.model.block_size, t.batch_size, t.seed)
        if hasattr(self.task, "configure"):  # a task that reads settings beyond its batches (label smoothing)
            self.task.configure(cfg)
        _check_classes(cfg, self.task)
        spec = spec_of(cfg.model)
        model = prepare_for_finetuning(build_model(cfg.model), t)  # LoRA adapters, frozen parameters
        self.model: ParallelModel = parallelize(
            model.to(param_dtype(t.precision)), plan, mesh, spec=spec, loss_fn=self.task.loss,
            device=self.device, seed=t.seed, mixed_precision=compute_dtype(t.precision),
            compile=t.compile_backend if t.compile else None)
        self.step = TrainingStep(self.model, self.task, plan, t, self.replica, self.device)
        self.interval = Interval()
        self.start_step = self._resume() if resume else 0
        if self.start_step == 0 and starts_from_hf(cfg):  # the model directory's weights, each rank its shards
            load_hf_weights(self.model.modules, cfg.model, t.init_from)
        elif t.init_from and self.start_step == 0:  # a resumed run continues its own weights
            init_from_run(t.init_from, self.model.modules, class_heads=spec.class_heads)
        self.flops_per_token = flops_per_token(cfg.model, cfg.model.block_size)
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", truncate_after_step=self.start_step) \
            if run_dir is not None and self.process.is_coordinator else None
        self.tensorboard = TensorBoardWriter(run_dir / "tensorboard", purge_after_step=self.start_step) \
            if run_dir is not None and self.process.is_coordinator and t.tensorboard else None
        mode = t.progress if self.process.is_coordinator else "none"
        self.progress_mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.step.optimizers

    @property
    def scaler(self):
        return self.step.scaler

    def _peak_flops(self) -> float:
        """The device's peak (measured once on a CPU, by the coordinator, then read from its cache)."""
        if not self.process.is_coordinator:
            barrier()
        peak = peak_flops(self.device, self.cfg.train.precision)
        if self.process.is_coordinator:
            barrier()
        return peak

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns this rank's part of the step's mean loss (see
        :meth:`mean_over_replicas`) and the global gradient norm before clipping. The step's MoE
        statistics join the interval's."""
        result = self.step(step)
        self._last_tokens = result.tokens
        if result.moe is not None:
            self.interval.moe = result.moe if self.interval.moe is None else self.interval.moe + result.moe
        return result.loss, result.grad_norm

    @staticmethod
    def mean_over_replicas(parts: torch.Tensor) -> torch.Tensor:
        return mean_over_replicas(parts)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> dict:
        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.start_step, unit="step", **bar_width(sys.stderr)) \
            if self.progress_mode == "bar" else None
        last_eval, started, done = {}, time.perf_counter(), self.start_step
        self.model.train()
        # the bar is closed however the loop ends, so that an error's line starts a line of its own
        agreement = StopAgreement(self.process.world_size)  # no collective in the step's path
        with bar if bar is not None else contextlib.nullcontext(), StopRequest() as stop:
            for step in range(self.start_step, t.steps):
                self._timed_step(step)
                done = step + 1
                record = self._log_record(done, started) if done % t.log_every == 0 or done == t.steps else None
                if done % t.eval_every == 0 or done == t.steps:
                    last_eval = self.evaluate()
                    record = {**(record or {"step": done}), **last_eval}
                if record is not None and self.metrics is not None:
                    self.metrics.write(record)
                    if self.tensorboard is not None:
                        self.tensorboard.write(record)
                    self._show(bar, record)
                if bar is not None:
                    bar.update(1)
                self.stop_signal = agreement.agree(stop.signum, last=done == t.steps)
                stopping = self.stop_signal != 0
                if (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps or stopping:
                    self.save(done)
                if stopping:
                    if self.process.is_coordinator:
                        log.warning("stopped at step %d; continue with: loom train --resume %s", done, self.run_dir)
                    break
        agreement.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return self._summary(last_eval, time.perf_counter() - started, done)

    def _agree(self, flag: bool) -> bool:
        """Whether any rank asked to stop: all ranks stop after the same step."""
        if self.process.world_size == 1:
            return flag
        return bool(all_reduce_sum(torch.tensor(float(flag), device=self.device)).item() > 0)

    def _timed_step(self, step: int) -> None:
        t0 = time.perf_counter()
        loss, self.interval.grad_norm = self.train_step(step)
        self.interval.units += self._last_tokens * self.plan.data_parallel  # every replica's rows
        if self.device.type == "cuda" and (step + 1) % self.cfg.train.log_every == 0:
            torch.cuda.synchronize(self.device)
        self.interval.seconds += time.perf_counter() - t0
        self.interval.steps += 1
        self.interval.losses.append(loss)

    def _log_record(self, step: int, started: float) -> dict:
        iv, t = self.interval, self.cfg.train
        tokens_per_s = iv.units / max(iv.seconds, 1e-9)
        loss = self.mean_over_replicas(torch.stack(iv.losses)).mean().item()
        if not math.isfinite(loss) and not self.scaler.enabled:
            raise RunError(f"training diverged: the loss is {loss} at step {step}; lower train.lr "
                           f"(now {t.lr:g}) or set train.grad_clip, and {self._last_finite()}")
        achieved = self.flops_per_token * tokens_per_s / self.process.world_size  # FLOP/s per device
        if achieved > self.peak and self.device.type == "cpu":  # the measured peak was low (a busy machine)
            self.peak = achieved
            if self.process.is_coordinator:
                raise_cpu_peak(t.precision, achieved)
        record = {
            "step": step,
            "loss": loss,
            "lr": lr_at(step - 1, t),
            "grad_norm": iv.grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "mfu": achieved / self.peak,
            "elapsed_s": time.perf_counter() - started,
            "mem_peak_mb": self._peak_memory_mb(),
        }
        if self.process.world_size > 1:
            record["layout"] = self.plan.describe()
        if iv.moe is not None:
            record["moe"] = moe_records(self.model.moe_names, all_reduce_sum(iv.moe))
        if self.scaler.enabled:
            record["loss_scale"] = self.scaler.loss_scale
            record["skipped_steps"] = self.scaler.skipped_steps
        iv.reset()
        return record

    def _peak_memory_mb(self) -> list[float]:
        """Peak memory of every rank in MiB: allocated device memory on a GPU, the process's
        resident set on a CPU."""
        if self.device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        every = torch.zeros(self.process.world_size, device=self.device)
        every[self.process.rank] = mine
        return [round(v, 1) for v in all_reduce_sum(every).tolist()]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The task's metrics over the first ``eval_batches`` batches of the validation split, each
        replica scoring its rows of every batch, weighted by the task's units (tokens)."""
        t = self.cfg.train
        self.model.train(False)
        parts = torch.zeros(2, device=self.device, dtype=torch.float64)  # (Σ loss × units, units) where known
        replicas = self.plan.data_parallel
        split = replicas * (self.plan.microbatches if self.plan.pp > 1 else 1)
        for batch in self.task.eval_batches(t.eval_batches):
            rows = next(iter(batch.values())).size(0)
            n = rows - rows % split  # every replica needs whole (micro-)batches
            if n == 0:
                continue
            per = n // replicas
            mine = to_device(slice_rows(batch, slice(self.replica * per, (self.replica + 1) * per)), self.device)
            with autocast(self.device, t.precision):
                loss = self.model.loss(self.task.inputs(mine), self.task.targets(mine))
            if loss is not None:
                units = torch.tensor(float(self.task.units(mine)), device=self.device, dtype=torch.float64)
                parts += torch.stack([loss.double() * units, units])
        self.model.train(True)
        # every rank of a replica's last stage knows its loss: its tp ranks hold the same numbers
        loss_sum, units = (all_reduce_sum(parts) / self.plan.tp).tolist()
        return self.task.metrics(loss_sum, round(units))

    # -- checkpoints ---------------------------------------------------------------------

    def save(self, step: int) -> Path | None:
        """Checkpoint the state after ``step`` steps: never from non-finite weights or optimizer
        state (every rank checks its share; all agree), so every checkpoint is one to go back to."""
        if self.run_dir is None:
            return None
        bad = nonfinite_state(self.model.modules, self.optimizers)
        if self._agree(bool(bad)):
            where = ", ".join(bad[:3]) or "another rank's share of the weights or optimizer state"
            raise RunError(f"training diverged: non-finite values at step {step} in {where}; "
                           f"no checkpoint written; lower train.lr (now {self.cfg.train.lr:g}) or set "
                           f"train.grad_clip, and {self._last_finite()}")
        state = {
            "step": step,
            "scaler": self.scaler.state_dict(),
            # losses of steps not yet logged, so the first record after a resume averages the same steps
            "pending_losses": (self.mean_over_replicas(torch.stack(self.interval.losses)).cpu()
                               if self.interval.losses else torch.zeros(0)),
            # and the MoE statistics of those steps, summed over ranks
            "pending_moe": (all_reduce_sum(self.interval.moe.clone()).cpu() if self.interval.moe is not None
                            else torch.zeros(0)),
        }
        return save_checkpoint(self.run_dir, step, self.model.modules, self.optimizers, state,
                               self.cfg.train.keep_checkpoints, rng=self._rng_state())

    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _last_finite(self) -> str:
        """Where to go back to: every checkpoint written was checked finite before its save."""
        last = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        return f"resume from the last finite checkpoint, {last}" if last else "start again (no checkpoint was saved)"

    def _resume(self) -> int:
        if self.run_dir is None:
            return 0
        if self.process.is_coordinator:
            clear_partial_saves(self.run_dir)
        barrier()
        found = load_newest(self.run_dir, self.model.modules, self.optimizers, rng_keys=self._rng_state().keys())
        if found is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.run_dir)
            return 0
        ckpt, state, rng = found
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            log.info("the checkpoint was saved under another layout: random state (dropout) starts afresh")
        self.scaler.load_state_dict(state["scaler"])
        pending = state.get("pending_losses", torch.zeros(0)).to(self.device)
        # as (sum, count) pairs from every rank, which mean_over_replicas turns back into the same values
        self.interval.losses = [torch.stack([v, torch.ones((), device=self.device, dtype=v.dtype)]) for v in pending]
        moe = state.get("pending_moe", torch.zeros(0)).to(self.device)
        if moe.numel():  # the coordinator holds the sum; the others add nothing
            self.interval.moe = moe if self.process.is_coordinator else torch.zeros_like(moe)
        log.info("resumed from %s (step %d)", ckpt, checkpoint_step(ckpt))
        return int(state["step"])

    # -- what the user sees --------------------------------------------------------------

    def _show(self, bar, record: dict) -> None:
        line = ("step %d/%d | %s", record["step"], self.cfg.train.steps, _fmt(record))
        if self.progress_mode == "log":
            log.info(*line)
        else:  # train.log holds the step lines whatever the terminal shows
            steps_log.info(*line)
            if self.progress_mode == "bar":
                bar.set_postfix_str(_fmt(record), refresh=False)

    def _summary(self, last_eval: dict, seconds: float, done: int) -> dict:
        summary = {
            "steps": done,
            "finished": done >= self.cfg.train.steps,
            "params": count_params(build_model(self.cfg.model)),
            "unigram_entropy_nats": self.data.meta.get("unigram_entropy_nats"),
            "train_seconds": seconds,
            "skipped_steps": self.scaler.skipped_steps,
            **last_eval,
        }
        if getattr(self, "stop_signal", 0):
            summary["stopped_by"] = signal.Signals(self.stop_signal).name  # the exit code is 128 + its number
        if self.process.world_size > 1:
            summary["layout"] = self.plan.describe()
        if self.run_dir is not None and self.process.is_coordinator:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def _check_classes(cfg: Config, task) -> None:
    """A task with labels sizes the model's classifier: ``model.n_classes=0`` takes the data's count."""
    n = getattr(task, "n_classes", None)
    if n is not None and cfg.model.n_classes == 0:
        cfg.model.n_classes = n
    elif n is not None and cfg.model.n_classes != n:
        raise ConfigError(f"model.n_classes={cfg.model.n_classes} but the data holds {n} labels; "
                          f"set model.n_classes={n} (or 0: the data's count)")
    elif n is None and cfg.model.n_classes:
        raise ConfigError(f"model.n_classes={cfg.model.n_classes} gives a classifier, which "
                          f"train.task={task.name} does not train; set model.n_classes=0")


def moe_records(names: tuple[str, ...], stats: torch.Tensor) -> list[dict]:
    """Per MoE layer, from statistics summed over steps and ranks (:data:`loom.models.common.moe.STAT_FIELDS`):
    the auxiliary and z-losses (mean over sequences), the fraction of routed (token, expert)
    assignments dropped for capacity, and expert load: each expert's share of the routed assignments
    and max/mean over experts (1 is perfect balance)."""
    records = []
    n_fields = len(STAT_FIELDS)
    for name, row in zip(names, stats.tolist()):
        load, (assigned, dropped, aux, z, groups) = row[:-n_fields], row[-n_fields:]
        mean = sum(load) / len(load)
        records.append({"layer": name, "aux_loss": aux / max(groups, 1), "z_loss": z / max(groups, 1),
                        "dropped": dropped / max(assigned, 1), "load_max_mean": max(load) / mean if mean else 0.0,
                        "load": [v / max(assigned, 1) for v in load]})
    return records


BAR_FALLBACK_COLUMNS = 100


def bar_width(stream) -> dict:
    """tqdm's size settings for a bar on ``stream``: the terminal's own, followed as it changes, where
    the terminal reports a size; a fixed width (``COLUMNS`` or 100) and height where it reports none
    or 0 (some consoles, a scheduler's pseudo-terminal). There tqdm would draw a bar of width 0, and a
    height of 0 makes it draw nothing at all."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    env = os.environ.get("COLUMNS", "")
    return {"ncols": int(env) if env.isdigit() and int(env) > 0 else BAR_FALLBACK_COLUMNS, "nrows": 20}


def _fmt(r: dict) -> str:
    parts = []
    if "loss" in r:
        parts += [f"loss {r['loss']:.3f}", f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s",
                  f"mfu {100 * r['mfu']:.1f}%"]
    if "moe" in r:
        parts.append(f"moe load max/mean {max(m['load_max_mean'] for m in r['moe']):.2f}, "
                     f"dropped {100 * max(m['dropped'] for m in r['moe']):.1f}%")
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.3f}")
    return " | ".join(parts)
