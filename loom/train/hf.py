"""Starting from a Hugging Face model directory: its weights read into this rank's share of the model.

Each parameter (or this rank's shard of it, under any layout) is a rectangle of one stored tensor
(:func:`loom.models.hf.source_region`); the rectangles are read by ``torch.distributed.checkpoint``'s
``HuggingFaceStorageReader`` with a load planner that asks for exactly those rectangles, so a rank
reads only the bytes of its own shards (safetensors files are read by slices) and no rank ever holds
the whole model. The older ``pytorch_model.bin`` format (no slicing possible) is opened with
``torch.load(weights_only=True, mmap=True)``: memory-mapped, so only the slices taken are read.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor

from loom.config import Config, config_to_yaml, load_config, task_name, tokenizer_is_dir
from loom.data import DataError
from loom.data.tokenizer import META_FILE, pretrained_tokenizer
from loom.errors import ConfigError, RunError
from loom.files import write_text_atomic
from loom.models import build_model
from loom.models.config import ModelConfig
from loom.models.hf import hf_model_settings, is_hf_dir, mapping, read_hf_config, source_region
from loom.models.lora import is_lora_param
from loom.tasks import TASKS
from loom.train.checkpoint import latest_checkpoint, save_checkpoint
from loom.train.precision import param_dtype
from loom.train.rundir import LABELS_FILE

log = logging.getLogger("loom.train")

SAFETENSORS, BIN = "model.safetensors", "pytorch_model.bin"


@dataclasses.dataclass
class _Read:
    param: torch.Tensor  # this rank's local part of the parameter
    stored: str  # the stored tensor's name
    offsets: tuple[int, ...]  # the rectangle of it, in the stored layout
    sizes: tuple[int, ...]
    transpose: bool
    scale: float  # the parameter is the stored tensor times this
    # a reshaped source (read whole): the whole parameter's shape and this rank's part of it
    part: tuple[torch.Size, tuple[slice, ...]] | None = None


class _RectanglePlanner(DefaultLoadPlanner):
    """Reads state-dict entry ``key`` from rectangle ``offsets`` (its size: the entry's) of the stored
    tensor ``stored``: several entries may read parts of one fused tensor."""

    def __init__(self, regions: dict[str, tuple[str, tuple[int, ...]]]):
        super().__init__()
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (stored, offsets) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=self.state_dict[key].shape)
            for item in create_read_items_for_chunk_list(stored, self.metadata.state_dict_metadata[stored], [chunk]):
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(key)))
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


def weight_format(path: Path) -> str:
    """``safetensors`` or ``bin``: what holds the weights of the model directory ``path``."""
    if any(path.glob("*.safetensors")):
        return "safetensors"
    if (path / BIN).is_file() or (path / f"{BIN}.index.json").is_file():
        return "bin"
    raise ConfigError(f"{str(path)!r} holds no weights ({SAFETENSORS}, shards with {SAFETENSORS}.index.json, "
                      f"or {BIN})")


def _stored_shapes(path: Path, fmt: str) -> tuple[dict[str, tuple[torch.Size, torch.dtype]], dict | None]:
    """Every stored tensor's shape and dtype; for ``.bin`` also the memory-mapped tensors."""
    if fmt == "safetensors":
        md = HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
        return {k: (v.size, v.properties.dtype) for k, v in md.items()}, None
    index = path / f"{BIN}.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [BIN]
    tensors: dict = {}
    for f in files:
        tensors.update(torch.load(path / f, map_location="cpu", weights_only=True, mmap=True))
    return {k: (v.shape, v.dtype) for k, v in tensors.items()}, tensors


def _resolve(name: str, stored: dict, prefixes: tuple[str, ...]) -> str | None:
    """``name`` as the checkpoint spells it: with or without one of the family's prefixes."""
    if name in stored:
        return name
    for pre in prefixes:
        if name.startswith(pre) and name[len(pre):] in stored:
            return name[len(pre):]
        if pre + name in stored:
            return pre + name
    return None


def _local(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's part of ``p`` and its offsets in the whole parameter."""
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return p.to_local(), tuple(offsets)
    return p, (0,) * p.dim()


def _find(src, stored: dict, prefixes: tuple[str, ...]) -> str | None:
    """The stored tensor ``src`` names (or its fallback), as the checkpoint spells it; None: neither."""
    key = _resolve(src.name, stored, prefixes)
    return key if key is not None or src.fallback is None else _resolve(src.fallback, stored, prefixes)


def _vocab_padding(shape: torch.Size, cfg: ModelConfig, src) -> bool:
    """Whether a parameter may hold more rows than its stored tensor: one row per token of a vocabulary
    padded past the checkpoint's (``model.vocab_size`` raised so that tensor parallelism divides it)."""
    return len(shape) >= 1 and shape[0] == cfg.vocab_size and not src.transpose and src.start == 0


def _directory_params(path: Path) -> set[str]:
    """The parameter names of the model the directory holds (its ``config.json``'s own heads)."""
    own = load_config(None, [], hf_model_settings(path)).model
    return {name for name, _ in build_model(own).named_parameters()}  # meta: nothing allocated


def check_hf_weights(path: str | Path, cfg: ModelConfig) -> str:
    """Check, before any process starts, that the directory's weights are the model's: every parameter
    found with its shape, no stored tensor left over. Returns the weights' format."""
    path = Path(path).expanduser()
    fmt = weight_format(path)
    hf = mapping(cfg)
    stored, _ = _stored_shapes(path, fmt)
    used = set()
    for name, p in build_model(cfg).named_parameters():  # meta: nothing allocated
        src = hf.source(name, cfg)
        key = _find(src, stored, hf.prefixes)
        if key is None:
            raise ConfigError(f"{path}: no tensor {src.name!r} (for loom's {name}) in the checkpoint")
        offsets, sizes = source_region(src, (0,) * p.dim(), tuple(p.shape))
        shape = stored[key][0]
        if src.shape is not None and (tuple(shape) != tuple(src.shape) or shape.numel() != p.numel()):
            raise ConfigError(f"{path}: tensor {key!r} has shape {tuple(shape)}, not {tuple(src.shape)} (loom's {name} "
                              f"{tuple(p.shape)}); config.json and the weights disagree")
        if _vocab_padding(p.shape, cfg, src) and len(shape) == len(sizes):
            sizes = (min(sizes[0], shape[0]), *sizes[1:])  # rows past the stored vocabulary: padding
        if len(shape) != len(sizes) or any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise ConfigError(f"{path}: tensor {key!r} has shape {tuple(shape)}, too small for loom's {name} "
                              f"{tuple(p.shape)}; config.json and the weights disagree")
        used.add(key)
    extra = sorted(k for k in stored if k not in used and not any(fnmatch.fnmatch(k, pat) for pat in hf.ignore))
    if extra:
        raise ConfigError(f"{path}: {len(extra)} stored tensor(s) have no place in loom's {cfg.arch} model, e.g. "
                          f"{extra[0]!r}; the checkpoint holds something config.json does not describe")
    return fmt


@torch.no_grad()
def load_hf_weights(modules: list[nn.Module], cfg: ModelConfig, path: str | Path) -> None:
    """Fill the parameters of ``modules`` (this rank's parts of the model, under any layout) from the
    Hugging Face model directory ``path``, reading only the rectangles they hold."""
    path = Path(path).expanduser()
    fmt = weight_format(path)
    hf = mapping(cfg)
    stored, tensors = _stored_shapes(path, fmt)
    reads: list[_Read] = []
    own = _directory_params(path)
    new = sorted(name for m in modules for name, _ in m.named_parameters() if name not in own
                 and not is_lora_param(name))
    if new:  # a head the directory's model lacks (a classifier on a pretrained BERT): initialized, not read
        log.info("from %s: %d new weights, initialized (%s)", path, len(new), ", ".join(new))
    for m in modules:
        for name, p in m.named_parameters():
            if is_lora_param(name) or name not in own:  # adapters start as LoRA says (B = 0); new heads
                continue
            src = hf.source(name, cfg)
            local, offsets = _local(p)
            if local.numel() == 0:
                continue
            key = _find(src, stored, hf.prefixes)
            if key is None:
                raise ConfigError(f"{path}: no tensor {src.name!r} (for loom's {name}) in the checkpoint")
            region_offsets, region_sizes = source_region(src, offsets, tuple(local.shape))
            if _vocab_padding(p.shape, cfg, src):  # only the rows the checkpoint has; the padding is zero
                local.zero_()
                rows = max(0, min(region_sizes[0], stored[key][0][0] - region_offsets[0]))
                if rows == 0:
                    continue
                local, region_sizes = local[:rows], (rows, *region_sizes[1:])
            part = None
            if src.shape is not None:  # read whole, this rank's part taken after the reshape
                part = p.shape, tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))
            reads.append(_Read(local, key, region_offsets, region_sizes, src.transpose, src.scale, part))
    if fmt == "safetensors":
        state = {str(i): torch.empty(r.sizes, dtype=stored[r.stored][1]) for i, r in enumerate(reads)}
        planner = _RectanglePlanner({str(i): (r.stored, r.offsets) for i, r in enumerate(reads)})
        with warnings.catch_warnings():  # each rank reads its own rectangles: no collective is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)), planner=planner, no_dist=True)
        values = [state[str(i)] for i in range(len(reads))]
    else:
        values = [tensors[r.stored][tuple(slice(o, o + s) for o, s in zip(r.offsets, r.sizes))] for r in reads]
    for r, v in zip(reads, values):
        if r.part is not None:
            v = v.reshape(r.part[0])[r.part[1]]
        v = v.t() if r.transpose else v
        r.param.copy_(v * r.scale if r.scale != 1.0 else v)


