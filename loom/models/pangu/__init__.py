"""PanGu-α (Zeng et al. 2021): the GPT decoder and a top query layer whose query is a learned
embedding of the next position."""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.gpt import PIPELINE as GPT_PIPELINE
from loom.models.gpt import tied
from loom.models.pangu.model import PanGuAlpha, n_blocks
from loom.models.pangu.presets import PRESETS, PUBLISHED_PARAMS
from loom.models.pangu.sharding import TABLE
from loom.models.registry import register
from loom.models.spec import ModelSpec, PipelineSplit, Sharding

# the top query layer and its query embedding run on the last stage, after GPT's final LayerNorm
PIPELINE = PipelineSplit(first=GPT_PIPELINE.first, last=(*GPT_PIPELINE.last, "top_query_emb", "top_query_layer"),
                         blocks=GPT_PIPELINE.blocks)
# the query embedding is looked up by position, inside the sequence-parallel region (the head runs on
# this rank's slice of the sequence), and feeds the top query layer's attention as its query
SHARDING = Sharding(table=TABLE, positional=("pos_emb", "top_query_emb"), local_positions=("top_query_emb",),
                    outside_query=("top_query_layer.attn",), own_groups=("top_query_layer",))


def validate(cfg: ModelConfig) -> None:
    if cfg.n_layer < 2:
        raise ConfigError(f"model.n_layer={cfg.n_layer}: PanGu-α needs at least 2 layers "
                          "(decoder blocks plus the top query layer)")


SPEC = register(ModelSpec(name="pangu", build=PanGuAlpha, presets=PRESETS, published_params=PUBLISHED_PARAMS,
                          sharding=SHARDING, pipeline=PIPELINE, tied=tied, n_blocks=n_blocks, validate=validate,
                          # absolute positions only: the top query layer's query is a position embedding
                          positions=("learned", "sinusoidal")))

__all__ = ["PIPELINE", "SHARDING", "SPEC", "PanGuAlpha"]
