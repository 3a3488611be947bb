"""The training loop on one device: config → data → build on meta → initialize or resume → train.

Every source of randomness is a function of the seed and the step (the data sampler, the schedule)
or is saved in the checkpoint (the RNG state, the optimizer moments, the loss scale, the losses not
yet logged), so a resumed run repeats the losses of an uninterrupted one exactly (on a CPU; CUDA
kernels such as attention's backward are not bitwise deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
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
from loom.data import BatchSampler, PreparedData, eval_batches
from loom.data.corpus import corpus_files
from loom.models import build_model, count_params, flops_per_token
from loom.models.moe import STAT_FIELDS
from loom.parallel.launch import Process, barrier, broadcast_object, init_process
from loom.parallel.mesh import all_reduce_sum, build_mesh, coordinates
from loom.parallel.parallelize import ParallelModel, parallelize
from loom.parallel.plan import check_plan, plan_from_config
from loom.runs import RunError, new_run_dir, prepare_run_data, read_json, resolve_device, write_text_atomic
from loom.train.checkpoint import (
    checkpoint_step,
    clear_partial_saves,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from loom.train.evaluate import val_record
from loom.train.memory import check_training_state_fits
from loom.train.metrics import MetricsFile, peak_flops
from loom.train.optim import build_optimizer, lr_at
from loom.train.precision import LossScaler, param_dtype

log = logging.getLogger("loom.train")


@dataclass
class Interval:
    """What happened since the last log line."""

    steps: int = 0
    seconds: float = 0.0
    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None  # of the last step
    moe: torch.Tensor | None = None  # this rank's MoE statistics, summed over the steps

    def reset(self) -> None:
        self.steps, self.seconds, self.losses, self.grad_norm, self.moe = 0, 0.0, [], None, None


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
    """One process's part of a training job: its share of the model under the plan, its slice of
    every batch, and (on the coordinator, rank 0) the files and the progress the user sees.

    ``run_dir=None`` trains in memory (no checkpoints, metrics or summary)."""

    def __init__(self, cfg: Config, run_dir: Path | None, data: PreparedData, resume: bool = False,
                 process: Process | None = None, device: torch.device | None = None):
        self.cfg, self.run_dir, self.data = cfg, run_dir, data
        t = cfg.train
        self.process = process or Process()
        self.device = device or resolve_device(t.device)
        if self.device.type == "cuda" and t.precision == "fp32":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls, the fp32 peak in the MFU table
        self.plan = plan_from_config(cfg.parallel)
        self.peak = self._peak_flops()
        mesh = build_mesh(self.plan, self.device.type) if self.process.world_size > 1 else None
        self.coord = coordinates(mesh) if mesh is not None else None
        self.replica = self.coord.data(self.plan.ep) if self.coord else 0  # which slice of each batch
        torch.manual_seed(t.seed + (self.replica * 7919 + self.coord.pp * 104729 if self.coord else 0))
        self.model: ParallelModel = parallelize(build_model(cfg.model).to(param_dtype(t.precision)), self.plan,
                                                mesh, self.device, t.precision, t.seed)
        self.optimizers = self._build_optimizers()
        self.scaler = LossScaler(self.device, t.precision)
        self.sampler = BatchSampler(data.train, cfg.model.block_size, t.batch_size, t.seed)
        self.interval = Interval()
        self.start_step = self._resume() if resume else 0
        self.flops_per_token = flops_per_token(cfg.model, cfg.model.block_size)
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", truncate_after_step=self.start_step) \
            if run_dir is not None and self.process.is_coordinator else None
        mode = t.progress if self.process.is_coordinator else "none"
        self.progress_mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode

    def _build_optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimizer per model part; a parameter two parts share (the tied embedding of a
        pipeline rank holding the first and the last stage) is updated by the first part's only."""
        seen: set[int] = set()
        optimizers = []
        for m in self.model.modules:
            own = [p for p in m.parameters() if id(p) not in seen]
            seen.update(id(p) for p in own)
            optimizers.append(build_optimizer(m, self.cfg.train, own))
        return optimizers

    def _peak_flops(self) -> float:
        """The device's peak (measured once on a CPU, by the coordinator, then read from its cache)."""
        if not self.process.is_coordinator:
            barrier()
        peak = peak_flops(self.device, self.cfg.train.precision)
        if self.process.is_coordinator:
            barrier()
        return peak

    # -- one optimizer step --------------------------------------------------------------

    def rows(self, micro_step: int) -> slice:
        """This replica's rows of the global batch in accumulation micro-step ``micro_step``."""
        t = self.cfg.train
        micro = t.batch_size // t.grad_accum
        per_replica = micro // self.plan.data_parallel
        first = micro_step * micro + self.replica * per_replica
        return slice(first, first + per_replica)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over ``grad_accum`` micro-batches, then one optimizer step.
        Returns this rank's part of the step's mean loss (see :meth:`mean_over_replicas`) and the
        global gradient norm before clipping."""
        t = self.cfg.train
        lr = lr_at(step, t)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        # (loss sum, 1 where this rank knows the loss), in float64 whatever the precision: a reduction
        # that must not round differently under different layouts
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for i in range(t.grad_accum):
            x, y = self.sampler.batch(step, rows=self.rows(i))
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = self.model.forward_backward(x, y, lambda v: self.scaler.scale(v / t.grad_accum),
                                               last_micro_step=i == t.grad_accum - 1)
            if loss is not None:
                total += torch.stack([loss.double(), torch.ones((), device=self.device, dtype=torch.float64)]) \
                    / t.grad_accum
        self.model.after_backward()
        moe = self.model.take_moe_stats()
        if moe is not None:
            self.interval.moe = moe if self.interval.moe is None else self.interval.moe + moe
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        grad_norm = self.model.clip_grads_(t.grad_clip if t.grad_clip > 0 else math.inf)
        self.scaler.step(self.optimizers, grad_norm, step)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return total, grad_norm

    def mean_over_replicas(self, parts: torch.Tensor) -> torch.Tensor:
        """Losses as (..., 2) pairs (sum, count) from :meth:`train_step` -> the mean over the ranks
        that know them (every replica's last pipeline stage): the global batch's mean loss."""
        parts = all_reduce_sum(parts.clone())
        return parts[..., 0] / parts[..., 1]

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
                    last_eval = self.evaluate()
                    record = {**(record or {"step": done}), **last_eval}
                if record is not None and self.metrics is not None:
                    self.metrics.write(record)
                    self._show(bar, record)
                if bar is not None:
                    bar.update(1)
                stopping = self._agree(stop.requested)
                if (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps or stopping:
                    self.save(done)
                if stopping:
                    if self.process.is_coordinator:
                        log.warning("stopped at step %d; continue with: loom train --resume %s", done, self.run_dir)
                    break
        if bar is not None:
            bar.close()
        if self.metrics is not None:
            self.metrics.close()
        return self._summary(last_eval, time.perf_counter() - started, done)

    def _agree(self, flag: bool) -> bool:
        """Whether any rank asked to stop: all ranks stop after the same step."""
        if self.process.world_size == 1:
            return flag
        return bool(all_reduce_sum(torch.tensor(float(flag), device=self.device)).item() > 0)

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
        loss = self.mean_over_replicas(torch.stack(iv.losses)).mean().item()
        if not math.isfinite(loss) and not self.scaler.enabled:
            raise RunError(f"training diverged: the loss is {loss} at step {step}; lower train.lr "
                           f"(now {t.lr:g}) or set train.grad_clip, and resume from the last checkpoint")
        record = {
            "step": step,
            "loss": loss,
            "lr": lr_at(step - 1, t),
            "grad_norm": iv.grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak * self.process.world_size),
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
        """Token-weighted mean loss over the first ``eval_batches`` batches of the validation
        split; each replica scores its rows of every batch."""
        t = self.cfg.train
        self.model.train(False)
        # (sum of losses × tokens, tokens) on ranks that know, in float64 as in train_step
        parts = torch.zeros(2, device=self.device, dtype=torch.float64)
        replicas = self.plan.data_parallel
        split = replicas * (self.plan.microbatches if self.plan.pp > 1 else 1)
        for x, y in eval_batches(self.data.val, self.cfg.model.block_size, t.batch_size, t.eval_batches):
            n = x.size(0) - x.size(0) % split  # every replica needs whole (micro-)batches
            if n == 0:
                continue
            per = n // replicas
            first = self.replica * per
            xs, ys = x[first:first + per].to(self.device), y[first:first + per].to(self.device)
            loss = self.model.loss(xs, ys)
            if loss is not None:
                parts += torch.stack([loss.double() * ys.numel(),
                                      torch.tensor(float(ys.numel()), device=self.device, dtype=torch.float64)])
        self.model.train(True)
        # every rank of a replica's last stage knows its loss: its tp ranks hold the same numbers
        loss_sum, tokens = (all_reduce_sum(parts) / self.plan.tp).tolist()
        return val_record(loss_sum, round(tokens))

    # -- checkpoints ---------------------------------------------------------------------

    def save(self, step: int) -> Path | None:
        if self.run_dir is None:
            return None
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

    def _resume(self) -> int:
        if self.run_dir is None:
            return 0
        if self.process.is_coordinator:
            clear_partial_saves(self.run_dir)
        barrier()
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.run_dir)
            return 0
        state, rng = load_checkpoint(ckpt, self.model.modules, self.optimizers, rng_keys=self._rng_state().keys())
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
        if self.progress_mode == "bar":
            bar.set_postfix_str(_fmt(record), refresh=False)
        elif self.progress_mode == "log":
            log.info("step %d/%d | %s", record["step"], self.cfg.train.steps, _fmt(record))

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
        if self.process.world_size > 1:
            summary["layout"] = self.plan.describe()
        if self.run_dir is not None and self.process.is_coordinator:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def moe_records(names: tuple[str, ...], stats: torch.Tensor) -> list[dict]:
    """Per MoE layer, from statistics summed over steps and ranks (:data:`loom.models.moe.STAT_FIELDS`):
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


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> dict:
    """Train ``cfg`` in ``run_dir`` (continuing its newest checkpoint when ``resume``).

    Every process of a job calls this with the same config; the coordinator (rank 0) makes the
    run directory and prepares the data first, the others follow."""
    process, device = init_process(cfg.train.device)  # fail before any work if the device is not there
    if not process.is_coordinator:
        logging.getLogger("loom").setLevel(logging.ERROR)  # one voice: rank 0's
    cfg = resolve_data_parallel(cfg, process.world_size)
    plan = plan_from_config(cfg.parallel)
    check_plan(plan, cfg, process.world_size)
    check_training_state_fits(cfg, device, plan, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    corpus_files(cfg.data.path)  # a wrong data.path fails before a run directory is made
    run_dir = Path(_on_coordinator(process, _make_run_dir, cfg, run_dir, resume))
    with _log_to_file(run_dir / "train.log") if process.is_coordinator else contextlib.nullcontext():
        tok_dir = run_dir / "tokenizer" if resume else None
        data = _on_coordinator(process, prepare_run_data, cfg, tok_dir, share=False)
        if not process.is_coordinator:
            data = prepare_run_data(cfg, tok_dir)  # the coordinator has filled the cache
        check_data_fits(cfg, data)
        trainer = Trainer(cfg, run_dir, data, resume=resume, process=process, device=device)
        if process.is_coordinator:
            _write_run_files(cfg, run_dir, data, with_tokenizer=not resume)  # only once the checkpoint loaded
        if trainer.start_step >= cfg.train.steps:
            log.info("%s is already trained to step %d of train.steps=%d; to go further, resume with "
                     "train.steps=N", run_dir, trainer.start_step, cfg.train.steps)
            return read_json(run_dir / "summary.json")
        log.info("run %s: %s, %.2fM parameters, %d steps of %d tokens, %s on %s%s", run_dir, cfg.model.preset,
                 count_params(build_model(cfg.model)) / 1e6, cfg.train.steps,
                 cfg.train.batch_size * cfg.model.block_size, cfg.train.precision, device,
                 f", {process.world_size} processes: {plan.describe()}" if process.world_size > 1 else "")
        summary = trainer.run()
        if summary["finished"]:
            log.info("done: val loss %.3f (perplexity %.1f) against a unigram entropy of %.3f nats; %s",
                     summary["val_loss"], summary["val_ppl"], summary["unigram_entropy_nats"] or math.nan, run_dir)
        if process.is_coordinator:
            _plot(run_dir)
        barrier()
        return summary


def resolve_data_parallel(cfg: Config, world_size: int) -> Config:
    """Defaults that depend on the number of processes: ``parallel.dp`` left at 1 takes the
    processes that tensor, pipeline and expert parallelism leave, ``world_size / (tp × pp × ep)`` (when that
    divides; otherwise the plan check says what is wrong), and a pipeline left at one micro-batch
    gets one per stage (when the batch splits so), since a single micro-batch leaves every stage
    but one idle. With ``parallel.auto=true`` the planner chooses the whole layout."""
    if cfg.parallel.auto:  # the planner's fastest layout for this machine
        from loom.planner.cli import auto_config
        from loom.runs import resolve_device

        cfg = auto_config(cfg, world_size, resolve_device(cfg.train.device).type)
    p = cfg.parallel
    others = p.tp * p.pp * p.ep
    if p.dp == 1 and world_size > 1 and world_size % others == 0:
        p = dataclasses.replace(p, dp=world_size // others)
    per_replica = cfg.train.batch_size // cfg.train.grad_accum // (p.dp * p.ep)
    if p.pp > 1 and p.microbatches == 1 and per_replica % p.pp == 0:
        p = dataclasses.replace(p, microbatches=p.pp)
    return dataclasses.replace(cfg, parallel=p)


def _make_run_dir(cfg: Config, run_dir: Path | None, resume: bool) -> str:
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise RunError(f"{str(run_dir)!r} already holds a run with checkpoints; continue it with "
                       f"`loom train --resume {run_dir}` or choose another train.run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return str(run_dir)


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
