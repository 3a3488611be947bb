"""ViT's tensor-parallel strategies (pure data): Megatron-LM's layout of every block; the patch
projection, embeddings and classifier replicated."""

from __future__ import annotations

from loom.models.common.sharding import block_strategies

TABLE: dict[str, str] = {**block_strategies("layers.*")}
