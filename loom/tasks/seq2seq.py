"""Sequence-to-sequence learning with an encoder-decoder (Sutskever et al. 2014; Vaswani et al. 2017):
the training half (teacher forcing, label smoothing, loss, perplexity, token accuracy).

**Data.** ``data.path``: a ``.jsonl`` file (or folder of them) of ``{"source": ..., "target": ...}``
records. By default (no ``data.path``), a real pair set made from this machine's Python standard
library, no download: every function (``def``, ``async def``) with a docstring, outside the test
suites, its source *with the docstring removed* as the source (its signature first, then its
decorators and body, cut to 12 lines) and the docstring's first sentence as the target
(:func:`stdlib_docstring_pairs`; kept when that sentence has 3 to 30 words; a function whose source
repeats an earlier one's is left out). A fixed 10% of the pairs (the same whatever the seed, so that
runs compare on the same ones) is held out. The pairs are written once into the cache as one
``.jsonl`` file (:func:`pair_corpus`), which is what the data is prepared from: the tokenizer learns
from sources and targets, and nothing else is encoded.

**Tokens.** One tokenizer for source and target; its special tokens are the task's ``pad_id``,
``bos_id`` (the decoder's first input) and ``eos_id`` (:func:`pair_tokens`). loom's WordPiece
(``data.tokenizer=auto`` picks it; a BERT's too): ``[PAD]`` pads, ``[CLS]`` starts the decoder's
input, ``[SEP]`` ends source and target. A tokenizer that came with a model and names a padding
token (T5's, ``train.init_from=T5_DIR``), as T5 was trained: ``<pad>`` pads and starts the decoder's
input, its end-of-sequence token (``</s>``) ends source and target. No token starts the source. The
source is cut to ``model.block_size - 1`` tokens plus eos; the target to ``target_len - 1`` tokens
plus eos, where ``target_len`` is the longest training target + 1 rounded up to a multiple of 16 (so
that sequence parallelism splits it evenly, as it splits ``model.block_size``), at most
``model.block_size``: fixed for the run, so every batch has one shape.

**Teacher forcing.** The decoder reads ``[bos] y_1 .. y_{n-1}`` and predicts ``y_1 .. y_n [eos]``.

**Loss.** Cross-entropy with label smoothing ε (``train.label_smoothing``; as published: 0.1 for the
``transformer-*`` presets, Vaswani et al. section 5.4) summed over the target tokens of a micro-batch
and divided by the *global* batch's count of them, carried in every row as ``tgt_weight`` = count /
rows (as masked-LM does), so that any layout computes one process's loss and gradients. Smoothing is
a training regularizer: where no gradient is taken (evaluation) the loss is the plain cross-entropy,
so ``val_loss`` and perplexity are the model's. ``loom eval`` adds token accuracy.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loom.errors import ConfigError
from loom.models.common.numerics import at_least_fp32
from loom.tasks.base import Batch, Task, read_jsonl_pairs

IGNORE = -100
HELD_OUT = 0.1
PAIRS_FORMAT = 2  # the built-in pair set's recipe: a new one makes a new cached file
TARGET_MULTIPLE = 16  # target length rounded up to it: sequence parallelism splits it evenly over tp ranks
MIN_WORDS, MAX_WORDS = 3, 30  # first sentences kept as targets
MAX_SOURCE_LINES = 12  # a source's first lines: more than a block of tokens holds, and what the tokenizer learns
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _local(t):
    # a vocabulary-parallel loss (tensor parallelism) is a replicated distributed tensor
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def first_sentence(docstring: str) -> str | None:
    """The first sentence of a docstring's first paragraph, its whitespace collapsed; None when it is
    not a sentence of :data:`MIN_WORDS` to :data:`MAX_WORDS` words."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    sentence = _SENTENCE_END.split(paragraph, maxsplit=1)[0].strip()
    return sentence if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS else None


