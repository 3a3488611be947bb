"""``loom predict``: the label a classification run gives a text, or an image classification run an image.

The input goes through what the run's task does to its training data (the run's tokenizer and
``[CLS] text [SEP]`` rows; an image resized to the model's size and scaled to [0, 1]); the answer is
the softmax over the classifier's logits, its ``top_k`` labels with their probabilities. The label
names are the run's ``labels.json`` (written by ``loom train``; ``loom import`` writes the model
directory's ``id2label``); a run without one gets them from its data, as ``loom eval`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loom.config import Config, task_name
from loom.errors import ConfigError, RunError
from loom.infer.load import load_for_inference
from loom.tasks import TASKS, Batch, build_task, to_device
from loom.train.precision import autocast
from loom.train.rundir import LABELS_FILE, load_run_config, prepare_run_data

# what each task reads, as the flag that gives it
INPUT = {"classification": "--text", "image_classification": "--image"}


def check_predictable(run_dir: Path, text: str | None, image: str | None, top_k: int) -> Config:
    """The run's config, once the run is one that classifies what it is given; else one line."""
    if (text is None) == (image is None):
        raise ConfigError("loom predict needs one input: --text \"...\" (a classification run) or --image PATH "
                          "(an image classification run)")
    if top_k < 1:
        raise ConfigError(f"--top-k={top_k} must be >= 1")
    cfg = load_run_config(run_dir)
    task = task_name(cfg)
    if task not in INPUT:
        hint = "loom generate" if task in ("causal_lm", "sft") else "loom eval"
        raise ConfigError(f"{run_dir} is a train.task={task} run; loom predict classifies with a classification "
                          f"(--text) or image_classification (--image) run (for this one: {hint} {run_dir})")
    given = "--text" if text is not None else "--image"
    if INPUT[task] != given:
        what = "texts" if task == "classification" else "images"
        raise ConfigError(f"{run_dir} classifies {what} (train.task={task}); give {INPUT[task]}, not {given}")
    if image is not None and not Path(image).expanduser().is_file():
        raise ConfigError(f"--image {image}: no such file")
    return cfg


def predict(run_dir: Path, text: str | None = None, image: str | None = None, top_k: int = 1,
            device: str = "auto") -> dict:
    """``{"label", "probability", "top": [{"label", "probability"}, ...]}`` for the one input given."""
    run_dir = Path(run_dir)
    check_predictable(run_dir, text, image, top_k)
    cfg, model, tok, step = load_for_inference(run_dir, device)
    task = TASKS[task_name(cfg)]
    if text is not None:
        batch = task.text_batch(tok, [text], cfg.model.block_size)
    else:
        batch = task.image_batch([Path(image).expanduser()], cfg.model.image_size, cfg.model.channels)
    probs = _probabilities(cfg, model, task, batch)
    names = label_names(cfg, run_dir, len(probs))
    p, k = probs.topk(min(top_k, len(probs)))
    top = [{"label": names[i], "probability": float(q)} for q, i in zip(p.tolist(), k.tolist())]
    return {**top[0], "top": top, "step": step}


@torch.no_grad()
def _probabilities(cfg: Config, model, task, batch: Batch) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    with autocast(device, cfg.train.precision):
        logits = model(*task.inputs(batch))
    return torch.softmax(logits.float(), dim=-1)[0].cpu()  # (n_classes,)


def label_names(cfg: Config, run_dir: Path, n: int) -> list[str]:
    """The run's label names, class index order."""
    path = run_dir / LABELS_FILE
    if path.is_file():
        names = [str(x) for x in json.loads(path.read_text())]
    else:  # a run from before labels.json: its task numbers the labels of its data
        data = prepare_run_data(cfg, run_dir / "tokenizer" if (run_dir / "tokenizer").is_dir() else None)
        names = build_task(task_name(cfg), data, cfg.model.block_size, 1, cfg.train.seed).label_names
    if len(names) != n:
        raise RunError(f"{run_dir}: the classifier has {n} classes but {len(names)} label names")
    return names
