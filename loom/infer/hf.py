"""``loom export RUN --format hf OUT``: a run as a Hugging Face model directory that ``transformers``'
Auto classes load: ``config.json``, the weights (``model.safetensors``, or shards with
``model.safetensors.index.json``) written file by file by ``torch.distributed.checkpoint``'s
``HuggingFaceStorageWriter``, and the tokenizer files. LoRA adapters are merged into the weights.
``loom export --nproc N`` shares the reading and writing among N processes, each its share of every
file's tensors, merged by the writer's consolidation (:func:`write_hf`).
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

from loom.data import load_tokenizer
from loom.data.tokenizer import BpeTokenizer, HFTokenizer, LlamaSentencePieceTokenizer, SentencePieceTokenizer
from loom.errors import RunError
from loom.files import write_text_atomic
from loom.models import build_model
from loom.models.hf import assemble, hf_parts, mapping
from loom.models.lora import LORA_PARAMS, is_lora_param
from loom.parallel.launch import Process, barrier, init_process, launch_local, shutdown_process_group
from loom.train.checkpoint import (
    CheckpointError,
    SafeFileSystemReader,
    checkpoint_dirs,
    checkpoint_step,
    verify_checkpoint,
)
from loom.train.finetune import adapt
from loom.train.precision import param_dtype
from loom.train.rundir import load_run_config

log = logging.getLogger("loom")

DEFAULT_SHARD_BYTES = 5 * 2**30  # as transformers' save_pretrained
INDEX = "model.safetensors.index.json"


def _file_index(sizes: dict[str, int], shard_bytes: int) -> dict[str, int]:
    """Tensor name -> file number (from 1): consecutive tensors fill a file up to ``shard_bytes``."""
    index, file, size = {}, 1, 0
    for name, nbytes in sizes.items():
        if size and size + nbytes > shard_bytes:
            file, size = file + 1, 0
        index[name] = file
        size += nbytes
    return index


def _newest_intact(run_dir: Path) -> Path:
    """The newest checkpoint whose files verify (as ``loom generate`` and ``--resume`` choose)."""
    problems = []
    for ckpt in reversed(checkpoint_dirs(Path(run_dir))):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as e:
            problems.append(str(e))
    raise RunError(f"{str(run_dir)!r} has no intact checkpoint" + (f": {'; '.join(problems)}" if problems else ""))


def export_hf(run_dir: Path, out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES, nproc: int = 1) -> Path:
    """Write the run's newest checkpoint as the Hugging Face model directory ``out``, one weights file
    at a time: only the loom parameters of the file being written are read from the checkpoint (by
    name, whatever layout saved it), so the export holds at most one file's tensors, never the model.
    ``nproc`` > 1: that many local processes share the work (:func:`write_hf`)."""
    out = Path(out)
    ckpt = check_export(run_dir, out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if nproc == 1:
        write_hf(run_dir, ckpt, tmp, shard_bytes)
    else:
        _launch(nproc, run_dir, ckpt, tmp, shard_bytes)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def check_export(run_dir: Path, out: Path) -> Path:
    """What an export would fail on, as one line before any work: a model without a Hugging Face
    counterpart, an ``out`` that is not empty, no intact checkpoint. Returns the checkpoint to export."""
    cfg = load_run_config(run_dir)
    mapping(cfg.model).config_to_hf(cfg.model)  # no mapping, no equivalent: one line
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{str(out)!r} is not empty; export into a new directory")
    return _newest_intact(run_dir)


def write_hf(run_dir: Path, ckpt: Path, tmp: Path, shard_bytes: int = DEFAULT_SHARD_BYTES,
             process: Process = Process()) -> dict[str, int]:
    """Write checkpoint ``ckpt`` of the run into the (existing, empty) directory ``tmp`` as a Hugging
    Face model directory. Every process of the job (``process`` is this one) calls it: of each
    weights file, each writes its share of the stored tensors (whole tensors, balanced by bytes),
    reading only the loom parameters they are made of, through ``HuggingFaceStorageWriter``'s
    distributed save (``tmp/sharded/shard-<rank>-model-<file>.safetensors``); then the writer's
    consolidation merges the shards into the files ``transformers`` reads, each rank its share of
    the files. No rank holds more than its share of one file's tensors. On one process the files are
    written directly. Returns what this rank wrote: ``{"tensors": n, "bytes": n}``."""
    cfg = load_run_config(run_dir)
    config = mapping(cfg.model).config_to_hf(cfg.model)
    tokenizer = None if cfg.model.image_size else load_tokenizer(Path(run_dir) / "tokenizer")  # images: none
    dtype = param_dtype(cfg.train.precision)
    shapes = {n: p.shape for n, p in adapt(build_model(cfg.model), cfg.train).named_parameters()}  # meta
    parts = hf_parts([n for n in shapes if not is_lora_param(n)], cfg.model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    stored = {k: v[:1] if v[0][0].shared else v for k, v in parts.items()}  # a shared tensor is stored once
    sizes = {k: sum(shapes[n].numel() for _, n in v) * itemsize for k, v in stored.items()}
    files = _file_index(sizes, shard_bytes)
    owner = _owners(sizes, files, process.world_size)
    sharded = tmp / "sharded"  # where the writer's distributed save puts each rank's shard files
    weight_map, wrote = {}, {"tensors": 0, "bytes": 0}
    for number in sorted(set(files.values())):
        names = [k for k, f in files.items() if f == number and owner[k] == process.rank]
        tensors = _read(ckpt, [n for k in names for _, n in parts[k]], shapes, dtype, cfg.train.lora) if names else {}
        state = {k: assemble(parts[k], tensors) for k in names}
        wrote = {"tensors": wrote["tensors"] + len(names), "bytes": wrote["bytes"] + sum(sizes[k] for k in names)}
        if process.world_size == 1:
            with warnings.catch_warnings():  # one process writes: no collective is intended
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), fqn_to_index_mapping=files),
                         no_dist=True)
            weight_map.update(json.loads((tmp / INDEX).read_text())["weight_map"])
        else:  # this rank's tensors of the file, to shard files of their own
            dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(sharded), fqn_to_index_mapping=files,
                                                                    save_distributed=True))
        del tensors, state
    if process.world_size > 1:  # the shards into the files, each rank its share; rank 0 writes the index
        from torch.distributed.checkpoint._consolidate_hf_safetensors import (
            consolidate_safetensors_files_on_every_rank,  # torch's merge of the writer's shard files
        )

        consolidate_safetensors_files_on_every_rank(str(sharded), str(tmp), files)
    if process.is_coordinator:
        if process.world_size > 1:
            shutil.rmtree(sharded)
        if max(files.values()) == 1:  # one file: the name transformers looks for first, no index needed
            os.replace(tmp / "model-00001-of-00001.safetensors", tmp / "model.safetensors")
            (tmp / INDEX).unlink()
        elif process.world_size == 1:  # each save wrote the index of its own file: the index of them all
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {k: Path(f).name for k, f in weight_map.items()}}
            write_text_atomic(tmp / INDEX, json.dumps(index, indent=2) + "\n")
        _write_metadata(tmp, config, dtype, tokenizer, cfg.model.block_size, run_dir, ckpt)
    barrier()
    return wrote


def _owners(sizes: dict[str, int], files: dict[str, int], world_size: int) -> dict[str, int]:
    """Stored tensor -> the rank that writes it: of each file, the largest first to the rank with the
    fewest bytes so far (over all files), so that every rank writes about as much of each file."""
    load, owner = [0] * world_size, {}
    for number in sorted(set(files.values())):
        for k in sorted((k for k, f in files.items() if f == number), key=lambda k: -sizes[k]):
            rank = min(range(world_size), key=load.__getitem__)
            owner[k], load[rank] = rank, load[rank] + sizes[k]
    return owner


def _write_metadata(tmp: Path, config: dict, dtype: torch.dtype, tokenizer, block_size: int, run_dir: Path,
                    ckpt: Path) -> None:
    """config.json, the tokenizer files and ``loom_export.json`` (the run and the step)."""
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if tokenizer is not None:
        bos = tokenizer.bos_id if isinstance(tokenizer, LlamaSentencePieceTokenizer) else tokenizer.eos_id
        config.update({"bos_token_id": bos, "eos_token_id": tokenizer.eos_id})
    write_text_atomic(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        _write_tokenizer(tokenizer, tmp, block_size)
    write_text_atomic(tmp / "loom_export.json", json.dumps({"run": str(Path(run_dir).resolve()),
                                                            "step": checkpoint_step(ckpt)}, indent=2) + "\n")


def _launch(nproc: int, run_dir: Path, ckpt: Path, tmp: Path, shard_bytes: int) -> None:
    """:func:`write_hf` on ``nproc`` local processes (gloo)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_local(nproc, _export_worker, run_dir, ckpt, tmp, shard_bytes)
    except ChildFailedError as e:
        raise RunError(f"{len(e.failures)} of {nproc} export processes failed:\n{e.format_msg()}") from None