def function_pairs(text: str) -> list[tuple[str, str]]:
    """(source without its docstring, the docstring's first sentence) of every documented function in
    the Python module ``text``. The source is the function's signature first (its name leads), then its
    decorators, then its body, blank lines left out, cut to its first :data:`MAX_SOURCE_LINES` lines."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        target = first_sentence(doc) if doc else None
        if target is None:
            continue
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        expr = node.body[0]  # the docstring's statement
        if len(node.body) == 1:  # nothing but the docstring: the body is empty without it
            continue
        signature, decorators = lines[node.lineno - 1:expr.lineno - 1], lines[first - 1:node.lineno - 1]
        kept = [s for s in signature + decorators + lines[expr.end_lineno:node.end_lineno] if s.strip()]
        kept = kept[:MAX_SOURCE_LINES]
        indent = min((len(s) - len(s.lstrip()) for s in kept), default=0)
        out.append(("\n".join(s[indent:] for s in kept), target))
    return out


def stdlib_docstring_pairs() -> list[tuple[str, str]]:
    """The built-in pair set: :func:`function_pairs` of every standard-library module outside test
    suites and ``idlelib``, in a fixed order."""
    from loom.data.corpus import stdlib_files

    pairs, seen = [], set()
    for f in stdlib_files():
        parts = {p.lower() for p in f.parts}
        if parts & {"test", "tests", "idle_test", "idlelib"} or f.name.startswith("test_"):
            continue
        try:
            found = function_pairs(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        for source, target in found:  # a function copied between modules once (its first copy)
            if source not in seen:
                seen.add(source)
                pairs.append((source, target))
    return pairs


def pair_corpus(path: str | None, cache_dir: str | None = None) -> tuple[str, str]:
    """What a seq2seq run's data is prepared from: one ``.jsonl`` file in the cache of its pairs (the
    built-in ones, or those of ``data.path``), each record's ``text`` its source and target, one line
    after the other, so that the tokenizer learns from both sides and only the pairs are encoded.
    Made once per pair set (the built-in one: per Python installation and :data:`PAIRS_FORMAT`; the
    user's: per the files' paths, sizes and modification times) -> (file, the field to read)."""
    from loom.data.dataset import cache_root

    if path is None:
        key, make, name = f"{PAIRS_FORMAT}|{sys.version}|{sys.prefix}", stdlib_docstring_pairs, "stdlib"
    else:
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in _pair_files(path)]
        key, make, name = json.dumps([PAIRS_FORMAT, stats]), lambda: read_pairs(path), "pairs"
    out = cache_root(cache_dir) / "seq2seq" / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.jsonl"
    if not out.is_file():
        records = [{"source": a, "target": b, "text": f"{a}\n{b}"} for a, b in make()]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        tmp.replace(out)
    return str(out), "text"


def _pair_files(source: str) -> list[Path]:
    """The ``.jsonl`` files of ``data.path`` (a file, or a folder searched recursively)."""
    path = Path(source).expanduser()
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".jsonl" for f in files):
        raise ConfigError(f"data.path={source!r}: seq2seq reads .jsonl files of {{source, target}} records; "
                          "or leave data.path unset for the built-in standard-library pairs")
    return files


def read_pairs(source: str) -> list[tuple[str, str]]:
    """The {source, target} records of a ``.jsonl`` file or a folder of them."""
    return read_jsonl_pairs(_pair_files(source), ("source", "target"), "seq2seq")


@dataclass(frozen=True)
class PairTokens:
    """The special ids a seq2seq run reads and writes with, from its tokenizer (:func:`pair_tokens`)."""

    pad_id: int
    bos_id: int  # the decoder's first input
    eos_id: int  # ends the source and the target
    strip_source: frozenset[int] = frozenset()  # marks the tokenizer puts in a corpus, not part of a text
    strip_target: frozenset[int] = frozenset()
    hidden: frozenset[int] = frozenset()  # ids a prediction's text leaves out


def pair_tokens(tokenizer) -> PairTokens:
    """The special ids of ``tokenizer`` for seq2seq: a WordPiece's ``[PAD]``, ``[CLS]`` (the decoder's
    start) and ``[SEP]`` (the end), its document and line marks stripped from the texts (a target is
    one line); else, a tokenizer that names a padding token (T5's), that token as padding and the
    decoder's start and its end-of-sequence token as the end, as T5 was trained (Raffel et al. 2020)."""
    wordpiece = getattr(tokenizer, "special_ids", None)
    if wordpiece is not None:
        doc, nl = wordpiece.get("<|endoftext|>"), wordpiece.get("[NL]")
        marks = [wordpiece[t] for t in ("[PAD]", "[CLS]", "[SEP]")] + [wordpiece.get("[MASK]"), doc, nl]
        return PairTokens(wordpiece["[PAD]"], wordpiece["[CLS]"], wordpiece["[SEP]"],
                          strip_source=frozenset({doc} - {None}), strip_target=frozenset({doc, nl} - {None}),
                          hidden=frozenset(marks) - {None})
    pad = getattr(tokenizer, "pad_id", None)
    if pad is None:
        raise ConfigError(f"train.task=seq2seq needs a tokenizer with a padding token: loom's WordPiece "
                          f"(data.tokenizer=wordpiece, or auto) or a model's that names one (T5's <pad>); this one "
                          f"({tokenizer.kind}) has none")
    return PairTokens(pad, pad, tokenizer.eos_id, hidden=frozenset({pad, tokenizer.eos_id}))


def seq2seq_loss(logits, targets, label_smoothing: float = 0.0) -> torch.Tensor:
    """Logits (B, T, V), (labels (B, T) with -100 at padding, tgt_weight (B,)) -> this micro-batch's
    share of the global batch's mean loss per target token.

    Label smoothing as ``F.cross_entropy`` defines it, (1 - ε)·NLL + ε·mean over the vocabulary of
    -log p, written as NLL + ε·Σ (z_y - mean_v z_v) (the same sum: -mean_v log p_v = NLL + z_y - mean_v z_v
    per position) so that it runs exactly on vocabulary-parallel logits (:func:`_smoothing_term`)."""
    labels, weight = targets
    logits = at_least_fp32(logits).flatten(0, 1)  # (B·T, V)
    labels = labels.flatten()
    loss = _local(F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
    if label_smoothing and torch.is_grad_enabled():
        loss = loss + label_smoothing * _local(_smoothing_term(logits, labels))
    return loss / weight.sum().to(loss.dtype)


def _smoothing_term(logits, labels) -> torch.Tensor:
    """Σ over the target positions of z_y - mean_v z_v: what smoothing adds to the NLL, linear in the
    logits (B·T, V). Linear on purpose: under tensor parallelism the logits are split over the
    vocabulary and torch's ``loss_parallel`` gives ``log_softmax`` no backward of its own (it leaves the
    gradient to ``nll_loss``), so a smoothing term built on ``log_softmax`` gets wrong gradients there;
    a weighted sum of the logits is an ordinary reduction whose gradient is exact on any split."""
    vocab = logits.shape[-1]
    cols = torch.arange(vocab, device=labels.device)
    split = hasattr(logits, "device_mesh")  # a DTensor: weigh this rank's vocabulary columns only
    if split:
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

        on_cols = [Shard(0) if p.is_shard(logits.ndim - 1) else Replicate() for p in logits.placements]
        cols = distribute_tensor(cols, logits.device_mesh, on_cols, src_data_rank=None).to_local()
    scored = (labels != IGNORE).to(logits.dtype)[:, None]
    w = ((labels[:, None] == cols).to(logits.dtype) - 1.0 / vocab) * scored  # (B·T, V or this rank's V / tp)
    if split:
        w = DTensor.from_local(w, logits.device_mesh, logits.placements, run_check=False)
    return (logits * w).sum()


def label_smoothing_of(cfg) -> float:
    """``train.label_smoothing``, or as the preset was published: 0.1 for ``transformer-*``, else 0."""
    eps = cfg.train.label_smoothing
    return eps if eps is not None else (0.1 if cfg.model.preset.startswith("transformer-") else 0.0)


def _text_ids(tokenizer, texts: list[str], strip: frozenset[int]) -> list[list[int]]:
    """Each text's ids without the marks ``strip`` (a corpus's document or line ends)."""
    return [[i for i in ids if i not in strip] for ids in tokenizer.encode_batch(texts)]


def _ended(ids: list[int], eos: int, length: int) -> list[int]:
    """``ids`` cut to ``length - 1``, then eos: a source or target row before padding."""
    return [*ids[: length - 1], eos]


class Seq2Seq(Task):
    """Batches: ``src_ids``, ``src_mask`` (B, S); ``tgt_in``, ``labels`` (B, T); ``tgt_weight`` (B,)."""

    name = "seq2seq"
    tokenizer_kind = "wordpiece"  # data.tokenizer=auto: loom's WordPiece
    text_corpus = staticmethod(pair_corpus)  # what its data is prepared from (its pairs, not data.path itself)

    @staticmethod
    def check_tokenizer(tokenizer) -> None:
        """A model directory's tokenizer (``train.init_from``) that seq2seq cannot use is one line."""
        pair_tokens(tokenizer)

    @classmethod
    def from_data(cls, data, block_size: int, batch_size: int, seed: int) -> Seq2Seq:
        pairs = getattr(data, "pairs", None)  # (source ids, target ids), already encoded (tests)
        tokens = pair_tokens(data.tokenizer)
        if pairs is None:
            texts = read_pairs(data.meta["source"])  # the file of pairs it was prepared from (pair_corpus)
            src = _text_ids(data.tokenizer, [s for s, _ in texts], tokens.strip_source)
            tgt = _text_ids(data.tokenizer, [t for _, t in texts], tokens.strip_target)
            pairs = list(zip(src, tgt))
        return cls(pairs, tokens, block_size, batch_size, seed)

    @staticmethod
    def encode_source(tokenizer, text: str, block_size: int) -> list[int]:
        """A source text as the encoder reads it in training (``loom generate``): its ids without the
        tokenizer's corpus marks, cut to ``block_size - 1``, then eos."""
        tokens = pair_tokens(tokenizer)
        return _ended(_text_ids(tokenizer, [text], tokens.strip_source)[0], tokens.eos_id, block_size)

    def __init__(self, pairs: list[tuple[list[int], list[int]]], tokens: PairTokens, block_size: int,
                 batch_size: int, seed: int):
        pairs = [(s, t) for s, t in pairs if s and t]
        if len(pairs) < 10:
            raise ConfigError(f"seq2seq needs at least 10 pairs with a non-empty source and target; the data "
                              f"holds {len(pairs)}")
        if block_size < 4:
            raise ConfigError(f"model.block_size={block_size} is too short for seq2seq; use at least 4")
        self.special = tokens
        self.pad_id, self.bos_id, self.eos_id = tokens.pad_id, tokens.bos_id, tokens.eos_id
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.label_smoothing = 0.0
        order = np.random.default_rng(0).permutation(len(pairs))  # the same held-out split for every run
        n_val = max(1, int(HELD_OUT * len(pairs)))
        val, train = [pairs[i] for i in order[:n_val]], [pairs[i] for i in order[n_val:]]
        longest = max(len(t) for _, t in train) + 1
        self.target_len = min(block_size, -(-longest // TARGET_MULTIPLE) * TARGET_MULTIPLE)
        self.train, self.val = self._encode(train), self._encode(val)
        # what a model that ignores the source scores: the entropy of the training targets' tokens
        labels = self.train[3][self.train[3] != IGNORE]
        p = np.bincount(labels)[np.bincount(labels) > 0] / labels.size
        self.unigram_entropy = float(-(p * np.log(p)).sum())

    def configure(self, cfg) -> None:
        """Settings beyond the batches: label smoothing (``train.label_smoothing``, or the preset's)."""
        self.label_smoothing = label_smoothing_of(cfg)

    def _encode(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, ...]:
        """-> source ids, source mask (B, S); decoder input, labels (B, T)."""
        n, s, t = len(pairs), self.block_size, self.target_len
        src = np.full((n, s), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, s), dtype=np.int64)
        tgt_in = np.full((n, t), self.pad_id, dtype=np.int64)
        labels = np.full((n, t), IGNORE, dtype=np.int64)
        for r, (a, b) in enumerate(pairs):
            a, b = _ended(a, self.eos_id, s), _ended(b, self.eos_id, t)
            src[r, : len(a)], mask[r, : len(a)] = a, 1
            tgt_in[r, : len(b)] = [self.bos_id, *b[:-1]]
            labels[r, : len(b)] = b
        return src, mask, tgt_in, labels

    @staticmethod
    def _batch(src, mask, tgt_in, labels) -> Batch:
        count = float((labels != IGNORE).sum())
        rows = len(labels)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        return {"src_ids": as_t(src), "src_mask": as_t(mask), "tgt_in": as_t(tgt_in), "labels": as_t(labels),
                # every row carries the batch's target tokens per row: a slice's sum is its share
                "tgt_weight": torch.full((rows,), count / rows, dtype=torch.float64)}

    def train_batch(self, step: int, rows: slice) -> Batch:
        pick = np.random.default_rng([self.seed, step]).integers(len(self.train[0]), size=self.batch_size)
        whole = self._batch(*(a[pick] for a in self.train))  # the whole global batch: its count is global
        return {k: v[rows] for k, v in whole.items()}

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        """Whole batches of the held-out pairs (the last, partial one left out), or the pairs there
        are when they do not fill one."""
        n = len(self.val[0])
        for k in range(min(max_batches, max(n // self.batch_size, 1))):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            yield self._batch(*(a[sl] for a in self.val))

    # -- model and loss ---------------------------------------------------------------------

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return batch["src_ids"], batch["src_mask"], batch["tgt_in"]

    def targets(self, batch: Batch):
        return batch["labels"], batch["tgt_weight"]

    def loss(self, outputs, targets) -> torch.Tensor:
        return seq2seq_loss(outputs, targets, self.label_smoothing)

    def units(self, batch: Batch) -> float:
        """Target tokens of ``batch``, as its rows' share of its global batch's count."""
        return float(batch["tgt_weight"].sum())

    def metrics(self, loss_sum: float, units: int) -> dict:
        if units == 0:
            raise ValueError("evaluation saw no target tokens")
        loss = loss_sum / units
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": units}

    # -- detailed evaluation (loom eval, one device) ------------------------------------------

    def eval_counts(self, outputs, batch: Batch) -> dict[str, float]:
        labels = batch["labels"]
        scored = labels != IGNORE
        ce = F.cross_entropy(at_least_fp32(outputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                             reduction="sum")
        return {"ce": float(ce), "tokens": float(scored.sum()),
                "correct": float((outputs.argmax(-1)[scored] == labels[scored]).sum())}

    def count_metrics(self, c: dict[str, float]) -> dict:
        loss = c["ce"] / c["tokens"]
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "token_accuracy": c["correct"] / c["tokens"],
                "unigram_entropy": self.unigram_entropy}
