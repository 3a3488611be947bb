"""BERT in the Hugging Face ``transformers`` format (``BertForPreTraining``, ``BertForSequenceClassification``):
its config and tensor names.

The layouts are loom's (every projection an ``nn.Linear``, post-LayerNorm blocks, learned positions,
two segment embeddings, a tanh pooler on [CLS], the masked-LM transform dense → GELU → LayerNorm
before a decoder tied to the word embedding with its own bias); only the names differ. Hugging
Face's BERT uses the exact GELU (``hidden_act="gelu"``), which is ``model.activation=gelu``.
"""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.hf import block_entry
from loom.models.spec import HFMapping, HFSource

_BLOCK = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
          "attn.v_proj": "attention.self.value", "attn.out_proj": "attention.output.dense",
          "ln_1": "attention.output.LayerNorm", "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense",
          "ln_2": "output.LayerNorm"}
_TOP = {"tok_emb": "bert.embeddings.word_embeddings", "pos_emb": "bert.embeddings.position_embeddings",
        "seg_emb": "bert.embeddings.token_type_embeddings", "emb_ln": "bert.embeddings.LayerNorm",
        "pooler": "bert.pooler.dense", "mlm_dense": "cls.predictions.transform.dense",
        "mlm_ln": "cls.predictions.transform.LayerNorm", "nsp_head": "cls.seq_relationship",
        "classifier": "classifier"}
# Hugging Face's activations -> model.activation
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
PRETRAINING, CLASSIFICATION = "BertForPreTraining", "BertForSequenceClassification"


def source(name: str, cfg: ModelConfig) -> HFSource:
    """Where loom's parameter ``name`` is in a ``BertForPreTraining`` (``BertForSequenceClassification``
    when ``model.n_classes``) checkpoint."""
    if name == "mlm_decoder.weight":  # tied: the word embedding
        return HFSource(f"{_TOP['tok_emb']}.weight")
    if name == "mlm_decoder.bias":
        return HFSource("cls.predictions.bias")
    owner, _, leaf = name.rpartition(".")
    if owner in _TOP:
        return HFSource(f"{_TOP[owner]}.{leaf}")
    layer, hf = block_entry(owner, _BLOCK, name)
    return HFSource(f"bert.encoder.layer.{layer}.{hf}.{leaf}")


def _unsupported(key: str, value, want) -> ConfigError:
    return ConfigError(f"config.json: {key}={value!r} is not supported by loom's BERT (it needs {want})")


def config_from_hf(c: dict) -> dict:
    """``config.json`` of a BERT -> loom ``model.*`` settings; an option loom's BERT lacks is an error."""
    needs = {"position_embedding_type": ("absolute",), "type_vocab_size": (2,), "is_decoder": (False,),
             "add_cross_attention": (False,), "hidden_act": tuple(_ACTIVATIONS)}
    for key, ok in needs.items():
        if key in c and c[key] not in ok:
            raise _unsupported(key, c[key], " or ".join(map(repr, ok)))
    drops = {k: c.get(k, 0.1) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    if c.get("classifier_dropout") is not None:
        drops["classifier_dropout"] = c["classifier_dropout"]
    if len(set(drops.values())) > 1:
        raise ConfigError(f"config.json: dropouts {drops} differ; loom's BERT has one model.dropout for all "
                          "(set them equal)")
    archs = c.get("architectures") or [PRETRAINING]
    n_classes = len(c.get("id2label") or {0: 0, 1: 1}) if CLASSIFICATION in archs else 0
    if n_classes == 0 and PRETRAINING not in archs:
        raise ConfigError(f"config.json: architectures={archs} has no loom BERT equivalent; loom reads "
                          f"{PRETRAINING} (masked-LM and next-sentence heads) and {CLASSIFICATION}")
    return {"arch": "bert", "preset": "bert-base", "n_layer": c["num_hidden_layers"],
            "n_head": c["num_attention_heads"], "n_embd": c["hidden_size"], "ffn_hidden": c["intermediate_size"],
            "vocab_size": c["vocab_size"], "block_size": c.get("max_position_embeddings", 512),
            "dropout": next(iter(drops.values())), "bias": True, "layer_norm_eps": c.get("layer_norm_eps", 1e-12),
            "positions": "learned", "post_ln": True, "n_classes": n_classes,
            "activation": _ACTIVATIONS[c.get("hidden_act", "gelu")], "n_kv_head": None, "moe": {"experts": 0}}


def config_to_hf(cfg: ModelConfig) -> dict:
    """loom's BERT config -> a ``BertForPreTraining`` (or ``BertForSequenceClassification``) ``config.json``."""
    if cfg.moe.experts:
        raise ConfigError("a Mixture-of-Experts BERT has no Hugging Face equivalent; export it with "
                          "--format safetensors")
    if not cfg.post_ln or cfg.positions not in ("auto", "learned") or not cfg.bias or cfg.kv_heads != cfg.n_head:
        raise ConfigError(f"model.post_ln={cfg.post_ln}, positions={cfg.positions}, bias={cfg.bias}, "
                          f"n_kv_head={cfg.n_kv_head}: Hugging Face BERT is post-LayerNorm with learned positions, "
                          "biases and one key/value head per query head; export it with --format safetensors")
    config = {"architectures": [CLASSIFICATION if cfg.n_classes else PRETRAINING], "model_type": "bert",
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "intermediate_size": cfg.ffn,
              "hidden_act": "gelu" if cfg.activation == "gelu" else "gelu_pytorch_tanh",
              "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
              "max_position_embeddings": cfg.block_size, "type_vocab_size": 2, "initializer_range": 0.02,
              "layer_norm_eps": cfg.layer_norm_eps, "position_embedding_type": "absolute",
              "tie_word_embeddings": True}
    if cfg.n_classes:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.n_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(cfg.n_classes)}
    return config


HF = HFMapping(model_types=("bert",), config_from_hf=config_from_hf, config_to_hf=config_to_hf, source=source,
               ignore=("*.position_ids", "*.token_type_ids", "cls.predictions.decoder.weight",
                       "cls.predictions.decoder.bias"))
