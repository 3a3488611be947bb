"""The Llama-style decoder (Touvron et al. 2023; Llama 3, Grattafiori et al. 2024): RMSNorm, rotary
positions, grouped-query attention, SwiGLU, no biases, untied output projection."""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.llama.hf import HF
from loom.models.llama.model import Llama
from loom.models.llama.presets import PRESETS, PUBLISHED_PARAMS
from loom.models.llama.sharding import TABLE
from loom.models.registry import register
from loom.models.spec import ModelSpec, PipelineSplit, Sharding

# the embedding runs on the first stage, the final RMSNorm and the output projection on the last;
# nothing is tied across them
PIPELINE = PipelineSplit(first=("tok_emb",), last=("ln_f", "lm_head"), blocks="layers")
SHARDING = Sharding(table=TABLE)


def validate(cfg: ModelConfig) -> None:
    if cfg.moe.experts:
        raise ConfigError(f"model.moe.experts={cfg.moe.experts}: the Llama family is dense (its MLP is SwiGLU; "
                          "loom's experts are GELU MLPs); set model.moe.experts=0, or use model.arch=gpt for MoE")
    if cfg.activation != "gelu_tanh":
        raise ConfigError(f"model.activation={cfg.activation}: the Llama family's MLP is SwiGLU, it has no GELU to "
                          "choose; leave model.activation unset")


SPEC = register(ModelSpec(name="llama", build=Llama, presets=PRESETS, published_params=PUBLISHED_PARAMS,
                          sharding=SHARDING, pipeline=PIPELINE, validate=validate, positions=("rotary",),
                          hf=HF, tasks=("causal_lm", "sft")))

__all__ = ["PIPELINE", "SHARDING", "SPEC", "Llama"]
