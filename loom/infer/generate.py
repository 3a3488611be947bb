"""Autoregressive sampling with a KV cache.

The prompt runs once through the model (prefill), filling each attention layer's cache; every new
token then runs alone, attending to the cached keys and values, so a token costs O(T) rather than
re-running the whole context. Sampling: temperature, then top-k, then top-p (nucleus, Holtzman et
al. 2020) filtering of the distribution.
"""

from __future__ import annotations

import torch
from torch import nn


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top ``k`` and outside the smallest set whose
    probability reaches ``p``; logits (B, V)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep tokens until p is reached, at least one
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits (B, V); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, use_cache: bool = True,
             stop_token: int | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Continue token ids ``idx`` (B, T) by up to ``max_new_tokens``; returns (B, T + new).

    ``vocab_size``: sample only ids below it (the tokenizer's), when the model's vocabulary is padded
    past it (rows a tensor-parallel split needs; never a target in training).

    Prompt plus new tokens must fit the model's ``block_size`` (learned positions end there).
    Without ``use_cache`` every step recomputes the whole sequence: slower, same result.
    """
    block = model.cfg.block_size
    if idx.size(1) + max_new_tokens > block:
        raise ValueError(f"prompt ({idx.size(1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's block_size={block}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=idx.device).manual_seed(seed)
    cache = model.new_cache(idx.size(0), idx.size(1) + max_new_tokens) if use_cache else None
    logits = model(idx, cache)[:, -1]  # prefill
    out = idx
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, :vocab_size].float(), temperature, top_k, top_p, gen)
        out = torch.cat([out, nxt], dim=1)
        if stop_token is not None and bool((nxt == stop_token).all()):
            break
        if i + 1 < max_new_tokens:
            logits = (model(nxt, cache) if use_cache else model(out))[:, -1]
    return out
