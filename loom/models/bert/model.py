"""BERT (Devlin et al. 2018): a bidirectional Transformer encoder.

Token + learned position + segment embeddings, summed and normalized; encoder blocks (post-LayerNorm
as published, ``model.post_ln=false`` for pre-LayerNorm, which then adds a final LayerNorm); GELU.
Two sets of heads, chosen by ``model.n_classes``:

- pretraining (``n_classes=0``): the masked-LM head (a dense transform, GELU, LayerNorm, then a decoder
  tied to the token embedding with its own bias) and the next-sentence head (the pooler, a dense
  layer with tanh on the [CLS] position, then two logits);
- classification (``n_classes=K``): the pooler and a K-way classifier on [CLS].

The forward takes ``(input_ids, token_type_ids, attention_mask)``, all (B, T); the padding mask
(True/1 at real tokens) hides padding from every attention and travels with the hidden states
through the blocks (and pipeline stages).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common import Experts, NameSeededInit, param_generator
from loom.models.common.block import gelu_approximate
from loom.models.common.encoder import encoder_block
from loom.models.common.moe import moe_initial_value
from loom.models.config import ModelConfig

N_SEGMENTS = 2  # sentence A and sentence B (BERT's type vocabulary)
PRETRAINING_HEADS = ("mlm_dense", "mlm_ln", "mlm_decoder", "nsp_head")
CLASSIFICATION_HEADS = ("classifier",)


class BERT(NameSeededInit, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.block_size, d)
        self.seg_emb = nn.Embedding(N_SEGMENTS, d)
        self.emb_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): encoder_block(cfg, moe=cfg.moe.is_moe_block(i))
                                     for i in range(cfg.n_layer)})
        if not cfg.post_ln:  # pre-LN blocks leave the stream unnormalized
            self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.pooler = nn.Linear(d, d)
        if cfg.n_classes:
            self.head_drop = nn.Dropout(cfg.dropout)  # on [CLS]'s pooled vector: whole on every tp rank
            self.classifier = nn.Linear(d, cfg.n_classes)
        else:
            self.mlm_dense = nn.Linear(d, d)
            self.mlm_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps, bias=cfg.bias)
            self.mlm_decoder = nn.Linear(d, cfg.vocab_size)  # weight tied to tok_emb; its own bias
            self.nsp_head = nn.Linear(d, 2)
        self.tie_weights()

    # -- initialization ---------------------------------------------------------------------

    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """BERT's initialization (its ``initializer_range``): N(0, 0.02) weights, zero biases, unit
        LayerNorms; a function of ``seed`` and ``name`` alone, so every layout initializes the same."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.get_submodule(owner_name)
        generator = param_generator(seed, name)
        if isinstance(owner, Experts):
            return moe_initial_value(name, shape, self.cfg.n_layer, generator)
        if isinstance(owner, nn.LayerNorm):
            return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        if leaf == "bias":
            return torch.zeros(shape)
        return torch.empty(shape).normal_(0.0, 0.02, generator=generator)

    def tie_weights(self) -> None:
        """The masked-LM decoder is the token embedding (``to_empty()`` unties them)."""
        if hasattr(self, "mlm_decoder"):
            self.mlm_decoder.weight = self.tok_emb.weight

    # -- forward ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        """(B, T) ids, segments (0/1) and padding mask -> the heads' logits: (masked-LM (B, T, vocab),
        next-sentence (B, 2)), or classification (B, n_classes)."""
        h = self.embed(input_ids, token_type_ids, attention_mask)
        for block in self.layers.values():
            h = block(*h)
        return self.head(*h)

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's last hidden states (B, T, C), before any head."""
        x, mask = self.embed(input_ids, token_type_ids, attention_mask)
        for block in self.layers.values():
            x, mask = block(x, mask)
        return self.ln_f(x) if hasattr(self, "ln_f") else x

    # The forward pass in three parts, so that a pipeline stage can run the part it holds.

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden states (B, T, C), padding mask (B, T) bool)."""
        t = input_ids.size(1)
        if t > self.cfg.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size={self.cfg.block_size}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = torch.arange(t, device=input_ids.device)  # (T,)
        x = self.tok_emb(input_ids) + self.pos_emb(pos) + self.seg_emb(token_type_ids)  # (B, T, C)
        return self.drop(self.emb_ln(x)), mask

    def head(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Last hidden states (B, T, C) -> the heads' logits (see :meth:`forward`)."""
        if hasattr(self, "ln_f"):
            x = self.ln_f(x)
        # the pooler runs on every position and keeps [CLS]'s: under sequence parallelism it is the
        # projection that gathers the sequence (a rank's slice may not hold position 0)
        pooled = torch.tanh(self.pooler(x)[:, 0])  # (B, C)
        if self.cfg.n_classes:
            return self.classifier(self.head_drop(pooled))  # (B, n_classes)
        h = self.mlm_ln(F.gelu(self.mlm_dense(x), approximate=gelu_approximate(self.cfg)))  # (B, T, C)
        return self.mlm_decoder(h), self.nsp_head(pooled)  # (B, T, vocab), (B, 2)
