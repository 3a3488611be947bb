"""The encoder-decoder's tensor-parallel strategies (pure data): Megatron-LM's layout of every block
(self- and cross-attention split by heads, query/key/value by columns and output by rows; the
feed-forward network's first projection(s) by columns, the second by rows; T5's relative-bias tables
by heads), the shared embedding and the tied output projection split over the vocabulary."""

from __future__ import annotations

from loom.models.common.sharding import block_strategies

TABLE: dict[str, str] = {
    "tok_emb": "vocab",
    **block_strategies("layers.*"),
    **block_strategies("layers.*", mlp="swiglu"),  # T5 v1.1's gated-GELU: gate and up by columns, down by rows
    "layers.*.cross.q_proj": "colwise",
    "layers.*.cross.k_proj": "colwise",
    "layers.*.cross.v_proj": "colwise",
    "layers.*.cross.out_proj": "rowwise",
    "lm_head": "vocab",  # tied to tok_emb: both hold vocabulary rows, split the same way
}
