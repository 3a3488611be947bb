"""A sequence-to-sequence run at inference: a source text to its ids, decoding batches of sources to
texts, and scoring them: corpus BLEU (Papineni et al. 2002, as sacrebleu computes it, Post 2018) and
exact match, beside the two baselines any sequence-to-sequence result must beat: copying the source,
and predicting the training set's most common target for every source.

**Texts.** Predictions, references, sources and the most common target are all compared as the
run's tokenizer writes their ids back as text (special tokens left out), so that a prediction equal
to its reference token for token is an exact match whatever the tokenizer normalizes (WordPiece's
spacing around punctuation, for instance).

BLEU is sacrebleu's ``corpus_bleu`` with its defaults (13a tokenization, exponential smoothing,
mixed case, one reference), and its signature is reported with the score so that a figure says how
it was computed. Exact match is the percentage of predictions equal to their reference once runs
of whitespace are made single spaces (a string comparison: no library needed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from sacrebleu.metrics import BLEU
from torch import nn

from loom.infer.decode import decode
from loom.tasks import Task
from loom.tasks.seq2seq import pair_tokens
from loom.train.precision import autocast

IGNORE = -100  # labels of padding positions (the seq2seq task's)


def _norm(s: str) -> str:
    return " ".join(s.split())


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (0–100) and exact match (% of rows) of ``predictions`` against ``references``."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    bleu = BLEU().corpus_score(list(predictions), [list(references)])
    same = sum(_norm(p) == _norm(r) for p, r in zip(predictions, references))
    return {"bleu": round(bleu.score, 2), "exact_match": round(100.0 * same / len(references), 2)}


def most_common(targets: Sequence[str]) -> str:
    """The most frequent of ``targets`` (the first seen among equally frequent ones)."""
    return Counter(targets).most_common(1)[0][0]


def baselines(sources: Sequence[str], references: Sequence[str], train_targets: Sequence[str]) -> dict:
    """BLEU and exact match of copying each source, and of always predicting the most common
    training target."""
    common = most_common(train_targets)
    return {"copy_source": text_scores(sources, references),
            "most_common_target": {**text_scores([common] * len(references), references), "target": common}}


def bleu_signature() -> str:
    """sacrebleu's description of the BLEU computed here (tokenizer, smoothing, case, version)."""
    bleu = BLEU()
    bleu.corpus_score(["a"], [["a"]])  # the signature needs the number of references, known once scored
    return str(bleu.get_signature())


@torch.no_grad()
def decode_texts(model: nn.Module, sources: Sequence[list[int]], detokenize: Callable[[list[int]], str], *,
                 bos_id: int, eos_id: int, pad_id: int, max_len: int, beam: int = 1, alpha: float = 0.6,
                 batch_size: int = 32, vocab_size: int | None = None, device: torch.device | str = "cpu",
                 use_cache: bool = True) -> list[str]:
    """Decode the token-id ``sources`` in batches (right-padded with ``pad_id``, a mask marking the
    padding) and return the detokenized predictions, in order."""
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        chunk = sources[i : i + batch_size]
        width = max(len(s) for s in chunk)
        src = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, s in enumerate(chunk):
            src[r, : len(s)], mask[r, : len(s)] = torch.tensor(s, dtype=torch.long), True
        ids = decode(model, src.to(device), bos_id, eos_id, max_len, beam=beam, alpha=alpha,
                     src_mask=mask.to(device), use_cache=use_cache, vocab_size=vocab_size)
        out += [detokenize(row) for row in ids]
    return out


def special_ids(tokenizer) -> dict[str, int]:
    """The ids a seq2seq run decodes with, the task's (:func:`~loom.tasks.seq2seq.pair_tokens`)."""
    tokens = pair_tokens(tokenizer)
    return {"pad_id": tokens.pad_id, "bos_id": tokens.bos_id, "eos_id": tokens.eos_id}


def detokenizer(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text, the markers (padding, bos, eos, line ends, document ends) left out; an unknown
    piece stays as it is written ([UNK], <unk>)."""
    drop = pair_tokens(tokenizer).hidden
    return lambda ids: tokenizer.decode([i for i in ids if i not in drop])


def _target_rows(labels) -> list[list[int]]:
    """The target ids of each row of a labels array (padding and the final eos left out)."""
    return [[int(i) for i in row if i != IGNORE][:-1] for row in labels]


@torch.no_grad()
def evaluate_seq2seq(model: nn.Module, task: Task, tokenizer, *, beam: int = 1, alpha: float = 0.6,
                     examples: int | None = None, batch_size: int = 32, device: torch.device | str = "cpu",
                     precision: str = "fp32") -> dict:
    """Decode the task's held-out sources (the first ``examples`` of them, or all) and score the
    predictions: BLEU, exact match, and the two baselines on the same pairs.

    Reads the task's encoded splits (``val`` and ``train``: source ids, source mask, decoder input,
    labels), its ``pad_id``/``bos_id``/``eos_id`` and ``target_len`` (the longest target + eos it
    trained on, the decoding length bound)."""
    src, mask, _, labels = task.val
    n = len(src) if examples is None else min(examples, len(src))
    sources = [[int(i) for i in row[m.astype(bool)]] for row, m in zip(src[:n], mask[:n])]
    detok = detokenizer(tokenizer)
    model.eval()
    with autocast(torch.device(device), precision):
        predictions = decode_texts(model, sources, detok, bos_id=task.bos_id, eos_id=task.eos_id,
                                   pad_id=task.pad_id, max_len=task.target_len, beam=beam, alpha=alpha,
                                   batch_size=batch_size, vocab_size=tokenizer.vocab_size, device=device)
    references = [detok(t) for t in _target_rows(labels[:n])]
    source_texts = [detok(s[:-1]) for s in sources]
    train_targets = [detok(t) for t in _target_rows(task.train[3])]
    return {"examples": n, "decoding": "greedy" if beam == 1 else f"beam {beam}, length penalty alpha {alpha:g}",
            **text_scores(predictions, references), "bleu_signature": bleu_signature(),
            "baselines": baselines(source_texts, references, train_targets),
            "samples": [{"prediction": p, "reference": r} for p, r in zip(predictions[:3], references[:3])]}
