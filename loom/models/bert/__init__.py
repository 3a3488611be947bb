"""BERT (Devlin et al. 2018): a bidirectional Transformer encoder, pretrained by masked-LM and
next-sentence prediction and fine-tuned for classification."""

from __future__ import annotations

from loom.models.bert.hf import HF
from loom.models.bert.model import BERT, CLASSIFICATION_HEADS, PRETRAINING_HEADS
from loom.models.bert.presets import PRESETS, PUBLISHED_PARAMS
from loom.models.bert.sharding import TABLE
from loom.models.config import ModelConfig
from loom.models.registry import register
from loom.models.spec import ModelSpec, PipelineSplit, Sharding

# Embeddings on the first stage; the final LayerNorm (pre-LN), the pooler and the heads on the last,
# whose masked-LM decoder is the token embedding.
PIPELINE = PipelineSplit(first=("tok_emb", "pos_emb", "seg_emb", "emb_ln"),
                         last=("ln_f", "pooler", *PRETRAINING_HEADS, *CLASSIFICATION_HEADS), blocks="layers")


def tied(cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
    """The masked-LM decoder is the token embedding; a classifier (``model.n_classes`` > 0) is built
    without the pretraining heads, so it ties nothing."""
    return () if cfg.n_classes else (("mlm_decoder.weight", "tok_emb.weight"),)


# Post-LayerNorm blocks feed attention and MLP the stream itself; the heads behind the pooler and the
# masked-LM transform (which gather the stream) read the whole sequence.
SHARDING = Sharding(table=TABLE, positional=("pos_emb",), stream_inputs=("layers.*.attn", "layers.*.mlp"),
                    whole_inputs=("mlm_ln", "mlm_decoder", "nsp_head", "head_drop", "classifier"))

SPEC = register(ModelSpec(name="bert", build=BERT, presets=PRESETS, published_params=PUBLISHED_PARAMS,
                          sharding=SHARDING, pipeline=PIPELINE, tied=tied, tasks=("masked_lm", "classification"),
                          hf=HF, class_heads=CLASSIFICATION_HEADS))

__all__ = ["BERT", "PIPELINE", "SHARDING", "SPEC"]