# --------------------------------------------------------------------------------------------
# A run that starts from a Hugging Face model directory
# --------------------------------------------------------------------------------------------

INIT_FILE = "init.json"  # in the run directory: where the run's initial weights came from


def starts_from_hf(cfg: Config) -> bool:
    """Whether ``train.init_from`` names a Hugging Face model directory."""
    return bool(cfg.train.init_from) and is_hf_dir(cfg.train.init_from)


def hf_init_config(path: str | Path, overrides: list[str] | None = None, config_file: str | None = None,
                   settings: dict | None = None, training: bool = True) -> Config:
    """The config of a run that starts from the model directory ``path``: its ``config.json`` as the
    ``model`` section (``model.*`` overrides still apply, e.g. ``model.dropout``), then the rest.
    ``training``: a run will train it (a task that needs loom's own WordPiece tokenizer is refused)."""
    model = hf_model_settings(path)
    cfg = load_config(config_file, [*(overrides or []), f"train.init_from={path}"], {**model, **(settings or {})})
    check_hf_weights(path, cfg.model)
    task = TASKS[task_name(cfg)]
    if training and getattr(task, "tokenizer_kind", None) == "wordpiece":
        needs = getattr(task, "special_tokens", None)  # what it reads of a model's own tokenizer
        check = getattr(task, "check_tokenizer", None)  # or a task's own check of it (seq2seq's)
        if needs is None and check is None:
            raise ConfigError(f"train.task={task_name(cfg)} from a Hugging Face model directory is not built yet: "
                              "the task needs loom's WordPiece tokenizer (its [NL] and <|endoftext|> marks), the "
                              "directory brings its own; `loom import` and `loom export --format hf` work for this "
                              "model")
        try:
            tokenizer = pretrained_tokenizer(path)
        except DataError as e:
            raise ConfigError(f"train.init_from={path}: {e}") from None
        if check is not None:
            check(tokenizer)
        elif getattr(tokenizer, "special_ids", None) is None:
            raise ConfigError(f"train.task={task_name(cfg)} needs a tokenizer with {', '.join(needs)}; the one in "
                              f"{path} lacks one of them")
    return cfg


