"""PanGu-α's tensor-parallel strategies (pure data). Its reference implementation (Zeng et al. 2021)
shards the decoder as Megatron-LM does, in MindSpore's notation, and shards its top query layer like
the decoder blocks, with the query embedding replicated."""

from __future__ import annotations

from loom.models.common.sharding import block_strategies
from loom.models.gpt.sharding import TABLE as GPT_TABLE

TABLE: dict[str, str] = {
    **GPT_TABLE,
    "top_query_emb": "replicate",
    **block_strategies("top_query_layer"),
}
