"""The rank side of tests/distributed/test_hf_parity.py: train a model imported from a Hugging Face
directory under a layout (this module does not import ``transformers``, so the gloo workers start
without it)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from loom.models.lora import LoRALinear
from loom.parallel.launch import Process
from loom.parallel.plan import check_plan, resolve_plan
from loom.train.hf import hf_init_config
from loom.train.trainer import Trainer
from tests.distributed.parity import COMMON, STEPS, full_parameters, process_of_this_rank, tiny_data
from tests.hf_models import VOCAB

SFT_FILE = "sft.jsonl"  # {prompt, response} records beside the model's files (their names are not weights)

LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"],
    "pp2_lora": ["parallel.pp=2", "parallel.microbatches=2", "train.lora.rank=4"],
    # 322 rows split 161 + 161: rank 1's shard holds the checkpoint's last 159 rows and 2 of padding
    "tp2_padded_vocab": ["parallel.tp=2", "model.vocab_size=322"],
    # {prompt, response} records of different lengths: replicas and micro-batches score different counts
    "dp2_sft": ["parallel.dp=2", "train.task=sft"],
    "pp2_sft": ["parallel.pp=2", "parallel.microbatches=2", "train.task=sft"],
}
# adapters on column-parallel (q, v, fc, up) and row-parallel (out, proj, down) linear layers of GPT-2 and Llama
LORA = ["train.lora.rank=4", "train.lora.targets=['*.q_proj','*.v_proj','*.out_proj','*.fc','*.proj','*.up_proj',"
        "'*.down_proj']"]
LORA_LAYOUTS = {"tp2_lora": ["parallel.tp=2", *LORA], "tp2_sp_lora": ["parallel.tp=2", "parallel.sp=true", *LORA]}
BROKEN = {"tp2_reader_ignores_offsets": ["parallel.tp=2", "sabotage:reader_ignores_offsets"],
          "tp2_lora_split_as_weight": ["parallel.tp=2", *LORA, "sabotage:lora_split_as_weight"]}


def trainer(path: str, layout: list[str], process: Process, run_dir: Path | None = None) -> Trainer:
    cfg = hf_init_config(path, [*COMMON, *(o for o in layout if not o.startswith("sabotage:"))])
    plan = resolve_plan(cfg, process.world_size)
    check_plan(plan, cfg, process.world_size)
    return Trainer(cfg, plan, run_dir, _data(path, cfg.train.task), process=process, device=torch.device("cpu"))


def _data(path: str, task: str):
    """The parity suite's token stream, or for sft the model directory's records (``sft.jsonl``,
    written by the test) with its tokenizer."""
    if task != "sft":
        return tiny_data(vocab=VOCAB)
    from types import SimpleNamespace

    from loom.data.tokenizer import HFTokenizer

    return SimpleNamespace(tokenizer=HFTokenizer.from_pretrained_dir(path), train=None, val=None,
                           meta={"source": str(Path(path) / SFT_FILE), "val_fraction": 0.25})


def _train(path: str, layout: list[str], process: Process) -> dict:
    with (_sabotaged("sabotage:reader_ignores_offsets" in layout), _counting_reads() as read,
          _lora_split_as_weight("sabotage:lora_split_as_weight" in layout)):
        t = trainer(path, layout, process)
    before = full_parameters(t) if t.cfg.train.lora.rank else {}
    losses = [t.mean_over_replicas(t.train_step(step)[0]).item() for step in range(STEPS)]
    params = full_parameters(t)
    out = {"losses": losses, "params": params, "val_loss": t.evaluate()["val_loss"], "elements_read": read["elements"]}
    if before:  # which parameters training changed, and the shape of each adapted layer's pieces on this rank
        out["moved"] = sorted(n for n, p in before.items() if not torch.equal(p, params[n]))
        out["local_shapes"] = {n: tuple((p.to_local() if isinstance(p, DTensor) else p).shape)
                               for part in t.model.modules for m_name, m in part.named_modules()
                               if isinstance(m, LoRALinear)
                               for k, p in m.named_parameters(recurse=False)
                               for n in [f"{m_name}.{k}"]}
    return out


@contextlib.contextmanager
def _counting_reads():
    """How many tensor elements this rank's ``HuggingFaceStorageReader`` reads from the files."""
    import math

    from torch.distributed.checkpoint import HuggingFaceStorageReader

    read, original = {"elements": 0}, HuggingFaceStorageReader.read_data

    def counted(self, plan, planner):
        read["elements"] += sum(math.prod(item.lengths) for item in plan.items)
        return original(self, plan, planner)

    HuggingFaceStorageReader.read_data = counted
    try:
        yield read
    finally:
        HuggingFaceStorageReader.read_data = original


