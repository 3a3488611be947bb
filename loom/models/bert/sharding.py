"""BERT's tensor-parallel strategies (pure data): Megatron-LM's layout of every block, the token
embedding and the tied masked-LM decoder split over the vocabulary (a vocabulary-parallel loss),
everything else replicated."""

from __future__ import annotations

from loom.models.common.sharding import block_strategies

TABLE: dict[str, str] = {
    "tok_emb": "vocab",
    "pos_emb": "replicate",
    "seg_emb": "replicate",
    **block_strategies("layers.*"),
    "mlm_decoder": "vocab",  # tied to tok_emb: both hold vocabulary rows, split the same way
}
