"""GPT (Radford et al. 2018, 2019; Brown et al. 2020): a decoder-only Transformer language model.

Learned position embeddings (or, with ``model.positions``, fixed sinusoidal ones, rotary attention
or T5's relative position bias), pre-LayerNorm blocks, GELU MLP, causal self-attention through
``F.scaled_dot_product_attention``, input and output embeddings tied, residual projections scaled
at initialization. Blocks live in a ``ModuleDict`` keyed by their index so that their names stay the
same when a pipeline split keeps only some of them.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.models.common import Block, KVCache, NameSeededInit, SinusoidalPositions, gpt_initial_value, param_generator
from loom.models.common import positions as position_kinds
from loom.models.config import ModelConfig


class GPT(NameSeededInit, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.positions = position_kinds.resolve(cfg, "learned")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if self.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif self.positions == "sinusoidal":
            self.pos_emb = SinusoidalPositions(cfg.n_embd)  # no weights; rotary, relative: inside attention
        self.drop = nn.Dropout(cfg.dropout)
        rotary, relative = self.positions == "rotary", self.positions == "relative"
        self.layers = nn.ModuleDict({str(i): Block(cfg, moe=cfg.moe.is_moe_block(i), rotary=rotary, relative=relative)
                                     for i in range(self.n_blocks)})
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie_weights()  # input and output embeddings tied (Press & Wolf 2017)

    # -- shape ------------------------------------------------------------------------------

    @property
    def n_blocks(self) -> int:
        """Decoder blocks (PanGu-α spends one of its layers on the top query layer)."""
        return self.cfg.n_layer

    @property
    def n_attention_layers(self) -> int:
        """Attention layers that hold a KV cache."""
        return self.cfg.n_layer

    # -- initialization ---------------------------------------------------------------------

    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """The initial value of parameter ``name`` (full ``shape``, fp32, on the CPU): a function of
        ``seed`` and ``name`` alone, so that every layout that splits the model initializes the
        same numbers as one device does."""
        return gpt_initial_value(self, name, shape, self.cfg.n_layer, param_generator(seed, name))

    def tie_weights(self) -> None:
        """Make the output projection the input embedding again (``to_empty()`` replaces
        parameters one by one, which unties them)."""
        self.lm_head.weight = self.tok_emb.weight

    # -- forward ----------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab).

        With ``cache`` the tokens continue the cached sequence: their positions start at
        ``cache.length`` and their keys and values are appended to it.
        """
        past = cache.length if cache is not None else 0
        x = self.embed(idx, past)
        for i, block in enumerate(self.layers.values()):
            x = block(x, cache.layers[i] if cache is not None else None)
        return self.head(x, past, cache)

    # The forward pass in three parts, so that a pipeline stage can run the part it holds:
    # embed (first stage) -> some blocks -> head (last stage).

    def embed(self, idx: torch.Tensor, past: int = 0) -> torch.Tensor:
        """Token ids (B, T) at positions ``past ..`` -> input hidden states (B, T, C)."""
        t = idx.size(1)
        if past + t > self.cfg.block_size:
            raise ValueError(f"sequence of {past + t} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.positions == "sinusoidal":  # Vaswani et al. 3.4: token embeddings × √C beside the fixed ±1 rows
            x = x * self.cfg.n_embd**0.5
        if hasattr(self, "pos_emb"):  # learned or sinusoidal; rotary and relative positions enter in attention
            pos = torch.arange(past, past + t, device=idx.device)  # (T,)
            x = x + self.pos_emb(pos).to(x.dtype)  # (T, C), broadcast over the batch
        return self.drop(x)  # (B, T, C)

    def head(self, x: torch.Tensor, past: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Last hidden states (B, T, C) -> logits (B, T, vocab)."""
        pos = torch.arange(past, past + x.size(1), device=x.device)  # (T,)
        x = self.ln_f(x)
        x = self.head_layer(x, pos, cache)
        return self.lm_head(x)  # (B, T, vocab)

    def head_layer(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """What runs between the final LayerNorm and the output projection: nothing, for GPT."""
        return x

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg, self.n_attention_layers, batch, max_len or self.cfg.block_size,
                       p.device, p.dtype)
