"""``loom export RUN --format hf OUT``: a run as a Hugging Face model directory that ``transformers``'
Auto classes load: ``config.json``, the weights (``model.safetensors``, or shards with
``model.safetensors.index.json``) written by ``torch.distributed.checkpoint``'s
``HuggingFaceStorageWriter``, and the tokenizer files. LoRA adapters are merged into the weights first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from loom.data.tokenizer import BpeTokenizer, HFTokenizer
from loom.errors import RunError
from loom.files import write_text_atomic
from loom.infer.load import load_for_inference
from loom.models.hf import hf_state_dict, mapping
from loom.models.lora import merge_lora
from loom.train.rundir import load_run_config

log = logging.getLogger("loom")

DEFAULT_SHARD_BYTES = 5 * 2**30  # as transformers' save_pretrained


def _file_index(state: dict[str, torch.Tensor], shard_bytes: int) -> dict[str, int]:
    """Tensor name -> file number (from 1): consecutive tensors fill a file up to ``shard_bytes``."""
    index, file, size = {}, 1, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            file, size = file + 1, 0
        index[name] = file
        size += nbytes
    return index


def export_hf(run_dir: Path, out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the run's newest checkpoint as the Hugging Face model directory ``out``."""
    cfg = load_run_config(run_dir)
    config = mapping(cfg.model).config_to_hf(cfg.model)  # no mapping, no equivalent: one line, before any work
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{str(out)!r} is not empty; export into a new directory")
    cfg, model, tokenizer, step = load_for_inference(run_dir, device="cpu")
    merge_lora(model)  # adapters folded into their weights: transformers sees a plain model
    state = hf_state_dict(model, cfg.model)
    dtype = next(iter(state.values())).dtype
    config.update({"torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": tokenizer.eos_id,
                   "eos_token_id": tokenizer.eos_id})
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = _file_index(state, shard_bytes)
    with warnings.catch_warnings():  # one process writes the whole model: no collective is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), fqn_to_index_mapping=files), no_dist=True)
    if max(files.values()) == 1:  # one file: the name transformers looks for first, no index needed
        os.replace(tmp / "model-00001-of-00001.safetensors", tmp / "model.safetensors")
        (tmp / "model.safetensors.index.json").unlink()
    write_text_atomic(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    _write_tokenizer(tokenizer, tmp, cfg.model.block_size)
    write_text_atomic(tmp / "loom_export.json", json.dumps({"run": str(Path(run_dir).resolve()), "step": step},
                                                            indent=2) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def _write_tokenizer(tokenizer, out: Path, block_size: int) -> None:
    """tokenizer.json and, unless the imported directory brought its own, a tokenizer_config.json
    that makes it a ``PreTrainedTokenizerFast`` with loom's end-of-document token."""
    if not isinstance(tokenizer, BpeTokenizer):
        log.warning("the run's %s tokenizer has no transformers equivalent: exported without tokenizer files",
                    tokenizer.kind)
        return
    tokenizer._write_model(out / "tokenizer.json")
    extra = tokenizer.extra if isinstance(tokenizer, HFTokenizer) else {}
    for name, text in extra.items():
        write_text_atomic(out / name, text)
    if "tokenizer_config.json" not in extra:
        eos = tokenizer.eos_token if isinstance(tokenizer, HFTokenizer) else "<|endoftext|>"
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
                  "model_max_length": block_size}
        write_text_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
