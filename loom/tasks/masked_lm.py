"""BERT's pretraining (Devlin et al. 2018, section 3.1): masked-LM and next-sentence prediction.

**Sentences.** The corpus is tokenized with WordPiece (``data.tokenizer=wordpiece``, what ``auto``
picks for this task), which ends every non-blank line with [NL]: a *sentence* is one non-blank line
(for the default corpus, the standard library's source: a physical line of Python). Documents (files)
end with ``<|endoftext|>``; neither boundary token is ever shown to the model.

**A pair.** Segment A is one or more consecutive sentences of a document, up to a length drawn
uniformly from [1, T-4]; with probability 1/2 segment B is the sentences that follow A in the same
document (label 0, IsNext), otherwise sentences starting at a random sentence of the corpus (label 1,
NotNext). The pair is cut to fit (the longer segment loses tokens at its end) and laid out as
``[CLS] A [SEP] B [SEP]``, segment ids 0 up to the first [SEP] and 1 after, padded with [PAD] to
``model.block_size``; the attention mask is 1 at real tokens.

**Masking.** Of each pair's tokens (not [CLS], [SEP] or padding), round(15%) (at least one) are
chosen; each chosen token becomes [MASK] with probability 0.8, a random non-special token with 0.1,
and stays with 0.1; the model predicts the original at every chosen position.

**Loss.** The masked-LM cross-entropy summed over the predicted tokens of a micro-batch and divided by
the *global* batch's count of them — carried in every row as ``mlm_weight`` = count / rows, so that a
micro-batch divides by its rows' share — plus the next-sentence cross-entropy averaged over rows. A
layout in which ranks see different numbers of predicted tokens then computes exactly the loss and
gradients of one process on the whole batch (every averaging the engine does is over equal numbers
of rows, and each piece's loss is its sum over the global count times the number of pieces).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from loom.errors import ConfigError
from loom.models.common.numerics import at_least_fp32
from loom.tasks.base import Batch, Task

MASK_FRACTION = 0.15
IGNORE = -100  # cross_entropy's ignore_index: positions that are not predicted
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>", "[NL]")


def _local(t):
    # a vocabulary-parallel loss (tensor parallelism) is a replicated distributed tensor: its local
    # value is the whole loss, differentiably
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def mlm_nsp_loss(outputs, targets) -> torch.Tensor:
    """(masked-LM logits (B, T, V), next-sentence logits (B, 2)), (labels (B, T) with -100 where not
    predicted, next-sentence labels (B,), mlm_weight (B,)) -> the loss of this micro-batch."""
    mlm_logits, nsp_logits = outputs
    labels, nsp_labels, weight = targets
    ce = _local(F.cross_entropy(at_least_fp32(mlm_logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                reduction="sum"))
    nsp = F.cross_entropy(at_least_fp32(nsp_logits), nsp_labels)
    return ce / weight.sum().to(ce.dtype) + nsp


def mask_tokens(ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, mask_id: int,
                first_normal: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one sequence: of the positions ``candidates``, round(15%) (at least one) are
    chosen; 80% of them become ``mask_id``, 10% a random id in [first_normal, vocab), 10% stay.
    Returns (the new ids, labels: the original id at chosen positions, -100 elsewhere)."""
    ids = ids.copy()
    labels = np.full_like(ids, IGNORE)
    n = max(1, round(MASK_FRACTION * len(candidates)))
    chosen = rng.choice(candidates, size=n, replace=False)
    labels[chosen] = ids[chosen]
    r = rng.random(n)
    ids[chosen[r < 0.8]] = mask_id
    swap = chosen[(r >= 0.8) & (r < 0.9)]
    ids[swap] = rng.integers(first_normal, vocab, size=len(swap))
    return ids, labels


