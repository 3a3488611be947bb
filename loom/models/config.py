"""The shape of a model: the configuration every family reads (its own keys unused by the others
stay at their defaults). Part of ``loom.config``'s ``model`` section; kept here so that single-device
model code needs nothing but this."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DEFAULT_PRESET = "gpt-mini"


@dataclass
class MoEConfig:
    """Sparse Mixture-of-Experts feed-forward layers (docs/moe.md). ``experts=0``: a dense model."""

    experts: int = 0  # experts per MoE layer; 0 keeps every block's dense MLP
    every: int = 1  # every k-th block gets the MoE layer (blocks k-1, 2k-1, ...); GLaM and Switch: 2
    router: str = "switch"  # switch (top-1) | top2 (GShard/GLaM) | noisy-topk (Shazeer et al. 2017)
    top_k: int = 1  # experts per token: 1 for switch, 2 for top2, any for noisy-topk
    random_routing: bool = True  # top2: keep the second expert with probability 2·gate (GShard); false: always
    capacity_factor: float = 1.25  # expert capacity = ceil(k · tokens per sequence / experts × this); 0: none
    aux_loss_weight: float = 0.01  # α of the load-balancing loss
    z_loss_weight: float = 0.001  # router z-loss (Zoph et al. 2022); 0 disables
    expert_ffn: Optional[int] = None  # hidden width of each expert; None: the model's ffn

    def is_moe_block(self, i: int) -> bool:
        """Whether decoder block ``i`` (0-based) holds an MoE layer instead of the dense MLP."""
        return self.experts > 0 and (i + 1) % self.every == 0


@dataclass
class ModelConfig:
    preset: str = DEFAULT_PRESET
    arch: str = "gpt"  # the family (loom describe --list): gpt | pangu | llama | bert
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # key/value heads (grouped-query attention, Ainslie et al. 2023); None: n_head
    n_embd: int = 192
    ffn_hidden: Optional[int] = None  # None: 4 * n_embd
    vocab_size: int = 4096
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    # auto (the family's own) | learned | sinusoidal (Vaswani et al. 2017) | rotary (Su et al. 2021)
    # | relative (T5's bucketed bias, Raffel et al. 2020)
    positions: str = "auto"
    rope_theta: float = 10000.0  # rotary positions' base (Llama 3: 500000)
    activation: str = "gelu_tanh"  # the MLP's GELU: gelu_tanh (tanh approximation, GPT-2) | gelu (exact: BERT, ViT)
    post_ln: bool = False  # encoders: LayerNorm after each residual add (BERT as published); false: before
    n_classes: int = 0  # encoders: outputs of a classification head on [CLS]; 0: the pretraining heads
    image_size: int = 0  # vision: images are image_size × image_size pixels of `channels` channels
    patch_size: int = 0  # vision: square patches of patch_size pixels, one token each
    channels: int = 3
    # encoder-decoder (model.arch=encdec): n_layer encoder blocks, then decoder_layers decoder blocks (None: n_layer)
    decoder_layers: Optional[int] = None
    norm: str = "layer"  # encdec: layer (LayerNorm, Vaswani et al. 2017) | rms (RMSNorm without bias, T5)
    feed_forward: str = "relu"  # encdec: relu (Vaswani, T5) | gated-gelu (T5 v1.1, Shazeer 2020)
    # encdec: the output projection is the shared embedding (T5: then scaled by d^-0.5); false: its own
    # weights, unscaled (T5 v1.1)
    tie_embeddings: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def expert_ffn(self) -> int:
        return self.moe.expert_ffn if self.moe.expert_ffn is not None else self.ffn

    @property
    def ffn(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.n_embd

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or one per query head."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
