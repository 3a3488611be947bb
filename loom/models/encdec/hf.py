"""T5 in the Hugging Face ``transformers`` format (``T5ForConditionalGeneration``): its config and tensor names.

Both releases read and write: T5 as published (v1.0: ReLU feed-forward, the output projection tied to
the shared embedding and its input scaled by d^-0.5) and T5 v1.1 (``feed_forward_proj="gated-gelu"``,
an output projection of its own, unscaled: ``model.tie_embeddings=false``). Two differences of
layout, both exact: T5 does not divide attention scores by sqrt(head width) and loom does, so loom's query projections
are T5's times sqrt(d_kv); the bias tables are ``nn.Embedding`` (buckets, heads) in transformers,
(heads, buckets) ``Linear`` weights in loom. Switch Transformer (``switch_transformers``) is not read:
its experts (ReLU, a router of its own) are not loom's.
"""

from __future__ import annotations

import math
import re

from loom.errors import ConfigError
from loom.models.common.positions import RELATIVE_BUCKETS, RELATIVE_MAX_DISTANCE
from loom.models.config import ModelConfig
from loom.models.spec import HFMapping, HFSource

_FFN = {"mlp.fc.weight": "DenseReluDense.wi.weight", "mlp.proj.weight": "DenseReluDense.wo.weight",
        "mlp.gate_proj.weight": "DenseReluDense.wi_0.weight", "mlp.up_proj.weight": "DenseReluDense.wi_1.weight",
        "mlp.down_proj.weight": "DenseReluDense.wo.weight"}
_ATTN = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}
# loom's block -> the index of transformers' sub-layer: self-attention, (cross-attention,) feed-forward
_ENCODER = {"ln_1": 0, "attn": 0, "ln_2": 1, "mlp": 1}
_DECODER = {"ln_1": 0, "attn": 0, "ln_x": 1, "cross": 1, "ln_2": 2, "mlp": 2}


def source(name: str, cfg: ModelConfig) -> HFSource:
    """Where loom's parameter ``name`` is in a ``T5ForConditionalGeneration`` checkpoint."""
    if name == "tok_emb.weight":
        return HFSource("shared.weight")
    if name == "lm_head.weight":  # untied (v1.1); transformers 5 saves it as the shared embedding when equal
        return HFSource("lm_head.weight", fallback="shared.weight")
    if name == "ln_f.weight":
        return HFSource("decoder.final_layer_norm.weight")
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)\.(.+)", name)
    if m is None:
        raise KeyError(name)
    i, module, rest = int(m.group(1)), m.group(2), m.group(3)
    stack, j, sub = ("encoder", i, _ENCODER) if i < cfg.n_layer else ("decoder", i - cfg.n_layer, _DECODER)
    if module == "out" and rest == "norm.weight":
        return HFSource("encoder.final_layer_norm.weight")
    if module not in sub:
        raise KeyError(name)
    prefix = f"{stack}.block.{j}.layer.{sub[module]}"
    if module.startswith("ln_") and rest == "weight":
        return HFSource(f"{prefix}.layer_norm.weight")
    if module == "mlp" and f"mlp.{rest}" in _FFN:
        return HFSource(f"{prefix}.{_FFN[f'mlp.{rest}']}")
    attention = "SelfAttention" if module == "attn" else "EncDecAttention"
    if rest == "rel_bias.weight":  # one table per stack, in its first layer, as loom's: (buckets, heads)
        return HFSource(f"{prefix}.SelfAttention.relative_attention_bias.weight", transpose=True)
    proj = rest.removesuffix(".weight")
    if module in ("attn", "cross") and proj in _ATTN:
        scale = math.sqrt(cfg.head_dim) if proj == "q_proj" else 1.0  # T5's scores are not divided by sqrt(hs)
        return HFSource(f"{prefix}.{attention}.{_ATTN[proj]}.weight", scale=scale)
    raise KeyError(name)


