"""GPT's named shapes.

The published presets carry the shapes of the papers that introduced them: GPT-2 (Radford et al.
2019) and GPT-3 (Brown et al. 2020, Table 2.1). ``gpt-tiny`` exists for tests; ``gpt-mini`` trains in
minutes on two CPU cores and is what ``loom train`` uses by default.

The MoE presets put sparse Mixture-of-Experts feed-forward layers in the decoder (``moe``): Switch-Base
(Fedus et al. 2022, 128 experts in every other layer, top-1) as a decoder of the same 24 layers as
T5-Base's encoder plus decoder, and GLaM 64B/64E (Du et al. 2022, Table 4: 64 experts in every other of
64 layers, top-2).
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # -- for tests: a few seconds per hundred steps -----------------------------------------
    "gpt-tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512),
    "switch-tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512,
                        moe=dict(experts=8, every=1, router="switch", top_k=1, capacity_factor=1.25)),
    "glam-tiny": dict(n_layer=4, n_head=4, n_embd=64, block_size=64, vocab_size=512,
                      moe=dict(experts=8, every=2, router="top2", top_k=2, capacity_factor=1.25)),
    # -- for a CPU: learns Python in minutes on 2 cores -------------------------------------
    "gpt-mini": dict(n_layer=4, n_head=4, n_embd=192, block_size=256, vocab_size=4096),
    # -- GPT-2 and GPT-3 ---------------------------------------------------------------------
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257),
    # -- sparse Mixture-of-Experts ------------------------------------------------------------
    "switch-base": dict(n_layer=24, n_head=12, n_embd=768, ffn_hidden=3072, block_size=512, vocab_size=32128,
                        moe=dict(experts=128, every=2, router="switch", top_k=1, capacity_factor=1.25)),
    "glam-1.2t": dict(n_layer=64, n_head=128, n_embd=8192, ffn_hidden=32768, block_size=1024, vocab_size=256000,
                      moe=dict(experts=64, every=2, router="top2", top_k=2, capacity_factor=1.25)),
}

# Parameter counts as published (used by tests and `loom describe`).
PUBLISHED_PARAMS: dict[str, float] = {
    "gpt2-124m": 124e6,
    "gpt2-350m": 355e6,
    "gpt2-1.5b": 1.558e9,  # OpenAI's released "1.5B" model: 1,557,611,200 with tied embeddings
    "gpt3-175b": 175e9,
    "switch-base": 7.4e9,  # Switch-Base, 128 experts (T5-Base encoder-decoder)
    "glam-1.2t": 1.2e12,  # GLaM 64B/64E: gated FFNs and relative position biases, not modelled here
}