def prepare_hf_init(cfg: Config, run_dir: Path) -> Path | None:
    """Put the model directory's tokenizer into the run (``run_dir/tokenizer``, which the data is then
    encoded with) and record where the weights come from (``run_dir/init.json``); returns the
    tokenizer's folder (None for a model that reads images: it has no tokenizer)."""
    source = Path(cfg.train.init_from).expanduser().resolve()
    tok_dir = None if cfg.model.image_size else Path(run_dir) / "tokenizer"
    if tok_dir is not None:
        try:
            tokenizer = pretrained_tokenizer(source)
        except DataError as e:
            raise ConfigError(f"train.init_from={cfg.train.init_from}: {e}") from None
        tokenizer.save(tok_dir)
    config = read_hf_config(source)
    record = {"init_from": str(source), "format": "huggingface", "model_type": config["model_type"],
              "architectures": config.get("architectures"), "weights": weight_format(source),
              "files": sorted(f.name for f in source.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))}
    write_text_atomic(Path(run_dir) / INIT_FILE, json.dumps(record, indent=2) + "\n")
    return tok_dir


def initial_tokenizer(cfg: Config, run_dir: Path) -> str | None:
    """The folder of the tokenizer a new run encodes its data with, when it does not train its own:
    the model directory's of ``train.init_from`` (put into ``run_dir/tokenizer``, the weights' origin
    into ``init.json``), or the one ``data.tokenizer=DIR`` names (a Hugging Face model or tokenizer
    directory, or a run's ``tokenizer/``). None: the run trains a tokenizer (``data.tokenizer``'s kind)."""
    if starts_from_hf(cfg):
        tok_dir = prepare_hf_init(cfg, run_dir)
        return str(tok_dir) if tok_dir else None
    if not tokenizer_is_dir(cfg.data.tokenizer):
        return None
    source = Path(cfg.data.tokenizer).expanduser()
    if (source / META_FILE).is_file():  # a folder loom wrote (a run's tokenizer/)
        return str(source)
    try:
        tokenizer = pretrained_tokenizer(source)
    except DataError as e:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: {e}") from None
    tokenizer.save(Path(run_dir) / "tokenizer")
    return str(Path(run_dir) / "tokenizer")


