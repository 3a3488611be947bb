"""GPT-2 in the Hugging Face ``transformers`` format (``GPT2LMHeadModel``): its config and tensor names.

GPT-2's attention and MLP weights are ``Conv1D``s, stored (in, out), the transpose of ``nn.Linear``;
its query, key and value projections are one fused ``c_attn`` of 3·C outputs, which loom keeps as
three projections (so tensor parallelism can split each by heads).
"""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.hf import block_entry
from loom.models.spec import HFMapping, HFSource

# loom parameter (within a block) -> (GPT-2 tensor, transposed, offset in units of n_embd along dim 0)
_BLOCK = {
    "ln_1.weight": ("ln_1.weight", False, 0), "ln_1.bias": ("ln_1.bias", False, 0),
    "attn.q_proj.weight": ("attn.c_attn.weight", True, 0), "attn.q_proj.bias": ("attn.c_attn.bias", False, 0),
    "attn.k_proj.weight": ("attn.c_attn.weight", True, 1), "attn.k_proj.bias": ("attn.c_attn.bias", False, 1),
    "attn.v_proj.weight": ("attn.c_attn.weight", True, 2), "attn.v_proj.bias": ("attn.c_attn.bias", False, 2),
    "attn.out_proj.weight": ("attn.c_proj.weight", True, 0), "attn.out_proj.bias": ("attn.c_proj.bias", False, 0),
    "ln_2.weight": ("ln_2.weight", False, 0), "ln_2.bias": ("ln_2.bias", False, 0),
    "mlp.fc.weight": ("mlp.c_fc.weight", True, 0), "mlp.fc.bias": ("mlp.c_fc.bias", False, 0),
    "mlp.proj.weight": ("mlp.c_proj.weight", True, 0), "mlp.proj.bias": ("mlp.c_proj.bias", False, 0),
}
_TOP = {"tok_emb.weight": "transformer.wte.weight", "lm_head.weight": "transformer.wte.weight",  # tied
        "pos_emb.weight": "transformer.wpe.weight",
        "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}


# GPT-2's activations -> model.activation
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def source(name: str, cfg: ModelConfig) -> HFSource:
    """Where loom's parameter ``name`` is in a ``GPT2LMHeadModel`` checkpoint."""
    if name in _TOP:
        return HFSource(_TOP[name])
    layer, (hf, transpose, part) = block_entry(name, _BLOCK)
    return HFSource(f"transformer.h.{layer}.{hf}", transpose=transpose, dim=0, start=part * cfg.n_embd)


def _unsupported(key: str, value, want) -> ConfigError:
    return ConfigError(f"config.json: {key}={value!r} is not supported by loom's GPT (it needs {want})")


def config_from_hf(c: dict) -> dict:
    """``config.json`` of a GPT-2 -> loom ``model.*`` settings; an option loom's GPT lacks is an error."""
    needs = {"activation_function": tuple(_ACTIVATIONS), "scale_attn_weights": (True,),
             "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,),
             "tie_word_embeddings": (True,)}
    for key, ok in needs.items():
        if key in c and c[key] not in ok:
            raise _unsupported(key, c[key], " or ".join(map(repr, ok)))
    drops = {k: c.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) > 1:
        raise ConfigError(f"config.json: dropouts {drops} differ; loom's GPT has one model.dropout for all three "
                          "(set them equal)")
    n_embd = c["n_embd"]
    return {"arch": "gpt", "preset": "gpt2-124m", "n_layer": c["n_layer"], "n_head": c["n_head"], "n_embd": n_embd,
            "ffn_hidden": c.get("n_inner") or 4 * n_embd, "vocab_size": c["vocab_size"],
            "block_size": c.get("n_positions", c.get("n_ctx", 1024)), "dropout": next(iter(drops.values())),
            "bias": True, "layer_norm_eps": c.get("layer_norm_epsilon", 1e-5), "positions": "learned",
            "n_kv_head": None, "moe": {"experts": 0},
            "activation": _ACTIVATIONS[c.get("activation_function", "gelu_new")]}


def config_to_hf(cfg: ModelConfig) -> dict:
    """loom's GPT config -> a ``GPT2LMHeadModel`` ``config.json``."""
    if cfg.moe.experts:
        raise ConfigError("a Mixture-of-Experts GPT has no Hugging Face GPT-2 equivalent; export it with "
                          "--format safetensors")
    if cfg.positions not in ("auto", "learned") or cfg.kv_heads != cfg.n_head:
        raise ConfigError(f"model.positions={cfg.positions}, model.n_kv_head={cfg.n_kv_head}: Hugging Face GPT-2 has "
                          "learned positions and one key/value head per query head")
    if not cfg.bias:
        raise ConfigError("model.bias=false has no Hugging Face GPT-2 equivalent (GPT-2 has biases everywhere)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": cfg.ffn, "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size,
            "activation_function": "gelu" if cfg.activation == "gelu" else "gelu_new",
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": cfg.layer_norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": True, "use_cache": True}


HF = HFMapping(model_types=("gpt2",), config_from_hf=config_from_hf, config_to_hf=config_to_hf, source=source,
               prefixes=("transformer.",), ignore=("*.attn.bias", "*.attn.masked_bias", "lm_head.weight"))
