"""Hugging Face model directories, read and written through a family's :class:`~loom.models.spec.HFMapping`.

A directory saved by ``transformers`` (``save_pretrained``) holds ``config.json``, the weights (one
``model.safetensors``, or shards with ``model.safetensors.index.json``, or the older
``pytorch_model.bin``) and the tokenizer files. Here: which family a directory is, its config as loom's
``model.*`` settings, which rectangle of which stored tensor each (shard of a) loom parameter is, and
the other way, the stored tensors of a whole model. Reading the files is the engine's
(:mod:`loom.train.hf`), so that each rank reads only its shards; nothing here imports ``torch.distributed``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.registry import families
from loom.models.spec import HFMapping, HFSource, ModelSpec

log = logging.getLogger("loom")

CONFIG_FILE = "config.json"


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a Hugging Face model directory (a ``config.json`` with a ``model_type``)."""
    f = Path(path).expanduser() / CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return "model_type" in json.loads(f.read_text())
    except (OSError, ValueError):
        return False


def read_hf_config(path: str | Path) -> dict:
    """The ``config.json`` of the model directory ``path``."""
    f = Path(path).expanduser() / CONFIG_FILE
    if not f.is_file():
        raise ConfigError(f"{str(path)!r} is not a Hugging Face model directory (no {CONFIG_FILE} in it)")
    try:
        config = json.loads(f.read_text())
    except ValueError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{f} has no model_type; it is not a transformers model config")
    return config


def hf_family(config: dict) -> ModelSpec:
    """The family that reads ``config``'s ``model_type``."""
    for spec in families().values():
        if spec.hf is not None and config["model_type"] in spec.hf.model_types:
            return spec
    known = sorted(t for s in families().values() if s.hf is not None for t in s.hf.model_types)
    raise ConfigError(f"config.json: model_type={config['model_type']!r} has no loom model family; "
                      f"loom reads: {', '.join(known)}")


def hf_model_settings(path: str | Path) -> dict:
    """``model.*`` settings (for :func:`loom.config.load_config`) of the model directory ``path``."""
    config = read_hf_config(path)
    spec = hf_family(config)
    try:
        model = spec.hf.config_from_hf(config)
    except KeyError as e:
        raise ConfigError(f"config.json of {str(path)!r} lacks {e.args[0]!r}, which a {config['model_type']} "
                          "config needs") from None
    shape = ("n_layer", "n_head", "n_embd", "vocab_size")
    for name, preset in spec.presets.items():  # a known shape (GPT-2 124M, Llama 3 8B) keeps its name
        if all(preset.get(k) == model.get(k) for k in shape):
            model["preset"] = name
    return {f"model.{k}": v for k, v in model.items()}


def mapping(cfg: ModelConfig) -> HFMapping:
    for spec in families().values():
        if spec.name == cfg.arch:
            if spec.hf is None:
                raise ConfigError(f"model.arch={cfg.arch} has no Hugging Face mapping; export it with "
                                  "--format safetensors")
            return spec.hf
    raise ConfigError(f"model.arch={cfg.arch!r} is not a known model family")


T = TypeVar("T")


def block_entry(key: str, block: Mapping[str, T], name: str | None = None) -> tuple[str, T]:
    """(layer index, ``block``'s entry) of ``key`` = ``layers.<i>.<rest>``, the entry being ``block[rest]``
    (a family's table of where each parameter of a Transformer block is in a checkpoint); ``KeyError``
    (of ``name``, the whole parameter name, default ``key``) for a name outside every block's table."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m is None or m.group(2) not in block:
        raise KeyError(key if name is None else name)
    return m.group(1), block[m.group(2)]


def source_region(src: HFSource, offsets: tuple[int, ...], sizes: tuple[int, ...]
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The rectangle (offsets, sizes) of the stored tensor that holds the rectangle (``offsets``,
    ``sizes``) of the loom parameter whose source is ``src`` (a reshaped one, :attr:`HFSource.shape`: all
    of it)."""
    if src.shape is not None:
        return (0,) * len(src.shape), tuple(src.shape)
    off = list(offsets)
    if off:
        off[src.dim] += src.start
    size = list(sizes)
    if src.transpose:
        off, size = off[::-1], size[::-1]
    return tuple(off), tuple(size)


def hf_parts(names, cfg: ModelConfig) -> dict[str, list[tuple[HFSource, str]]]:
    """Each stored tensor's name -> the loom parameters (with their sources) it is made of, in order
    along the fused dimension; ``names``: the model's parameter names (a tied one once; LoRA adapters,
    merged beforehand, left out)."""
    hf = mapping(cfg)
    parts: dict[str, list[tuple[HFSource, str]]] = {}
    for name in names:
        src = hf.source(name, cfg)
        parts.setdefault(src.name, []).append((src, name))
    return {k: sorted(v, key=lambda sn: sn[0].start) for k, v in parts.items()}


def assemble(parts: list[tuple[HFSource, str]], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One stored tensor from its loom parts (:func:`hf_parts`): concatenated along the fused
    dimension, transposed back where the checkpoint stores (in, out)."""
    src = parts[0][0]
    if src.shape is not None:
        return tensors[parts[0][1]].reshape(src.shape).contiguous()
    if src.shared:  # copies of one stored tensor: the first, the others checked against it
        _warn_if_apart(parts, tensors)
        parts = parts[:1]
    full = torch.cat([tensors[n] for _, n in parts], dim=src.dim) if len(parts) > 1 else tensors[parts[0][1]]
    if src.scale != 1.0:
        full = full / src.scale
    return (full.t() if src.transpose else full).contiguous()


def _warn_if_apart(parts: list[tuple[HFSource, str]], tensors: dict[str, torch.Tensor]) -> None:
    first = tensors[parts[0][1]]
    apart = [(n, (tensors[n] - first).abs().max().item()) for _, n in parts[1:] if not torch.equal(tensors[n], first)]
    if apart:
        name, diff = max(apart, key=lambda nd: nd[1])
        log.warning("%s is stored once (%s); %d other copies of it differ from %s (at most %.3g, in %s): the "
                    "export holds only the first", parts[0][0].name, parts[0][1], len(apart), parts[0][1], diff, name)


def hf_state_dict(model: nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every stored tensor of ``model`` (a whole single-device model) by its Hugging Face name: fused
    tensors assembled from their parts, ``Conv1D`` weights transposed back, a tied weight once."""
    tensors = {name: p.detach() for name, p in model.named_parameters()}  # a tied parameter comes once
    return {k: assemble(parts, tensors) for k, parts in hf_parts(tensors, cfg).items()}
