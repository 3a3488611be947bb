"""The run directory: what a training run leaves behind, and how to open it again.

    RUN_DIR/
      config.yaml        the resolved configuration (every field, after presets and overrides)
      data.json          the corpus: source, token counts, unigram entropy, tokenizer kind
      tokenizer/         the tokenizer, so the run needs nothing else to generate text
      metrics.jsonl      one JSON object per logged step
      train.log          what the run printed
      checkpoints/       step_NNNNNNN/ directories in torch.distributed.checkpoint format
      summary.json       final validation loss, throughput, timings
      loss.png           the loss curve (``loom plot``)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from loom.config import Config, ConfigError, load_config
from loom.data import Tokenizer, load_tokenizer
from loom.models import GPT, build_model, materialize
from loom.train.checkpoint import latest_checkpoint, load_checkpoint


class RunError(ValueError):
    """A run directory that cannot be used; the message is one line meant for the user."""


def new_run_dir(cfg: Config) -> Path:
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.preset}"


def check_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{str(run_dir)!r} is not a loom run directory (no config.yaml in it)")
    return run_dir


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    return load_config(check_run_dir(run_dir) / "config.yaml", overrides)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def load_for_inference(run_dir: Path, device: str = "auto") -> tuple[Config, GPT, Tokenizer, int]:
    """The run's model with its newest checkpoint's weights, in eval mode, and its tokenizer."""
    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        raise RunError(f"{str(run_dir)!r} has no complete checkpoint yet (checkpoints/step_*)")
    dev = resolve_device(device)
    model = materialize(build_model(cfg.model), dev, cfg.train.seed)
    load_checkpoint(ckpt, model)
    model.eval()
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer")
    step = int(ckpt.name.split("_")[1])
    return cfg, model, tokenizer, step


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
