"""Decoding an encoder-decoder model: greedy and beam search, with a KV cache.

The model is any module with

- ``encode(src_ids, src_mask) -> (memory, src_mask)``: run once per source batch (``src_mask``
  (B, S) is True at real source tokens, False at padding);
- ``decode(tgt_ids, memory, src_pad_mask, cache=None) -> logits`` (B, T, V): with a cache,
  ``tgt_ids`` are only the tokens not yet seen, the decoder's self-attention keys and values are
  appended to it and the cross-attention keys and values of ``memory`` are computed at its first
  call and kept;
- ``new_cache(batch, max_tgt_len)``: an empty cache whose ``reorder(index)`` keeps, in place, the
  batch rows ``index`` (a LongTensor of row numbers, repeats allowed) — how beam search follows the
  beams it keeps.

**Greedy** takes the most probable token at every step. **Beam search** (as in Wu et al. 2016,
"Google's Neural Machine Translation System", section 7) keeps the ``beam`` best partial
hypotheses of every source: at each step it scores all ``beam × V`` one-token extensions by their
summed log-probability, moves the extensions ending in ``eos`` to the source's finished
hypotheses, and keeps the best ``beam`` others. The encoder runs once; its memory is repeated for
the ``beam`` rows of each source, and all sources decode together (B × beam rows). Finished
hypotheses are ranked by log P(Y | X) / lp(Y), the length penalty

    lp(Y) = ((5 + |Y|) / 6) ** alpha        (alpha = 0: pure log-probability; Wu et al. use 0.6)

where ``|Y|`` counts the generated tokens, ``eos`` included. A hypothesis that reaches ``max_len``
tokens without ``eos`` is finished as it is. A source stops when its ``n_best``-th finished score
is at least the best score any live hypothesis could still reach: log-probabilities only fall as a
hypothesis grows and lp(Y) ≤ lp(max_len) for alpha ≥ 0, so that bound is exact, and the search
stops only when no hypothesis it still holds can win.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Hypothesis:
    """A decoded target: its tokens (no ``bos``, no ``eos``), its summed log-probability (``eos``'s
    included when it ended with one) and its score under the length penalty."""

    tokens: list[int]
    logprob: float
    score: float


def length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """Wu et al. (2016), eq. 14: ((5 + |Y|) / 6) ** alpha."""
    return ((5 + length) / 6) ** alpha


def _repeat_rows(x: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """Each batch row of ``x`` ``k`` times in a row (source b's beams are rows b·k … b·k + k − 1)."""
    return None if x is None else x.repeat_interleave(k, dim=0)


def _strip(row: list[int], eos_id: int) -> list[int]:
    return row[: row.index(eos_id)] if eos_id in row else row


def _next_logprobs(model: nn.Module, tokens: torch.Tensor, memory, src_mask, cache, vocab_size: int | None):
    """log P(next token | tokens, source) per row, (N, V); with a cache only the last token runs."""
    logits = model.decode(tokens[:, -1:] if cache is not None else tokens, memory, src_mask, cache)
    logits = logits[:, -1, :vocab_size]
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # at least fp32


def _check(max_len: int, beam: int = 1, n_best: int = 1, alpha: float = 0.0) -> None:
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be at least 1")
    if beam < 1 or not 1 <= n_best <= beam:
        raise ValueError(f"beam={beam} and n_best={n_best}: need beam >= 1 and 1 <= n_best <= beam")
    if alpha < 0:
        raise ValueError(f"length penalty alpha={alpha} must be >= 0")


@torch.no_grad()
def greedy_decode(model: nn.Module, src_ids: torch.Tensor, bos_id: int, eos_id: int, max_len: int,
                  src_mask: torch.Tensor | None = None, use_cache: bool = True,
                  vocab_size: int | None = None) -> list[list[int]]:
    """The most probable token at every step, for each source row of ``src_ids`` (B, S) (padding
    where ``src_mask`` is False), until ``eos`` or ``max_len`` generated tokens; returns the tokens
    of each row, ``eos`` left out. ``vocab_size``: choose only ids below it (a vocabulary padded for
    tensor parallelism)."""
    _check(max_len)
    memory, src_mask = model.encode(src_ids, src_mask)
    b = src_ids.size(0)
    cache = model.new_cache(b, max_len) if use_cache else None
    tokens = torch.full((b, 1), bos_id, dtype=torch.long, device=src_ids.device)
    done = torch.zeros(b, dtype=torch.bool, device=src_ids.device)
    for _ in range(max_len):
        nxt = _next_logprobs(model, tokens, memory, src_mask, cache, vocab_size).argmax(-1)  # (B,)
        nxt = nxt.masked_fill(done, eos_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    return [_strip(row[1:], eos_id) for row in tokens.tolist()]


@torch.no_grad()
def beam_search(model: nn.Module, src_ids: torch.Tensor, bos_id: int, eos_id: int, max_len: int, beam: int = 4,
                alpha: float = 0.6, n_best: int = 1, src_mask: torch.Tensor | None = None, use_cache: bool = True,
                vocab_size: int | None = None) -> list[list[Hypothesis]]:
    """The ``n_best`` best hypotheses (best first) of each source row of ``src_ids`` (B, S) found by
    a beam of ``beam``, ranked by log-probability / lp(Y) with length-penalty ``alpha``.
    ``use_cache=False`` recomputes the whole target prefix every step (same result, slower)."""
    _check(max_len, beam, n_best, alpha)
    memory, src_mask = model.encode(src_ids, src_mask)
    b, k, dev = src_ids.size(0), beam, src_ids.device
    fp = torch.promote_types(memory.dtype, torch.float32)  # scores: at least fp32 (fp64 for an fp64 model)
    memory, src_mask = _repeat_rows(memory, k), _repeat_rows(src_mask, k)  # (B·k, S, ...)
    cache = model.new_cache(b * k, max_len) if use_cache else None
    seqs = torch.full((b, k, 1), bos_id, dtype=torch.long, device=dev)  # bos + generated tokens
    alive = torch.full((b, k), float("-inf"), device=dev, dtype=fp)  # summed log-probabilities
    alive[:, 0] = 0.0  # one live hypothesis to start from: the others are copies, kept out
    fin_seq = torch.full((b, k, max_len), eos_id, dtype=torch.long, device=dev)  # generated tokens
    fin_score = torch.full((b, k), float("-inf"), device=dev, dtype=fp)  # sorted, best first
    fin_logp = torch.full((b, k), float("-inf"), device=dev, dtype=fp)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    rows = torch.arange(b, device=dev)[:, None]  # (B, 1)
    best_reachable = length_penalty(max_len, alpha)
    for t in range(max_len):
        logp = _next_logprobs(model, seqs.view(b * k, -1), memory, src_mask, cache, vocab_size)
        v = logp.size(-1)
        cand = (alive[:, :, None] + logp.view(b, k, v)).view(b, k * v)  # (B, k·V)
        # 2k candidates always hold k that do not end in eos: each beam has one eos extension
        top, idx = cand.topk(min(2 * k, k * v), dim=-1)  # (B, 2k)
        parent, tok = idx // v, idx % v
        grown = torch.cat([seqs[rows, parent], tok[..., None]], dim=-1)  # (B, 2k, t + 2), bos first
        last = t + 1 == max_len
        ends = (tok == eos_id) | last  # finished: eos, or max_len tokens without it
        new_score = torch.where(ends & ~done[:, None], top / length_penalty(t + 1, alpha), float("-inf"))
        pool_seq = torch.cat([fin_seq, F.pad(grown[..., 1:], (0, max_len - t - 1), value=eos_id)], dim=1)
        pool_score = torch.cat([fin_score, new_score], dim=1)
        pool_logp = torch.cat([fin_logp, top], dim=1)
        fin_score, keep = pool_score.topk(k, dim=-1)
        fin_seq, fin_logp = pool_seq[rows, keep], pool_logp[rows, keep]
        if last:
            break
        alive, pick = torch.where(tok == eos_id, float("-inf"), top).topk(k, dim=-1)  # (B, k)
        seqs, parent = grown[rows, pick], parent[rows, pick]
        if cache is not None:
            cache.reorder((rows * k + parent).view(-1))  # row b·k + j now continues beam parent[b, j]
        # no live hypothesis can still beat the n_best-th finished one: the source is done
        done |= fin_score[:, n_best - 1] >= alive.max(-1).values / best_reachable
        if bool(done.all()):
            break
    return [[Hypothesis(_strip(fin_seq[i, j].tolist(), eos_id), float(fin_logp[i, j]), float(fin_score[i, j]))
             for j in range(n_best) if fin_score[i, j] > float("-inf")] for i in range(b)]


def decode(model: nn.Module, src_ids: torch.Tensor, bos_id: int, eos_id: int, max_len: int, beam: int = 1,
           alpha: float = 0.6, src_mask: torch.Tensor | None = None, use_cache: bool = True,
           vocab_size: int | None = None) -> list[list[int]]:
    """The decoded tokens of each source row: greedy for ``beam=1``, else beam search's best."""
    if beam == 1:
        return greedy_decode(model, src_ids, bos_id, eos_id, max_len, src_mask, use_cache, vocab_size)
    hyps = beam_search(model, src_ids, bos_id, eos_id, max_len, beam, alpha, 1, src_mask, use_cache, vocab_size)
    return [h[0].tokens if h else [] for h in hyps]
