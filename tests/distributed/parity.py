"""Train a tiny model for a few steps under a layout and report what a parity test compares:
the global mean loss of every step and every parameter's full value at the end.

``train_layouts`` runs on every rank of a gloo job (through ``harness.run_on_ranks``) and trains
each layout in turn; ``train_single`` is the one-process reference, run in the test process.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from loom.config import load_config
from loom.parallel.launch import Process
from loom.parallel.mesh import all_reduce_sum
from loom.train.loop import Trainer

STEPS = 5

MODELS = {
    # every pipeline layout below splits these into at least pp × virtual_stages = 4 stages
    "gpt": ["model=gpt-tiny", "model.n_layer=4"],
    "pangu": ["model=pangu-tiny", "model.n_layer=5"],
    # sparse: an MoE layer in every block (switch) / every other block (top-2 without random routing)
    "switch": ["model=switch-tiny", "model.n_layer=4"],
    "glam": ["model=glam-tiny", "model.moe.random_routing=false"],
}
COMMON = ["model.block_size=32", "train.batch_size=8", "train.warmup_steps=2", "train.steps=10",
          "train.progress=none", "train.device=cpu", "train.grad_clip=0.5", "train.lr=1e-3"]


def tiny_data(vocab: int = 512, n: int = 20_000, seed: int = 0) -> SimpleNamespace:
    """Tokens from a noisy rule (the next id is 5·id+3 mod vocab nine times in ten), so that a few
    steps visibly lower the loss; no corpus or tokenizer is needed."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(n + n // 4, dtype=np.int64)
    tokens[0] = 1
    noise = rng.integers(0, vocab, len(tokens))
    keep = rng.random(len(tokens)) < 0.9
    for i in range(1, len(tokens)):
        tokens[i] = (5 * tokens[i - 1] + 3) % vocab if keep[i] else noise[i]
    tokens = tokens.astype(np.uint16)
    return SimpleNamespace(train=tokens[:n], val=tokens[n:], meta={})


def config(model: str, layout: list[str]):
    return load_config(None, [*MODELS[model], *COMMON, *layout])


def full_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter this rank holds, whole (DTensors gathered), on the CPU."""
    out = {}
    for name, p in trainer.model.named_parameters():
        p = p.detach()
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).cpu().clone()
    return out


def _train(model: str, layout: list[str], process: Process, steps: int = STEPS) -> dict:
    trainer = Trainer(config(model, layout), None, tiny_data(), process=process, device=torch.device("cpu"))
    losses, moe = [], []
    for step in range(steps):
        parts, _ = trainer.train_step(step)
        losses.append(trainer.mean_over_replicas(parts).item())
        if trainer.interval.moe is not None:  # this step's MoE statistics, summed over ranks
            moe.append(all_reduce_sum(trainer.interval.moe).cpu())
            trainer.interval.moe = None
    val = trainer.evaluate()["val_loss"] if model in ("gpt", "switch") else None
    return {"losses": losses, "params": full_parameters(trainer), "val_loss": val, "moe": moe}


def train_single(model: str, layout: list[str] | None = None, steps: int = STEPS) -> dict:
    return _train(model, layout or [], Process(), steps)


def train_layouts(cases: list[tuple[str, list[str]]]) -> dict:
    """On every rank: ``{(model, layout...): result}`` for each case."""
    import torch.distributed as dist

    process = Process(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    return {(model, *layout): _train(model, layout, process) for model, layout in cases}


def merge_ranks(results: list[dict], key) -> dict:
    """One case's result with the parameters of all ranks (pipeline stages) merged."""
    params: dict[str, torch.Tensor] = {}
    for r in results:
        params.update(r[key]["params"])
    return {**results[0][key], "params": params}


def _process() -> Process:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Process(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    return Process()


def train_and_save(model: str, layout: list[str], run_dir: str, steps: int) -> list[float]:
    """Train ``steps`` steps under ``layout`` and save a checkpoint in ``run_dir``."""
    from pathlib import Path

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config(model, layout), Path(run_dir), tiny_data(), process=_process(),
                      device=torch.device("cpu"))
    losses = [trainer.mean_over_replicas(trainer.train_step(s)[0]).item() for s in range(steps)]
    trainer.save(steps)
    trainer.metrics.close() if trainer.metrics else None
    return losses


def resume_and_train(model: str, layout: list[str], run_dir: str, steps: int) -> list[float]:
    """Resume ``run_dir``'s newest checkpoint under ``layout`` and train up to ``steps`` steps."""
    from pathlib import Path

    trainer = Trainer(config(model, layout), Path(run_dir), tiny_data(), resume=True, process=_process(),
                      device=torch.device("cpu"))
    losses = [trainer.mean_over_replicas(trainer.train_step(s)[0]).item() for s in range(trainer.start_step, steps)]
    trainer.metrics.close() if trainer.metrics else None
    return losses
