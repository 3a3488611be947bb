"""ViT in the Hugging Face ``transformers`` format (``ViTForImageClassification``): its config and tensor names.

The encoder is loom's (pre-LayerNorm blocks, every projection an ``nn.Linear``, a final LayerNorm and
a linear classifier on [CLS]); three tensors are stored in other shapes: the patch projection as a
stride-P convolution's kernel (n_embd, channels, P, P), which is loom's (n_embd, channels·P·P) weight
reshaped (loom flattens each patch channel-first, then rows, as the kernel is laid out), and the
[CLS] and position embeddings with a leading batch dimension of 1. Hugging Face's ViT uses the exact
GELU (``hidden_act="gelu"``), which is ``model.activation=gelu``.
"""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.hf import block_entry
from loom.models.spec import HFMapping, HFSource

_BLOCK = {"attn.q_proj": "attention.attention.query", "attn.k_proj": "attention.attention.key",
          "attn.v_proj": "attention.attention.value", "attn.out_proj": "attention.output.dense",
          "ln_1": "layernorm_before", "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense",
          "ln_2": "layernorm_after"}
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
ARCHITECTURE = "ViTForImageClassification"


def source(name: str, cfg: ModelConfig) -> HFSource:
    """Where loom's parameter ``name`` is in a ``ViTForImageClassification`` checkpoint."""
    d, p, patches = cfg.n_embd, cfg.patch_size, (cfg.image_size // cfg.patch_size) ** 2
    if name == "patch_proj.weight":
        return HFSource("vit.embeddings.patch_embeddings.projection.weight", shape=(d, cfg.channels, p, p))
    if name == "patch_proj.bias":
        return HFSource("vit.embeddings.patch_embeddings.projection.bias")
    if name == "cls_emb.weight":
        return HFSource("vit.embeddings.cls_token", shape=(1, 1, d))
    if name == "pos_emb.weight":
        return HFSource("vit.embeddings.position_embeddings", shape=(1, patches + 1, d))
    owner, _, leaf = name.rpartition(".")
    if owner == "ln_f":
        return HFSource(f"vit.layernorm.{leaf}")
    if owner == "cls_head":
        return HFSource(f"classifier.{leaf}")
    layer, hf = block_entry(owner, _BLOCK, name)
    return HFSource(f"vit.encoder.layer.{layer}.{hf}.{leaf}")


def config_from_hf(c: dict) -> dict:
    """``config.json`` of a ViT -> loom ``model.*`` settings; an option loom's ViT lacks is an error."""
    needs = {"qkv_bias": (True,), "hidden_act": tuple(_ACTIVATIONS), "architectures": ([ARCHITECTURE],)}
    for key, ok in needs.items():
        if key in c and c[key] not in ok:
            raise ConfigError(f"config.json: {key}={c[key]!r} is not supported by loom's ViT (it needs "
                              f"{' or '.join(map(repr, ok))})")
    drops = {k: c.get(k, 0.0) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    if len(set(drops.values())) > 1:
        raise ConfigError(f"config.json: dropouts {drops} differ; loom's ViT has one model.dropout for all "
                          "(set them equal)")
    image, patch = c.get("image_size", 224), c.get("patch_size", 16)
    return {"arch": "vit", "preset": "vit-b-16", "n_layer": c["num_hidden_layers"],
            "n_head": c["num_attention_heads"], "n_embd": c["hidden_size"], "ffn_hidden": c["intermediate_size"],
            "image_size": image, "patch_size": patch, "channels": c.get("num_channels", 3),
            "n_classes": len(c.get("id2label") or {0: 0, 1: 1}), "block_size": (image // patch) ** 2 + 1,
            "vocab_size": 257, "dropout": next(iter(drops.values())), "bias": True,
            "layer_norm_eps": c.get("layer_norm_eps", 1e-12), "positions": "learned", "post_ln": False,
            "activation": _ACTIVATIONS[c.get("hidden_act", "gelu")], "n_kv_head": None, "moe": {"experts": 0}}


def config_to_hf(cfg: ModelConfig) -> dict:
    """loom's ViT config -> a ``ViTForImageClassification`` ``config.json``."""
    if cfg.moe.experts or not cfg.bias or cfg.kv_heads != cfg.n_head:
        raise ConfigError(f"model.moe.experts={cfg.moe.experts}, bias={cfg.bias}, n_kv_head={cfg.n_kv_head}: "
                          "Hugging Face ViT has dense blocks with biases and one key/value head per query head; "
                          "export it with --format safetensors")
    return {"architectures": [ARCHITECTURE], "model_type": "vit", "hidden_size": cfg.n_embd,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "intermediate_size": cfg.ffn,
            "hidden_act": "gelu" if cfg.activation == "gelu" else "gelu_pytorch_tanh",
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "initializer_range": 0.02, "layer_norm_eps": cfg.layer_norm_eps, "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "num_channels": cfg.channels, "qkv_bias": True,
            "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.n_classes)},
            "label2id": {f"LABEL_{i}": i for i in range(cfg.n_classes)}}


HF = HFMapping(model_types=("vit",), config_from_hf=config_from_hf, config_to_hf=config_to_hf, source=source)