class SentenceCorpus:
    """A token stream cut into sentences (runs between [NL] / end-of-document tokens)."""

    def __init__(self, tokens: np.ndarray, boundary_ids: tuple[int, ...], eos_id: int):
        tokens = np.asarray(tokens)
        is_boundary = np.isin(tokens, boundary_ids)
        ends = np.flatnonzero(is_boundary)  # each sentence ends before a boundary token
        starts = np.concatenate([[0], ends[:-1] + 1])
        doc = np.concatenate([[0], np.cumsum(tokens[ends] == eos_id)[:-1]])  # documents ended before it
        keep = ends > starts
        self.tokens = tokens
        self.start, self.end, self.doc = starts[keep], ends[keep], doc[keep]
        self.length = self.end - self.start
        self.cum = np.concatenate([[0], np.cumsum(self.length)])
        # sentences followed by another of the same document: where a pair can start
        self.has_next = np.flatnonzero(self.doc[:-1] == self.doc[1:])
        self.doc_last = np.empty(len(self.start), dtype=np.int64)  # last sentence of each sentence's document
        bounds = np.flatnonzero(np.diff(self.doc)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(self.start)]])):
            self.doc_last[lo:hi] = hi - 1

    def __len__(self) -> int:
        return len(self.start)

    def take(self, first: int, budget: int, last: int) -> tuple[np.ndarray, int]:
        """Consecutive sentences from ``first`` (at most up to sentence ``last``) until ``budget``
        tokens are reached: their tokens, without boundaries (possibly more than ``budget``), and the
        sentence after them."""
        j = int(np.searchsorted(self.cum, self.cum[first] + budget, side="left"))
        j = min(max(j, first + 1), last + 1)
        return np.concatenate([self.tokens[self.start[k]:self.end[k]] for k in range(first, j)]), j


