"""Sequence classification on the [CLS] output (BERT's fine-tuning, Devlin et al. 2018, section 4.1).

**Data.** ``data.path`` a ``.jsonl`` file of ``{"text": ..., "label": ...}`` records or a ``.csv``
file with ``text`` and ``label`` columns; or, by default (no ``data.path``), a real labelled set
built from this machine's Python standard library: every function (``def``, ``async def``) of eight
packages (asyncio, email, http, logging, multiprocessing, tkinter, unittest, xml), at most 300 each,
its source as the text and its package as the label. Labels are sorted and numbered. A fixed 20% of
the examples (whatever the seed, so that runs compare on the same ones) is held out.

**A batch.** ``[CLS] text [SEP]`` cut to ``model.block_size`` and padded; the loss is the mean
cross-entropy over the rows (every row counts once, so every layout's averaging is exact).
``loom eval`` reports accuracy and macro-F1 on the held-out split beside the majority-class baseline
(always predicting the most frequent training label).
"""

from __future__ import annotations

import ast
import csv
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from loom.errors import ConfigError
from loom.tasks.base import Batch, OneLabelTask, classification_metrics  # noqa: F401 (re-exported)

PACKAGES = ("asyncio", "email", "http", "logging", "multiprocessing", "tkinter", "unittest", "xml")
PER_PACKAGE = 300
HELD_OUT = 0.2


def stdlib_functions(per_package: int = PER_PACKAGE) -> list[tuple[str, str]]:
    """(source of a function, its standard-library package) for the packages of :data:`PACKAGES`
    present here, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for pkg in PACKAGES:
        found = []
        for f in sorted((root / pkg).rglob("*.py")):
            if "test" in f.relative_to(root).parts[1:-1] or f.name.startswith("test"):
                continue
            try:
                text = f.read_text(encoding="utf-8")
                tree = ast.parse(text)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    src = ast.get_source_segment(text, node)
                    if src:
                        found.append(src)
        stride = max(1, len(found) // per_package)
        out += [(src, pkg) for src in found[::stride][:per_package]]
    return out


def read_labelled(path: Path) -> list[tuple[str, str]]:
    """(text, label) records of a ``.jsonl`` or ``.csv`` file."""
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise ConfigError(f"data.path={str(path)!r}: classification reads a .jsonl or .csv file of text and "
                              "label; or leave data.path unset for the built-in standard-library set")
        return [(str(r["text"]), str(r["label"])) for r in rows]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"data.path={str(path)!r}: every record needs a 'text' and a 'label' ({e})") from None


class Classification(OneLabelTask):
    """Batches: ``input_ids``, ``token_type_ids``, ``attention_mask`` (B, T) and ``labels`` (B,)."""

    name = "classification"
    tokenizer_kind = "wordpiece"
    # the tokens it needs of a tokenizer that came with a model (a Hugging Face BERT's)
    special_tokens = ("[CLS]", "[SEP]", "[PAD]")

    @classmethod
    def from_data(cls, data, block_size: int, batch_size: int, seed: int) -> Classification:
        examples = getattr(data, "examples", None)  # (token ids, label name) pairs, already encoded
        if examples is None:
            special = getattr(data.tokenizer, "special_ids", None)
            if special is None:
                raise ConfigError(f"train.task=classification needs a WordPiece tokenizer ([CLS] [SEP] [PAD]); the "
                                  f"data uses {data.tokenizer.kind}: set data.tokenizer=wordpiece (or auto)")
            source = data.meta.get("source", "python-stdlib")
            texts = stdlib_functions() if source == "python-stdlib" else read_labelled(Path(source))
            encoded = encode_texts(data.tokenizer, [t for t, _ in texts])
            examples = [(ids, label) for ids, (_, label) in zip(encoded, texts)]
            special_ids = special
        else:
            special_ids = data.tokenizer.special_ids
        return cls(examples, special_ids, block_size, batch_size, seed)

    def __init__(self, examples: list[tuple[list[int], str]], special: dict[str, int], block_size: int,
                 batch_size: int, seed: int):
        self.label_names = sorted({label for _, label in examples})
        if len(self.label_names) < 2 or len(examples) < 10:
            raise ConfigError(f"classification needs at least 10 examples of 2 or more labels; the data holds "
                              f"{len(examples)} of {len(self.label_names)}")
        self.n_classes = len(self.label_names)
        index = {name: i for i, name in enumerate(self.label_names)}
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.cls_id, self.sep_id, self.pad_id = special["[CLS]"], special["[SEP]"], special["[PAD]"]
        order = np.random.default_rng(0).permutation(len(examples))  # the same held-out split for every run
        n_val = max(1, int(HELD_OUT * len(examples)))
        rows = self._encode([examples[i][0] for i in order])
        labels = np.array([index[examples[i][1]] for i in order], dtype=np.int64)
        self.val, self.train = (tuple(a[:n_val] for a in rows) + (labels[:n_val],),
                                tuple(a[n_val:] for a in rows) + (labels[n_val:],))
        self.majority = int(np.bincount(self.train[-1], minlength=self.n_classes).argmax())

    def _encode(self, token_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pack_rows(token_lists, self.cls_id, self.sep_id, self.pad_id, self.block_size)

    @staticmethod
    def _batch(ids, mask, labels) -> Batch:
        ids = torch.from_numpy(np.ascontiguousarray(ids))
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
                "attention_mask": torch.from_numpy(np.ascontiguousarray(mask)),
                "labels": torch.from_numpy(np.ascontiguousarray(labels))}

    @classmethod
    def text_batch(cls, tokenizer, texts: list[str], block_size: int) -> Batch:
        """``texts`` as the model reads them in training (``loom predict``); ``labels`` all 0."""
        special = tokenizer.special_ids
        ids, mask = pack_rows(encode_texts(tokenizer, texts), special["[CLS]"], special["[SEP]"], special["[PAD]"],
                              block_size)
        return cls._batch(ids, mask, np.zeros(len(texts), dtype=np.int64))

    def train_batch(self, step: int, rows: slice) -> Batch:
        pick = np.random.default_rng([self.seed, step]).integers(len(self.train[-1]), size=self.batch_size)[rows]
        return self._batch(*(a[pick] for a in self.train))

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        n = len(self.val[-1])
        for k in range(min(max_batches, -(-n // self.batch_size))):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            yield self._batch(*(a[sl] for a in self.val))

    @staticmethod  # loom predict calls it on the class
    def inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
        return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's WordPiece ids, without the line and document marks ([NL], end-of-text) the tokenizer
    puts in a corpus."""
    special = tokenizer.special_ids
    boundaries = {special[k] for k in ("[NL]", "<|endoftext|>") if k in special}
    return [[i for i in ids if i not in boundaries] for ids in tokenizer.encode_batch(texts)]


def pack_rows(token_lists: list[list[int]], cls_id: int, sep_id: int, pad_id: int,
              block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] tokens [SEP]`` rows cut to ``block_size`` and padded: ids and padding mask (n, T)."""
    ids = np.full((len(token_lists), block_size), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), block_size), dtype=np.int64)
    for r, toks in enumerate(token_lists):
        row = [cls_id, *toks[: block_size - 2], sep_id]
        ids[r, : len(row)], mask[r, : len(row)] = row, 1
    return ids, mask

