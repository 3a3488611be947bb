"""The encoder-decoder Transformer: Vaswani et al. 2017 and T5 (Raffel et al. 2020) as options of one
model, with sparse Mixture-of-Experts feed-forward layers for Switch (Fedus et al. 2022).

=================  =======================================  ===========================================
                   Vaswani et al. (``transformer-*``)        T5 (``t5-*``, ``switch-base-128``)
=================  =======================================  ===========================================
norm               LayerNorm with bias (``model.norm=layer``)  RMSNorm, no bias (``model.norm=rms``)
placement          post-LN as published (``post_ln=true``)   pre-norm, plus a final norm after each stack
positions          sinusoidal, added to the embeddings        relative bias per head and bucket, one
                                                              table per stack (``positions=relative``)
feed-forward       ReLU (``feed_forward=relu``)               ReLU; gated-GELU for T5 v1.1 (``gated-gelu``)
biases             yes                                        none (``model.bias=false``)
embeddings         shared by source, target and output,       shared likewise; logits scaled by d^-0.5
                   scaled by sqrt(d) on input                 (the tied output projection)
=================  =======================================  ===========================================

T5's relative-bias table is one per stack, in its first self-attention layer (as in T5): that layer
computes the stack's position bias and hands it to the next in the state, so a pipeline stage
without the table receives the bias, and its gradient flows back to the table's stage. Differences
from the published models, kept for the sake of shared code: attention
scores are scaled by 1/sqrt(head width) in T5 too (T5 folds that into its initialization); Switch's
experts are loom's GELU experts (:mod:`loom.models.common.moe`), not ReLU ones.

**Blocks and pipeline.** One block container, ``layers``: the ``n_layer`` encoder blocks
(``layers.0 .. layers.{n_layer-1}``), then the ``decoder_layers`` decoder blocks. ``embed(src_ids,
src_mask, tgt_ids)`` (the first stage) embeds both sequences and returns the state ``(stream,
src_mask, tgt)`` (:mod:`loom.models.encdec.layers`), which every block takes and returns; the last
encoder block ends with the encoder's final norm, so from there on the first element is the memory,
which each decoder block reads in cross-attention and passes on. ``head(memory, src_mask, tgt)`` (the
last stage) gives the logits. A pipeline stage thus sends the encoder's output along with the
decoder's hidden states (as Megatron-LM does), and gradients flow back to the encoder through it.

**Inference API** (what decoding builds on)::

    memory, src_mask = model.encode(src_ids, src_mask=None, pad_id=None)  # (B, S, C), (B, S) bool
    cache = model.new_cache(batch, max_tgt_len)                          # optional
    logits = model.decode(tgt_ids, memory, src_mask, cache=None)          # (B, T, vocab)

``src_mask`` is True at real source tokens: give it, or ``pad_id`` (it is ``src_ids != pad_id``), or
neither (no padding). Without a cache ``decode`` runs the whole target prefix ``tgt_ids`` (B, T) and
returns a logit row per position. With a cache, ``tgt_ids`` are only the new tokens: their
self-attention keys and values are appended to the cache (positions continue from ``cache.length``),
and the cross-attention keys and values are computed from ``memory`` on the first call and kept
(later calls ignore ``memory`` but must pass one of the right batch size). ``cache.reorder(index)``
keeps rows ``index`` (a (B',) long tensor) of everything cached, in that order: beam search
reorders (and may expand or shrink) the batch with it, and selects the memory and mask rows the same way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loom.models.common import KVCache, SinusoidalPositions, gpt_initial_value, norm, param_generator
from loom.models.common.init import NameSeededInit
from loom.models.common.positions import resolve
from loom.models.config import ModelConfig
from loom.models.encdec.layers import (
    CrossCache,
    PostNormDecoderBlock,
    PostNormEncoderBlock,
    PreNormDecoderBlock,
    PreNormEncoderBlock,
)


def decoder_layers(cfg: ModelConfig) -> int:
    return cfg.decoder_layers if cfg.decoder_layers is not None else cfg.n_layer


class EncDecCache:
    """Per decoder layer: the self-attention's keys and values (appended as tokens arrive) and the
    cross-attention's (computed once from the memory)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        self.self_attn = KVCache(cfg, decoder_layers(cfg), batch, max_len, device, dtype)
        self.cross = [CrossCache() for _ in range(decoder_layers(cfg))]

    @property
    def length(self) -> int:
        """Target positions cached so far (the position of the next token)."""
        return self.self_attn.length

    def layer(self, i: int):
        return self.self_attn.layers[i], self.cross[i]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (B',) of every cached tensor, in that order (beam search's reordering)."""
        for layer in self.self_attn.layers:
            layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)
        for c in self.cross:
            if c.k is not None:
                c.k, c.v = c.k.index_select(0, index), c.v.index_select(0, index)


class EncoderDecoder(NameSeededInit, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, n_enc, n_dec = cfg.n_embd, cfg.n_layer, decoder_layers(cfg)
        self.positions = resolve(cfg, "sinusoidal")
        relative = self.positions == "relative"
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)  # source, target and output (tied)
        if self.positions == "sinusoidal":
            self.pos_emb = SinusoidalPositions(d)
        elif self.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, d)
        self.drop = nn.Dropout(cfg.dropout)
        enc, dec = ((PostNormEncoderBlock, PostNormDecoderBlock) if cfg.post_ln
                    else (PreNormEncoderBlock, PreNormDecoderBlock))
        # T5's relative-bias tables: one per stack, in its first self-attention (the others add its bias)
        blocks = {str(i): enc(cfg, moe=cfg.moe.is_moe_block(i), relative=relative and i == 0, last=i == n_enc - 1)
                  for i in range(n_enc)}
        blocks.update({str(i): dec(cfg, moe=cfg.moe.is_moe_block(i), relative=relative and i == n_enc)
                       for i in range(n_enc, n_enc + n_dec)})
        self.layers = nn.ModuleDict(blocks)
        if not cfg.post_ln:
            self.ln_f = norm(cfg, cfg.norm)  # the decoder's final norm
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)  # tied to tok_emb (unless model.tie_embeddings=false)
        # Vaswani et al. scale the embeddings by sqrt(d); T5 (RMSNorm) scales the tied output by d^-0.5
        # (T5 v1.1's own, untied, output projection: unscaled)
        self.emb_scale = math.sqrt(d) if cfg.norm == "layer" else 1.0
        self.out_scale = 1.0 if cfg.norm == "layer" or not cfg.tie_embeddings else d ** -0.5
        self.tie_weights()

    @property
    def n_encoder_layers(self) -> int:
        return self.cfg.n_layer

    # -- initialization ---------------------------------------------------------------------

    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """The published models' scale, set by each weight's fan-in rather than GPT-2's fixed N(0, 0.02):
        Vaswani's weight matrices Xavier-uniform (Glorot and Bengio 2010, as tensor2tensor, fairseq and
        ``torch.nn.Transformer``), T5's N(0, 1/fan_in) (mesh-tensorflow's variance scaling; the relative-
        bias table N(0, 1/d)); the shared embedding N(0, d^-0.5) (so that Vaswani's sqrt(d)-scaled input
        has unit variance; fairseq's choice), N(0, 1) for T5's. Norms one, biases zero, Switch experts as
        :func:`~loom.models.common.moe.moe_initial_value`. A function of ``seed`` and ``name`` alone.

        GPT-2's 0.02 suits GPT-2's width (d = 768: about 1/sqrt(d)); at a tiny model's width it makes
        every attention score near zero, and an encoder-decoder then never learns to read its source
        (measured: transformer-tiny stayed at the unigram loss of copying 8 random tokens for 300 steps,
        and learns the copy with this initialization; tests/unit/test_encdec.py)."""
        generator = param_generator(seed, name)
        d = self.cfg.n_embd
        if name == "tok_emb.weight":
            std = d ** -0.5 if self.cfg.norm == "layer" else 1.0
            return torch.empty(shape).normal_(0.0, std, generator=generator)
        if name.endswith("rel_bias.weight"):
            return torch.empty(shape).normal_(0.0, d ** -0.5, generator=generator)
        n = self.cfg.n_layer + decoder_layers(self.cfg)
        value = gpt_initial_value(self, name, shape, n, generator)
        owner = self.get_submodule(name.rpartition(".")[0])
        if len(shape) != 2 or not isinstance(owner, nn.Linear):  # norms, biases, experts: as GPT's
            return value
        fan_out, fan_in = shape
        if self.cfg.norm == "layer":
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            return torch.empty(shape).uniform_(-bound, bound, generator=generator)
        return torch.empty(shape).normal_(0.0, fan_in ** -0.5, generator=generator)

    def tie_weights(self) -> None:
        """The output projection is the shared embedding (``to_empty()`` unties them), unless
        ``model.tie_embeddings=false``."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    # -- training forward, in the three parts a pipeline stage runs ----------------------------

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """Source (B, S), its padding mask (B, S) (True/1 at real tokens) and the decoder's input (B, T)
        (teacher forcing: the target shifted right behind a start token) -> logits (B, T, vocab)."""
        h = self.embed(src_ids, src_mask, tgt_ids)
        for block in self.layers.values():
            h = block(*h)
        return self.head(*h)

    def _embed_tokens(self, ids: torch.Tensor, past: int = 0) -> torch.Tensor:
        t = ids.size(1)
        if past + t > self.cfg.block_size:
            raise ValueError(f"sequence of {past + t} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(ids)  # (B, T, C)
        if self.emb_scale != 1.0:
            x = x * self.emb_scale
        if hasattr(self, "pos_emb"):
            x = x + self.pos_emb(torch.arange(past, past + t, device=ids.device)).to(x.dtype)  # (T, C) broadcast
        return self.drop(x)

    def embed(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor):
        """-> the state (source hidden states (B, S, C), source mask (B, S) bool, target hidden states (B, T, C))."""
        return self._embed_tokens(src_ids), src_mask.bool(), self._embed_tokens(tgt_ids)

    def head(self, memory: torch.Tensor, src_mask: torch.Tensor, tgt: torch.Tensor, *bias) -> torch.Tensor:
        """The state after the last decoder block -> logits (B, T, vocab)."""
        if hasattr(self, "ln_f"):
            tgt = self.ln_f(tgt)
        if self.out_scale != 1.0:
            tgt = tgt * self.out_scale
        return self.lm_head(tgt)

    # -- inference ----------------------------------------------------------------------------

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor | None = None,
               pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Source ids (B, S) -> (memory (B, S, C), source mask (B, S) bool, True at real tokens)."""
        if src_mask is None:
            src_mask = src_ids != pad_id if pad_id is not None else torch.ones_like(src_ids, dtype=torch.bool)
        src_mask = src_mask.bool()
        x = self._embed_tokens(src_ids)
        h = (x, src_mask, x)
        for i in range(self.n_encoder_layers):
            h = self.layers[str(i)](*h)
        return h[0], h[1]

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
               cache: EncDecCache | None = None) -> torch.Tensor:
        """Target tokens (B, T) -> logits (B, T, vocab), attending to ``memory`` (B, S, C); with
        ``cache``, ``tgt_ids`` continue the cached positions (see the module's docstring)."""
        y = self._embed_tokens(tgt_ids, cache.length if cache is not None else 0)
        mask = src_mask.bool()
        n_enc, h = self.n_encoder_layers, (memory, mask, y)
        for i in range(decoder_layers(self.cfg)):
            h = self.layers[str(n_enc + i)](*h, cache=cache.layer(i) if cache is not None else None)
        return self.head(*h)

    def new_cache(self, batch: int, max_tgt_len: int | None = None) -> EncDecCache:
        """An empty cache for ``batch`` rows and up to ``max_tgt_len`` target positions (default: block_size)."""
        p = self.tok_emb.weight
        return EncDecCache(self.cfg, batch, max_tgt_len or self.cfg.block_size, p.device, p.dtype)