def _tied(c: dict) -> bool:
    """Whether the output projection is the shared embedding with its input scaled by d^-0.5 (T5 v1.0).
    transformers 4 says so with ``tie_word_embeddings``; transformers 5 always ties and writes
    ``scale_decoder_outputs=false`` for v1.1, whose projection loom keeps as its own (equal) weights."""
    return c.get("tie_word_embeddings", True) is not False and c.get("scale_decoder_outputs", True) is not False


def config_from_hf(c: dict) -> dict:
    """``config.json`` of a T5 -> loom ``model.*`` settings; an option loom's T5 lacks is an error."""
    archs = c.get("architectures") or ["T5ForConditionalGeneration"]
    if archs != ["T5ForConditionalGeneration"]:
        raise ConfigError(f"config.json: architectures={archs} has no loom equivalent; loom reads "
                          "T5ForConditionalGeneration (the encoder-decoder with its language-model head)")
    ffn = c.get("feed_forward_proj", "relu")
    needs = {"feed_forward_proj": ("relu", "gated-gelu"), "relative_attention_num_buckets": (RELATIVE_BUCKETS,),
             "relative_attention_max_distance": (RELATIVE_MAX_DISTANCE,), "is_encoder_decoder": (True,)}
    for key, ok in needs.items():
        if key in c and c[key] not in ok:
            raise ConfigError(f"config.json: {key}={c[key]!r} is not supported by loom's T5 (it needs "
                              f"{' or '.join(map(repr, ok))})")
    d, heads = c["d_model"], c["num_heads"]
    if c["d_kv"] * heads != d:
        raise ConfigError(f"config.json: d_kv={c['d_kv']} × num_heads={heads} differs from d_model={d}; loom's "
                          "attention needs the heads to fill the model width")
    return {"arch": "encdec", "preset": "t5-small", "n_layer": c["num_layers"],
            "decoder_layers": c.get("num_decoder_layers") or c["num_layers"], "n_head": heads, "n_embd": d,
            "ffn_hidden": c["d_ff"], "vocab_size": c["vocab_size"], "block_size": c.get("n_positions") or 512,
            "dropout": float(c.get("dropout_rate", 0.1)), "bias": False, "norm": "rms", "post_ln": False,
            "positions": "relative", "feed_forward": ffn, "layer_norm_eps": c.get("layer_norm_epsilon", 1e-6),
            "tie_embeddings": _tied(c), "moe": {"experts": 0}}


def config_to_hf(cfg: ModelConfig) -> dict:
    """loom's T5 config -> a ``T5ForConditionalGeneration`` ``config.json``; Vaswani's Transformer and
    Switch have none."""
    t5 = dict(norm="rms", post_ln=False, bias=False, positions="relative")
    differ = [f"model.{k}={getattr(cfg, k)!r}" for k, v in t5.items() if getattr(cfg, k) != v]
    if cfg.moe.experts:
        differ.append(f"model.moe.experts={cfg.moe.experts}")
    if differ:
        raise ConfigError(f"this encoder-decoder ({', '.join(differ)}) is not T5 and has no transformers "
                          "equivalent; export it with --format safetensors")
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": cfg.n_embd,
            "d_kv": cfg.head_dim, "d_ff": cfg.ffn, "num_layers": cfg.n_layer,
            "num_decoder_layers": cfg.decoder_layers if cfg.decoder_layers is not None else cfg.n_layer,
            "num_heads": cfg.n_head, "relative_attention_num_buckets": RELATIVE_BUCKETS,
            "relative_attention_max_distance": RELATIVE_MAX_DISTANCE, "dropout_rate": cfg.dropout,
            "layer_norm_epsilon": cfg.layer_norm_eps, "initializer_factor": 1.0, "feed_forward_proj": cfg.feed_forward,
            "is_encoder_decoder": True, "tie_word_embeddings": cfg.tie_embeddings, "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "use_cache": True, "pad_token_id": 0, "decoder_start_token_id": 0}


HF = HFMapping(model_types=("t5",), config_from_hf=config_from_hf, config_to_hf=config_to_hf, source=source,
               ignore=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
                       "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"))
