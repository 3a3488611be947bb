"""Building blocks every family shares: attention with a KV cache (grouped-query, rotary), the MLPs
(GELU, SwiGLU), norms and the pre-norm block, position encodings, sparse Mixture-of-Experts layers,
and the name-seeded initializer (with the `init_weights` every model mixes in)."""

from loom.models.common.attention import Attention, KVCache, LayerCache
from loom.models.common.block import MLP, Block, SwiGLU, norm
from loom.models.common.init import NameSeededInit, gpt_initial_value, param_generator
from loom.models.common.moe import STAT_FIELDS, Experts, MoE, moe_layers, no_stats
from loom.models.common.numerics import at_least_fp32
from loom.models.common.positions import SinusoidalPositions, apply_rotary, rotary_angles, sinusoidal

__all__ = ["MLP", "STAT_FIELDS", "Attention", "Block", "Experts", "KVCache", "LayerCache", "MoE", "NameSeededInit",
           "SinusoidalPositions", "SwiGLU", "apply_rotary", "at_least_fp32", "gpt_initial_value", "moe_layers",
           "no_stats", "norm", "param_generator", "rotary_angles", "sinusoidal"]
