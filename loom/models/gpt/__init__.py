"""GPT (Radford et al. 2018, 2019; Brown et al. 2020): a decoder-only Transformer language model,
dense or with sparse Mixture-of-Experts feed-forward layers (Switch, GLaM)."""

from __future__ import annotations

from loom.models.config import ModelConfig
from loom.models.gpt.hf import HF
from loom.models.gpt.model import GPT
from loom.models.gpt.presets import PRESETS, PUBLISHED_PARAMS
from loom.models.gpt.sharding import TABLE
from loom.models.registry import register
from loom.models.spec import ModelSpec, PipelineSplit, Sharding

# The input embedding runs on the first pipeline stage, the final LayerNorm and the output
# projection on the last; the projection is the input embedding (tied, Press & Wolf 2017).
PIPELINE = PipelineSplit(first=("tok_emb", "pos_emb"), last=("ln_f", "lm_head"), blocks="layers")
TIED = (("lm_head.weight", "tok_emb.weight"),)


def tied(cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
    return TIED  # every GPT ties them


SHARDING = Sharding(table=TABLE, positional=("pos_emb",))

SPEC = register(ModelSpec(name="gpt", build=GPT, presets=PRESETS, published_params=PUBLISHED_PARAMS,
                          sharding=SHARDING, pipeline=PIPELINE, tied=tied,
                          positions=("learned", "sinusoidal", "rotary", "relative"), hf=HF, tasks=("causal_lm", "sft")))

__all__ = ["GPT", "PIPELINE", "SHARDING", "SPEC", "tied"]
