"""Opening a trained run for inference: its model, in eval mode, with the newest checkpoint's weights."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from loom.config import Config
from loom.data import Tokenizer, load_tokenizer
from loom.errors import RunError
from loom.models import build_model, materialize
from loom.parallel.launch import resolve_device
from loom.train.checkpoint import checkpoint_step, load_newest
from loom.train.finetune import adapt
from loom.train.precision import param_dtype
from loom.train.rundir import load_run_config


def load_for_inference(run_dir: Path, device: str = "auto") -> tuple[Config, nn.Module, Tokenizer | None, int]:
    """The run's model with its newest checkpoint's weights (whatever layout saved it), in eval mode,
    its tokenizer (None for a model that reads images), and the checkpoint's step. Checkpoints are
    verified as resume verifies them: one that is damaged is skipped with a warning for the newest
    intact one."""
    cfg = load_run_config(run_dir)
    dev = resolve_device(device, key="--device")
    model = adapt(build_model(cfg.model), cfg.train)  # LoRA adapters, when the run trained them
    model = materialize(model.to(param_dtype(cfg.train.precision)), dev, cfg.train.seed)
    found = load_newest(Path(run_dir), model)
    if found is None:
        raise RunError(f"{str(run_dir)!r} has no complete checkpoint yet (checkpoints/step_*)")
    ckpt = found[0]
    model.eval()
    tok_dir = Path(run_dir) / "tokenizer"
    tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() or not cfg.model.image_size else None
    return cfg, model, tokenizer, checkpoint_step(ckpt)
