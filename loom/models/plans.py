"""Operator-level shard strategies of each model: which weight is split how over tensor parallelism.

Pure data, read by :mod:`loom.parallel.strategy`. Keys are ``fnmatch`` patterns over module names
(``*`` also matches dots); values are strategy names:

``colwise``    a Linear's output features split over tp; its output stays split and feeds a rowwise one
``rowwise``    a Linear's input features split; the partial sums are all-reduced (or reduce-scattered
               along the sequence under sequence parallelism)
``vocab``      an Embedding's rows (the vocabulary) split and its output reduced; on ``lm_head`` the
               logits stay split over the vocabulary for a vocabulary-parallel cross-entropy
``replicate``  every tp rank holds the whole weight

The layout is Megatron-LM's (Shoeybi et al. 2019): in each attention the query, key and value
projections are split by heads and the output projection by its input, in each MLP the first
projection by columns and the second by rows, so that one all-reduce per block half suffices; the
tied input embedding and output projection are split over the vocabulary. PanGu-α's reference
implementation (Zeng et al. 2021) shards the same way in MindSpore's notation, and shards its top
query layer like the decoder blocks, with the query embedding replicated.
"""

from __future__ import annotations

from loom.config import ConfigError

STRATEGIES = ("colwise", "rowwise", "vocab", "replicate")


def _block(prefix: str) -> dict[str, str]:
    return {
        f"{prefix}.attn.q_proj": "colwise",
        f"{prefix}.attn.k_proj": "colwise",
        f"{prefix}.attn.v_proj": "colwise",
        f"{prefix}.attn.out_proj": "rowwise",
        f"{prefix}.mlp.fc": "colwise",
        f"{prefix}.mlp.proj": "rowwise",
    }


GPT_TABLE: dict[str, str] = {
    "tok_emb": "vocab",
    "pos_emb": "replicate",
    **_block("layers.*"),
    "lm_head": "vocab",  # tied to tok_emb: both hold vocabulary rows, split the same way
}

PANGU_TABLE: dict[str, str] = {
    **GPT_TABLE,
    "top_query_emb": "replicate",
    **_block("top_query_layer"),
}

TABLES: dict[str, dict[str, str]] = {"gpt": GPT_TABLE, "pangu": PANGU_TABLE}


def strategy_table(arch: str) -> dict[str, str]:
    """The built-in strategy table of ``arch`` (a copy: callers may add to it)."""
    if arch not in TABLES:
        raise ConfigError(f"model.arch={arch!r} has no tensor-parallel strategy table; known: {', '.join(TABLES)}")
    return dict(TABLES[arch])