def _export_worker(run_dir: Path, ckpt: Path, tmp: Path, shard_bytes: int) -> dict[str, int]:
    process, _ = init_process("cpu")
    try:
        return write_hf(run_dir, ckpt, tmp, shard_bytes, process)
    finally:
        shutdown_process_group()


def _read(ckpt: Path, names: list[str], shapes: dict, dtype: torch.dtype, lora) -> dict[str, torch.Tensor]:
    """The parameters ``names`` from the checkpoint, LoRA adapters merged into their weights
    (W + α/r · B A, as :meth:`~loom.models.lora.LoRALinear.merge`)."""
    adapters = {f"{n.rsplit('.', 1)[0]}.{a}" for n in names for a in LORA_PARAMS} & set(shapes)
    state = {"model": {n: torch.empty(shapes[n], dtype=dtype) for n in [*names, *sorted(adapters)]}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeFileSystemReader(ckpt), no_dist=True)
    tensors = state["model"]
    for n in names:
        owner = n.rsplit(".", 1)[0]
        if n.endswith(".weight") and f"{owner}.lora_a" in tensors:
            tensors[n] += (lora.alpha / lora.rank) * (tensors[f"{owner}.lora_b"] @ tensors[f"{owner}.lora_a"])
    return tensors


def _write_tokenizer(tokenizer, out: Path, block_size: int) -> None:
    """tokenizer.json and, unless the imported directory brought its own, a tokenizer_config.json
    that makes it a ``PreTrainedTokenizerFast`` with loom's end-of-document token; a SentencePiece
    model (T5's ``spiece.model`` alone) as it came, with a ``tokenizer_config.json`` naming ``T5Tokenizer``
    (a Llama's ``tokenizer.model``: ``LlamaTokenizer``, with its ``add_bos_token``/``add_eos_token``)."""
    if isinstance(tokenizer, LlamaSentencePieceTokenizer):
        tokenizer._write_model(out / LlamaSentencePieceTokenizer.model_file)
        config = {"tokenizer_class": "LlamaTokenizer", "model_max_length": block_size,
                  "add_bos_token": tokenizer.add_bos, "add_eos_token": tokenizer.add_eos, **tokenizer.special_tokens()}
        write_text_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return
    if isinstance(tokenizer, SentencePieceTokenizer):
        tokenizer._write_model(out / SentencePieceTokenizer.model_file)
        config = {"tokenizer_class": "T5Tokenizer", "model_max_length": block_size, "extra_ids": 0,
                  **tokenizer.special_tokens()}
        write_text_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return
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
