"""The rank side of tests/distributed/test_hf_parity.py: train a model imported from a Hugging Face
directory under a layout (this module does not import ``transformers``, so the gloo workers start
without it)."""

from __future__ import annotations

import contextlib

import torch

from loom.parallel.launch import Process
from loom.parallel.plan import check_plan, resolve_plan
from loom.train.hf import hf_init_config
from loom.train.trainer import Trainer
from tests.distributed.parity import COMMON, STEPS, full_parameters, process_of_this_rank, tiny_data
from tests.hf_models import VOCAB

LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=2"],
    "pp2_lora": ["parallel.pp=2", "parallel.microbatches=2", "train.lora.rank=4"],
    # 322 rows split 161 + 161: rank 1's shard holds the checkpoint's last 159 rows and 2 of padding
    "tp2_padded_vocab": ["parallel.tp=2", "model.vocab_size=322"],
}
BROKEN = {"tp2_reader_ignores_offsets": ["parallel.tp=2", "sabotage:reader_ignores_offsets"]}


def trainer(path: str, layout: list[str], process: Process) -> Trainer:
    cfg = hf_init_config(path, [*COMMON, *(o for o in layout if not o.startswith("sabotage:"))])
    plan = resolve_plan(cfg, process.world_size)
    check_plan(plan, cfg, process.world_size)
    return Trainer(cfg, plan, None, tiny_data(vocab=VOCAB), process=process, device=torch.device("cpu"))


def _train(path: str, layout: list[str], process: Process) -> dict:
    with _sabotaged("sabotage:reader_ignores_offsets" in layout), _counting_reads() as read:
        t = trainer(path, layout, process)
    losses = [t.mean_over_replicas(t.train_step(step)[0]).item() for step in range(STEPS)]
    return {"losses": losses, "params": full_parameters(t), "val_loss": t.evaluate()["val_loss"],
            "elements_read": read["elements"]}


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


def train_cases(paths: dict[str, str], cases: list[tuple[str, list[str]]]) -> dict:
    """On every rank: ``{(model, layout...): result}``, ``paths[model]`` being its directory."""
    return {(model, *layout): _train(paths[model], layout, process_of_this_rank()) for model, layout in cases}
