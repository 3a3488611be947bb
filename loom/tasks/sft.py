"""Supervised fine-tuning: continue a ``{"prompt": ..., "response": ...}`` record with its response.

Every row is one record, ``prompt + response + <end of text>`` encoded with the run's tokenizer, cut
to ``block_size + 1`` tokens and padded with the end-of-text token; the labels are the row shifted by
one, with every position that predicts a prompt token (or padding) set to :data:`IGNORE`, so the loss
is the mean cross-entropy over the response's tokens only (the prompt conditions, it is not learned).

Responses differ in length, so a slice of a batch (a data-parallel replica's rows, a pipeline
micro-batch) holds its own number of scored tokens. As the masked-LM task does, every row carries the
*global* batch's count per row (``sft_weight``), and a slice divides its summed cross-entropy by its
rows' share of that count: the pieces' losses, averaged over equal numbers of rows as the engine
averages them, give exactly the mean over the whole batch's response tokens, under any layout.

The records are the ``.jsonl`` files of ``data.path``; every ``k``-th record (``k = 1 /
data.val_fraction``, at least one record) is held out. The batch of step ``s`` is ``batch_size``
records drawn from ``numpy.random.default_rng([seed, s])``, like the causal LM's windows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from loom.data.corpus import corpus_files
from loom.errors import ConfigError
from loom.models.common.numerics import at_least_fp32
from loom.tasks.base import Batch, Task, read_jsonl_pairs
from loom.tasks.causal_lm import lm_metrics

IGNORE = -100  # a label no loss counts (cross_entropy's ignore_index)


def sft_rows(pairs: list[tuple[list[int], list[int]]], block_size: int, pad: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, labels), each (N, block_size), of (prompt ids, response ids) pairs; the response
    ids end with the end-of-text token. Labels of prompt and padding positions are :data:`IGNORE`."""
    x = torch.full((len(pairs), block_size), pad, dtype=torch.long)
    y = torch.full((len(pairs), block_size), IGNORE, dtype=torch.long)
    for i, (prompt, response) in enumerate(pairs):
        seq = torch.tensor((prompt + response)[: block_size + 1], dtype=torch.long)
        n = len(seq) - 1  # positions that predict a next token
        x[i, :n] = seq[:-1]
        y[i, :n] = seq[1:]
        y[i, : max(len(prompt) - 1, 0)] = IGNORE  # position j predicts token j+1: prompt tokens 1..P-1
    return x, y


def read_records(path: str) -> list[tuple[str, str]]:
    """The (prompt, response) records of the ``.jsonl`` files of ``path``."""
    files = [f for f in corpus_files(path) if f.suffix == ".jsonl"]
    if not files:
        raise ConfigError(f"train.task=sft reads .jsonl files of {{prompt, response}} records; {path} has none")
    return read_jsonl_pairs(files, ("prompt", "response"), "train.task=sft")


class SFT(Task):
    name = "sft"

    def __init__(self, train: list, val: list, block_size: int, batch_size: int, seed: int, pad: int = 0):
        if not train or not val:
            raise ConfigError(f"train.task=sft needs at least 2 records (one held out); got {len(train) + len(val)}")
        self.train_x, self.train_y = sft_rows(train, block_size, pad)
        self.val_x, self.val_y = sft_rows(val, block_size, pad)
        self.batch_size, self.seed = batch_size, seed

    @classmethod
    def from_data(cls, data, block_size: int, batch_size: int, seed: int) -> SFT:
        """The records of the corpus ``data`` was prepared from, encoded with its tokenizer."""
        source = data.meta.get("source")
        if source in (None, "python-stdlib"):
            raise ConfigError("train.task=sft needs data.path= a .jsonl file (or folder) of {prompt, response} "
                              "records")
        tok = data.tokenizer
        records = read_records(source)
        pairs = [_pair_ids(tok, p, r) for p, r in records]
        every = max(2, round(1 / data.meta.get("val_fraction", 0.01)))
        held = [i % every == every - 1 for i in range(len(pairs))]
        if not any(held) and len(pairs) >= 2:
            held[-1] = True
        train = [p for p, h in zip(pairs, held) if not h]
        val = [p for p, h in zip(pairs, held) if h]
        return cls(train, val, block_size, batch_size, seed, pad=tok.eos_id)

    @staticmethod
    def _batch(x: torch.Tensor, y: torch.Tensor) -> Batch:
        """A whole batch, each row carrying the batch's scored tokens per row."""
        weight = float((y != IGNORE).sum()) / len(y)
        return {"input_ids": x, "labels": y, "sft_weight": torch.full((len(y),), weight, dtype=torch.float64)}

    def train_batch(self, step: int, rows: slice) -> Batch:
        pick = np.random.default_rng([self.seed, step]).integers(0, len(self.train_x), self.batch_size)
        index = torch.from_numpy(pick)  # the whole global batch: its count is global
        return {k: v[rows] for k, v in self._batch(self.train_x[index], self.train_y[index]).items()}

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        """Whole batches of the held-out records (a layout splits a batch's rows evenly), or the
        records there are when they do not fill one."""
        for b in range(min(max_batches, max(len(self.val_x) // self.batch_size, 1))):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self._batch(self.val_x[rows], self.val_y[rows])

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch["input_ids"],)

    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["labels"], batch["sft_weight"]

    def loss(self, outputs: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy summed over the response tokens of these rows, over their share of the whole
        batch's count (the mean over the response tokens when the rows are the whole batch)."""
        labels, weight = targets
        total = F.cross_entropy(at_least_fp32(outputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                reduction="sum")
        return total / weight.sum().to(total.dtype).clamp_min(1e-12)

    def units(self, batch: Batch) -> float:
        """Scored tokens of ``batch``, as its rows' share of its whole batch's count."""
        return float(batch["sft_weight"].sum())

    def metrics(self, loss_sum: float, units: int) -> dict:
        return lm_metrics(loss_sum, units)


def _pair_ids(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """The ids of a prompt and of its response, which continues it and ends the document: the record is
    one document (``tok.document``: a Llama's ``<s> prompt response </s>``)."""
    p, r = tok.encode(prompt), tok.encode(response)
    record = tok.document(p + r)
    cut = len(record) - len(r) - 1  # the response and the end that follows it
    return record[:cut], record[cut:]
