"""Llama in the Hugging Face ``transformers`` format (``LlamaForCausalLM``): its config and tensor names.

The names differ, the layouts do not: every projection is an ``nn.Linear`` in both, keys and values
have ``num_key_value_heads`` heads (grouped-query attention), and Hugging Face's checkpoints already
hold the query and key rows in the rotate-half order loom's rotary positions use.
"""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.hf import block_entry
from loom.models.spec import HFMapping, HFSource

_BLOCK = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
          "attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
          "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.out_proj.weight": "self_attn.o_proj.weight",
          "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
          "mlp.down_proj.weight": "mlp.down_proj.weight"}
_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}


def source(name: str, cfg: ModelConfig) -> HFSource:
    """Where loom's parameter ``name`` is in a ``LlamaForCausalLM`` checkpoint."""
    if name in _TOP:
        return HFSource(_TOP[name])
    layer, hf = block_entry(name, _BLOCK)
    return HFSource(f"model.layers.{layer}.{hf}")


def _rope_theta(c: dict) -> float:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"config.json: rope_type={kind!r} (rescaled rotary frequencies) is not supported by loom's "
                          "Llama; it computes the default rotary angles")
    return float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))


def config_from_hf(c: dict) -> dict:
    """``config.json`` of a Llama -> loom ``model.*`` settings; an option loom's Llama lacks is an error."""
    needs = {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,),
             "tie_word_embeddings": (False,), "pretraining_tp": (1,)}
    for key, ok in needs.items():
        if key in c and c[key] not in ok:
            raise ConfigError(f"config.json: {key}={c[key]!r} is not supported by loom's Llama (it needs "
                              f"{' or '.join(map(repr, ok))})")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, d // heads):
        raise ConfigError(f"config.json: head_dim={c['head_dim']} differs from hidden_size / num_attention_heads = "
                          f"{d // heads}; loom's attention needs them equal")
    return {"arch": "llama", "preset": "llama3-8b", "n_layer": c["num_hidden_layers"], "n_head": heads,
            "n_kv_head": c.get("num_key_value_heads") or heads, "n_embd": d, "ffn_hidden": c["intermediate_size"],
            "vocab_size": c["vocab_size"], "block_size": c.get("max_position_embeddings", 2048),
            "dropout": float(c.get("attention_dropout", 0.0)), "bias": False,
            "layer_norm_eps": c.get("rms_norm_eps", 1e-6), "positions": "rotary", "rope_theta": _rope_theta(c),
            "moe": {"experts": 0}}


def config_to_hf(cfg: ModelConfig) -> dict:
    """loom's Llama config -> a ``LlamaForCausalLM`` ``config.json``."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size, "hidden_act": "silu",
            "rms_norm_eps": cfg.layer_norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.dropout,
            "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True}


HF = HFMapping(model_types=("llama",), config_from_hf=config_from_hf, config_to_hf=config_to_hf, source=source,
               ignore=("*.rotary_emb.inv_freq",))