@contextlib.contextmanager
def _sabotaged(on: bool):
    """Every rank reads the rectangle at offset 0 of each stored tensor: right on one process, wrong
    for every shard but the first."""
    from loom.train import hf

    original = hf.source_region
    if on:
        hf.source_region = lambda src, offsets, sizes: original(src, (0,) * len(offsets), sizes)
    try:
        yield
    finally:
        hf.source_region = original


@contextlib.contextmanager
def _lora_split_as_weight(on: bool):
    """Both LoRA factors split along their first dimension, as torch's ``ColwiseParallel`` splits every
    parameter of a linear layer: A's rank instead of its inputs, B's outputs even where the weight's
    inputs are split."""
    original = LoRALinear.TP_SPLITS
    if on:
        LoRALinear.TP_SPLITS = {k: {"lora_a": 0, "lora_b": 0} for k in original}
    try:
        yield
    finally:
        LoRALinear.TP_SPLITS = original


def train_cases(paths: dict[str, str], cases: list[tuple[str, list[str]]], export: tuple | None = None) -> dict:
    """On every rank: ``{(model, layout...): result}``, ``paths[model]`` being its directory; with
    ``export`` = (model, layout, run directory, output directory), also ``{"export": what this rank wrote}``
    (:func:`train_and_export`)."""
    out = {(model, *layout): _train(paths[model], layout, process_of_this_rank()) for model, layout in cases}
    if export is not None:
        model, layout, run_dir, hf_dir = export
        out["export"] = train_and_export(paths[model], layout, Path(run_dir), Path(hf_dir))
    return out


EXPORT_STEPS = 2
EXPORT_FILE_BYTES = 200_000  # the tiny GPT-2's weights (float64, ~0.5 MB) in several files


def train_and_export(path: str, layout: list[str], run_dir: Path, hf_dir: Path) -> dict:
    """Fine-tune the model directory ``path`` under ``layout`` into the run ``run_dir`` (saved after
    :data:`EXPORT_STEPS` steps), then export it to ``hf_dir`` from this job's processes, each writing
    its share (:func:`loom.infer.hf.write_hf`)."""
    from loom.config import config_to_yaml
    from loom.files import write_text_atomic
    from loom.infer.hf import _newest_intact, write_hf
    from loom.parallel.launch import barrier
    from loom.train.hf import prepare_hf_init

    process = process_of_this_rank()
    if process.is_coordinator:  # what `loom train` puts into a run directory beside the checkpoints
        run_dir.mkdir(parents=True)
        hf_dir.mkdir(parents=True)
    barrier()
    t = trainer(path, layout, process, run_dir)
    if process.is_coordinator:
        prepare_hf_init(t.cfg, run_dir)
        write_text_atomic(run_dir / "config.yaml", config_to_yaml(t.cfg))
    for step in range(EXPORT_STEPS):
        t.train_step(step)
    t.save(EXPORT_STEPS)
    t.metrics.close() if t.metrics else None
    barrier()
    return write_hf(run_dir, _newest_intact(run_dir), hf_dir, EXPORT_FILE_BYTES, process)