def check_resumable(run_dir: Path) -> None:
    """``loom train --resume`` of a run ``loom import`` made (weights, no optimizer state) is one line
    that says how to train from it."""
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None or not (Path(run_dir) / INIT_FILE).is_file():
        return
    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    if not any(k.startswith("optim.state.") for k in keys):
        raise ConfigError(f"{run_dir} holds imported weights, not a training run to resume; start one from them "
                          f"with: loom train train.init_from={run_dir} (or the model directory itself)")


def import_hf(path: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """``loom import``: a run directory made from the model directory ``path``: its config, its
    tokenizer, and its weights as checkpoint step 0, which ``loom generate``, ``eval`` and ``export``
    open like any run's (and ``train.init_from`` starts from)."""
    out = Path(out)
    cfg = hf_init_config(path, [*(overrides or []), f"train.run_dir={out}"], training=False)
    if latest_checkpoint(out) is not None:
        raise RunError(f"{str(out)!r} already holds a run with checkpoints; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg.model).to(param_dtype(cfg.train.precision))
    model.to_empty(device="cpu")
    model.tie_weights()
    load_hf_weights([model], cfg.model, path)
    no_state = torch.optim.SGD(model.parameters(), lr=0.0)  # a checkpoint of weights only: no optimizer state
    save_checkpoint(out, 0, [model], [no_state], {"step": 0})
    prepare_hf_init(cfg, out)
    id2label = read_hf_config(Path(path).expanduser()).get("id2label") or {}
    if cfg.model.n_classes and len(id2label) == cfg.model.n_classes:  # a classifier's label names (loom predict)
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        write_text_atomic(out / LABELS_FILE, json.dumps(names) + "\n")
    write_text_atomic(out / "config.yaml", config_to_yaml(cfg))
    return out
