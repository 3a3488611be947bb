"""The encoder-decoder Transformer (``model.arch=encdec``): Vaswani et al. 2017 ("Attention Is All You
Need"), T5 (Raffel et al. 2020) and, with Mixture-of-Experts layers, Switch Transformer (Fedus et al.
2022), as options of one model (:mod:`loom.models.encdec.model` documents the options, the pipeline
state and the ``encode`` / ``decode`` / ``new_cache`` API that decoding builds on)."""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.models.encdec.hf import HF
from loom.models.encdec.model import EncDecCache, EncoderDecoder, decoder_layers
from loom.models.encdec.presets import PRESETS, PUBLISHED_PARAMS
from loom.models.encdec.sharding import TABLE
from loom.models.registry import register
from loom.models.spec import ModelSpec, PipelineSplit, Sharding

# The shared embedding (and sinusoidal or learned positions) on the first stage, which embeds source
# and target; the decoder's final norm and the output projection (the embedding, tied) on the last.
# The blocks, encoder's then decoder's, are one container: a stage may hold the end of the encoder
# and the start of the decoder.
PIPELINE = PipelineSplit(first=("tok_emb", "pos_emb"), last=("ln_f", "lm_head"), blocks="layers")


def tied(cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
    """The output projection is the shared embedding unless ``model.tie_embeddings=false`` (T5 v1.1)."""
    return (("lm_head.weight", "tok_emb.weight"),) if cfg.tie_embeddings else ()


# Post-LN blocks (Vaswani's) feed self-attention and the feed-forward network the stream itself; every
# cross-attention reads the decoder's stream (or its norm) and the encoder's output, both gathered
# under sequence parallelism.
SHARDING = Sharding(table=TABLE, positional=("pos_emb",), stream_inputs=("layers.*.attn", "layers.*.mlp"),
                    cross_attention=("layers.*.cross",))


def validate(cfg: ModelConfig) -> None:
    if cfg.norm not in ("layer", "rms"):
        raise ConfigError(f"model.norm={cfg.norm!r} is not a norm the encoder-decoder has; valid: layer, rms")
    if cfg.feed_forward not in ("relu", "gated-gelu"):
        raise ConfigError(f"model.feed_forward={cfg.feed_forward!r} is not valid; choose relu or gated-gelu")
    if cfg.decoder_layers is not None and cfg.decoder_layers < 1:
        raise ConfigError(f"model.decoder_layers={cfg.decoder_layers} must be at least 1 (or unset: model.n_layer)")
    if cfg.n_kv_head is not None and cfg.n_kv_head != cfg.n_head:
        raise ConfigError(f"model.n_kv_head={cfg.n_kv_head}: the encoder-decoder has multi-head attention only; "
                          "leave model.n_kv_head unset")
    if cfg.post_ln and cfg.norm == "rms":
        raise ConfigError("model.post_ln=true with model.norm=rms is neither Vaswani's nor T5's block; "
                          "use model.norm=layer for post-LN, or model.post_ln=false")
    if cfg.moe.experts and cfg.post_ln:
        raise ConfigError("model.moe.experts with model.post_ln=true: Switch's MoE layers are built into T5's "
                          "pre-norm blocks; set model.post_ln=false (e.g. model=switch-base-128)")


def no_zero_bubble(cfg: ModelConfig) -> str:
    """T5's position bias crosses stages as an output computed from the table alone: torch's split
    backward (stage_backward_input/weight) finds a weight's gradient only along paths that meet the
    stage's inputs, and would drop the table's gradient through that output (measured: the losses
    part from one process's at the second step)."""
    if cfg.positions != "relative":
        return ""
    return ("T5's relative position bias is computed by each stack's first block and carried to the stages "
            "after it, and the schedule's split backward drops the gradient its table gets that way")


def n_blocks(cfg: ModelConfig) -> int:
    return cfg.n_layer + decoder_layers(cfg)


SPEC = register(ModelSpec(name="encdec", build=EncoderDecoder, presets=PRESETS, published_params=PUBLISHED_PARAMS,
                          sharding=SHARDING, pipeline=PIPELINE, tied=tied, tasks=("seq2seq",), n_blocks=n_blocks,
                          positions=("sinusoidal", "relative", "learned"), validate=validate, hf=HF,
                          no_zero_bubble=no_zero_bubble))

__all__ = ["PIPELINE", "SHARDING", "SPEC", "EncDecCache", "EncoderDecoder"]