class MaskedLM(Task):
    """Masked-LM + next-sentence prediction (BERT). Batches: ``input_ids``, ``token_type_ids``,
    ``attention_mask``, ``labels``, ``nsp_labels``, ``mlm_weight``."""

    name = "masked_lm"
    tokenizer_kind = "wordpiece"

    @classmethod
    def from_data(cls, data, block_size: int, batch_size: int, seed: int) -> MaskedLM:
        special = getattr(data.tokenizer, "special_ids", None)
        if special is None:
            raise ConfigError(f"train.task=masked_lm needs a WordPiece tokenizer ([CLS] [SEP] [MASK] [PAD]); the data "
                              f"uses {data.tokenizer.kind}: set data.tokenizer=wordpiece (or auto)")
        return cls(data.train, data.val, block_size, batch_size, seed, special, data.tokenizer.vocab_size)

    def __init__(self, train: np.ndarray, val: np.ndarray, block_size: int, batch_size: int, seed: int,
                 special: dict[str, int], vocab: int):
        if block_size < 8:
            raise ConfigError(f"model.block_size={block_size} is too short for a sentence pair; use at least 8")
        self.block_size, self.batch_size, self.seed, self.vocab = block_size, batch_size, seed, vocab
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = (special[t] for t in ("[CLS]", "[SEP]", "[PAD]",
                                                                                      "[MASK]"))
        self.first_normal = max(special.values()) + 1
        boundaries = (special["[NL]"], special["<|endoftext|>"])
        self.train, self.val = (SentenceCorpus(t, boundaries, special["<|endoftext|>"]) for t in (train, val))
        for split, corpus in (("train", self.train), ("val", self.val)):
            if len(corpus.has_next) == 0:
                raise ConfigError(f"the {split} split has no document of two sentences (non-blank lines); "
                                  "masked-LM pretraining needs more text")
        self._cached: tuple[int, Batch] | None = None
        # what a model that ignores context scores on the predicted tokens: the entropy of the training
        # sentences' tokens (boundaries excluded), the bar pretraining must get well below
        counts = np.bincount(self.train.tokens[~np.isin(self.train.tokens, boundaries)].astype(np.int64))
        p = counts[counts > 0] / counts.sum()
        self.unigram_entropy = float(-(p * np.log(p)).sum())

    # -- batches ----------------------------------------------------------------------------

    def pair(self, corpus: SentenceCorpus, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """Segments A and B and the next-sentence label (0: B follows A, 1: B is random)."""
        room = self.block_size - 3  # [CLS] A [SEP] B [SEP]
        i = int(corpus.has_next[rng.integers(len(corpus.has_next))])
        is_next = rng.random() < 0.5
        last = corpus.doc_last[i]
        a, j = corpus.take(i, int(rng.integers(1, room - 1)), last - 1 if is_next else last)
        start = j if is_next else int(rng.integers(len(corpus)))
        b, _ = corpus.take(start, room - min(len(a), room - 1), corpus.doc_last[start])
        while len(a) + len(b) > room:  # the longer segment loses its last token
            if len(a) > len(b):
                a = a[:-1]
            else:
                b = b[:-1]
        return a, b, 0 if is_next else 1

    def make_batch(self, corpus: SentenceCorpus, rng: np.random.Generator, rows: int) -> Batch:
        t = self.block_size
        ids = np.full((rows, t), self.pad_id, dtype=np.int64)
        types = np.zeros((rows, t), dtype=np.int64)
        mask = np.zeros((rows, t), dtype=np.int64)
        labels = np.full((rows, t), IGNORE, dtype=np.int64)
        nsp = np.zeros(rows, dtype=np.int64)
        for r in range(rows):
            a, b, nsp[r] = self.pair(corpus, rng)
            row = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
            n = len(row)
            candidates = np.concatenate([np.arange(1, 1 + len(a)), np.arange(2 + len(a), n - 1)])
            ids[r, :n], labels[r, :n] = mask_tokens(row, candidates, rng, self.mask_id, self.first_normal, self.vocab)
            types[r, 2 + len(a):n] = 1
            mask[r, :n] = 1
        predicted = (labels != IGNORE).sum()
        return {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
                "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(labels),
                "nsp_labels": torch.from_numpy(nsp),
                # every row carries the batch's predicted tokens per row: a slice's sum is its share
                "mlm_weight": torch.full((rows,), predicted / rows, dtype=torch.float64)}

    def train_batch(self, step: int, rows: slice) -> Batch:
        if self._cached is None or self._cached[0] != step:  # the whole global batch: its count is global
            rng = np.random.default_rng([self.seed, step])
            self._cached = (step, self.make_batch(self.train, rng, self.batch_size))
        return {k: v[rows] for k, v in self._cached[1].items()}

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        for k in range(max_batches):
            yield self.make_batch(self.val, np.random.default_rng([self.seed, 2**31, k]), self.batch_size)

    # -- model and loss ---------------------------------------------------------------------

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]

    def targets(self, batch: Batch):
        return batch["labels"], batch["nsp_labels"], batch["mlm_weight"]

    def loss(self, outputs, targets) -> torch.Tensor:
        return mlm_nsp_loss(outputs, targets)

    def units(self, batch: Batch) -> float:
        """Predicted tokens of ``batch``, as its rows' share of its global batch's count."""
        return float(batch["mlm_weight"].sum())

    def metrics(self, loss_sum: float, units: int) -> dict:
        if units == 0:
            raise ValueError("evaluation saw no predicted tokens")
        loss = loss_sum / units
        return {"val_loss": loss, "val_mlm_tokens": units}

    # -- detailed evaluation (loom eval, one device) ------------------------------------------

    def eval_counts(self, outputs, batch: Batch) -> dict[str, float]:
        """Sums over a batch that :meth:`count_metrics` turns into the masked-LM loss and accuracy and the
        next-sentence accuracy."""
        mlm_logits, nsp_logits = outputs
        labels = batch["labels"]
        ce = F.cross_entropy(at_least_fp32(mlm_logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                             reduction="sum")
        chosen = labels != IGNORE
        return {"mlm_ce": float(ce), "mlm_tokens": float(chosen.sum()),
                "mlm_correct": float((mlm_logits.argmax(-1)[chosen] == labels[chosen]).sum()),
                "nsp_correct": float((nsp_logits.argmax(-1) == batch["nsp_labels"]).sum()),
                "nsp_rows": float(len(batch["nsp_labels"]))}

    def count_metrics(self, c: dict[str, float]) -> dict:
        mlm = c["mlm_ce"] / c["mlm_tokens"]
        return {"mlm_loss": mlm, "mlm_ppl": math.exp(min(mlm, 50.0)), "mlm_unigram_entropy": self.unigram_entropy,
                "mlm_accuracy": c["mlm_correct"] / c["mlm_tokens"], "nsp_accuracy": c["nsp_correct"] / c["nsp_rows"]}
