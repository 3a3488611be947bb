"""Building blocks every family shares: attention with a KV cache, the MLP and the pre-LayerNorm
block, sparse Mixture-of-Experts layers, and the name-seeded initializer."""

from loom.models.common.attention import Attention, KVCache, LayerCache
from loom.models.common.block import MLP, Block
from loom.models.common.init import gpt_initial_value, param_generator
from loom.models.common.moe import STAT_FIELDS, Experts, MoE, moe_layers, no_stats
from loom.models.common.numerics import at_least_fp32

__all__ = ["MLP", "STAT_FIELDS", "Attention", "Block", "Experts", "KVCache", "LayerCache", "MoE", "at_least_fp32",
           "gpt_initial_value", "moe_layers", "no_stats", "param_generator"]
