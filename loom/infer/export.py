"""``loom export``: a trained run's weights as one layout-free safetensors file."""

from __future__ import annotations

import os
from pathlib import Path

from loom.config import config_to_yaml
from loom.infer.load import load_for_inference
from loom.models import spec_of


def export_safetensors(run_dir: Path, out: Path | None = None) -> Path:
    """The newest checkpoint's weights, whatever layout trained them, as one safetensors file. A tied
    parameter is stored once (under the name of its source, e.g. the input embedding); the run's
    config, the step and the ties travel in the file's metadata."""
    from safetensors.torch import save_file

    cfg, model, _, step = load_for_inference(run_dir, device="cpu")
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}  # tied: once
    out = out or Path(run_dir) / "model.safetensors"
    ties = ",".join(f"{a}={b}" for a, b in spec_of(cfg.model).pipeline_split(cfg.model).tied)
    meta = {"format": "loom", "step": str(step), "config": config_to_yaml(cfg), "tied": ties}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out
