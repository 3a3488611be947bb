"""The Llama-style decoder (Touvron et al. 2023; Llama 3: Grattafiori et al. 2024): a decoder-only
Transformer language model with pre-RMSNorm blocks, rotary positions in attention, grouped-query
attention, a SwiGLU feed-forward network, no biases and an untied output projection.

Parameter names (what a weight converter maps; Hugging Face's ``LlamaForCausalLM`` in brackets):

    tok_emb.weight                     [model.embed_tokens.weight]
    layers.N.ln_1.weight               [model.layers.N.input_layernorm.weight]
    layers.N.attn.{q,k,v}_proj.weight  [model.layers.N.self_attn.{q,k,v}_proj.weight]
    layers.N.attn.out_proj.weight      [model.layers.N.self_attn.o_proj.weight]
    layers.N.ln_2.weight               [model.layers.N.post_attention_layernorm.weight]
    layers.N.mlp.{gate,up,down}_proj.weight  [model.layers.N.mlp.{gate,up,down}_proj.weight]
    ln_f.weight                        [model.norm.weight]
    lm_head.weight                     [lm_head.weight]

Rotary positions use the rotate-half layout, as Hugging Face's checkpoints do (their q/k rows are
already permuted from Meta's interleaved layout).
"""

from __future__ import annotations

import torch
from torch import nn

from loom.models.common import Block, KVCache, NameSeededInit, gpt_initial_value, norm, param_generator
from loom.models.config import ModelConfig


class Llama(NameSeededInit, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, norm_kind="rms", mlp="swiglu", rotary=True)
                                     for i in range(cfg.n_layer)})
        self.ln_f = norm(cfg, "rms")
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied from tok_emb

    @property
    def n_attention_layers(self) -> int:
        return self.cfg.n_layer

    # -- initialization ---------------------------------------------------------------------

    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """N(0, 0.02) matrices (the output projection too), unit RMSNorms, residual projections
        (attention output, MLP down) scaled by 1/sqrt(2 n_layer); a function of ``seed`` and ``name``."""
        return gpt_initial_value(self, name, shape, self.cfg.n_layer, param_generator(seed, name))

    # -- forward ----------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab); with ``cache`` the tokens continue
        the cached sequence (rotary positions from ``cache.length``)."""
        x = self.embed(idx, cache.length if cache is not None else 0)
        for i, block in enumerate(self.layers.values()):
            x = block(x, cache.layers[i] if cache is not None else None)
        return self.head(x)

    def embed(self, idx: torch.Tensor, past: int = 0) -> torch.Tensor:
        """Token ids (B, T) -> input hidden states (B, T, C); positions enter in attention."""
        if past + idx.size(1) > self.cfg.block_size:
            raise ValueError(f"sequence of {past + idx.size(1)} tokens exceeds block_size={self.cfg.block_size}")
        return self.drop(self.tok_emb(idx))  # (B, T, C)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, T, C) -> logits (B, T, vocab)."""
        return self.lm_head(self.ln_f(x))

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A KV cache of ``n_kv_head`` heads per layer (grouped-query attention's saving)."""
        p = self.tok_emb.weight
        return KVCache(self.cfg, self.n_attention_layers, batch, max_len or self.cfg.block_size, p.device, p.dtype)
