"""The run directory: what a training run leaves behind, and how to open it again.

    RUN_DIR/
      config.yaml        the resolved configuration (every field, after presets and overrides)
      data.json          the corpus: source, token counts, unigram entropy, tokenizer kind
      tokenizer/         the tokenizer, so the run needs nothing else to generate text
      metrics.jsonl      one JSON object per logged step
      train.log          what the run printed
      checkpoints/       step_NNNNNNN/ directories in torch.distributed.checkpoint format
      summary.json       final validation loss, throughput, timings
      loss.png           the loss curve (``loom plot``; MoE models: also expert_load.png)
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from pathlib import Path

import torch

from loom.config import Config, ConfigError, config_to_yaml, load_config
from loom.data import PreparedData, Tokenizer, load_tokenizer, prepare_data
from loom.models import GPT, build_model, materialize
from loom.train.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
from loom.train.precision import param_dtype


class RunError(ValueError):
    """A run directory that cannot be used; the message is one line meant for the user."""


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


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    return load_config(check_run_dir(run_dir) / "config.yaml", overrides)


def load_resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's config with ``overrides``, which may change how it trains (``train.*``) but not
    what it is (``model.*``, ``data.*``): the checkpoint and the token ids depend on those."""
    saved, cfg = load_run_config(run_dir), load_run_config(run_dir, overrides)
    for section in ("model", "data"):
        old, new = vars(getattr(saved, section)), vars(getattr(cfg, section))
        for key in old:
            if old[key] != new[key]:
                raise ConfigError(f"--resume keeps the run's {section}: {section}.{key}={new[key]!r} differs "
                                  f"from the run's {old[key]!r}; start a new run to change it")
    return cfg


def prepare_run_data(cfg: Config, tokenizer_dir: Path | None = None) -> PreparedData:
    """The tokenized corpus of ``cfg.data``; with ``tokenizer_dir`` (a run's own tokenizer),
    encoded with that tokenizer rather than one trained for the cache."""
    d = cfg.data
    return prepare_data(d.path, cfg.model.vocab_size, d.tokenizer, d.val_fraction, d.cache_dir, d.jsonl_field,
                        tokenizer_dir=tokenizer_dir)

def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"{key}={name!r} is not valid; choose auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"{key}={name!r} but this machine has {count} CUDA device(s); use cpu or auto")
    return device


def load_for_inference(run_dir: Path, device: str = "auto") -> tuple[Config, GPT, Tokenizer, int]:
    """The run's model with its newest checkpoint's weights, in eval mode, and its tokenizer."""
    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        raise RunError(f"{str(run_dir)!r} has no complete checkpoint yet (checkpoints/step_*)")
    dev = resolve_device(device, key="--device")
    model = materialize(build_model(cfg.model).to(param_dtype(cfg.train.precision)), dev, cfg.train.seed)
    load_checkpoint(ckpt, model)
    model.eval()
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer")
    return cfg, model, tokenizer, checkpoint_step(ckpt)


def export_safetensors(run_dir: Path, out: Path | None = None) -> Path:
    """The newest checkpoint's weights, whatever layout trained them, as one safetensors file.
    The tied output projection is stored once (as ``tok_emb.weight``); the run's config and the
    step travel in the file's metadata."""
    from safetensors.torch import save_file

    cfg, model, _, step = load_for_inference(run_dir, device="cpu")
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}  # tied: once
    out = out or Path(run_dir) / "model.safetensors"
    meta = {"format": "loom", "step": str(step), "config": config_to_yaml(cfg),
            "tied": "lm_head.weight=tok_emb.weight"}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that a reader (or a crash) sees the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
