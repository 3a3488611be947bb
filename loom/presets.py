"""Named model shapes.

The published presets carry the shapes of the papers that introduced them:
GPT-2 (Radford et al. 2019), GPT-3 (Brown et al. 2020, Table 2.1) and PanGu-α (Zeng et al. 2021,
Table 1). The ``*-tiny`` presets exist for tests; the ``*-mini`` presets train in minutes on two CPU
cores and are what ``loom train`` uses by default.

For PanGu-α ``n_layer`` counts the top query layer, as the reference implementation does
(``n_layer - 1`` decoder blocks followed by the top query layer).
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # -- for tests: a few seconds per hundred steps -----------------------------------------
    "gpt-tiny": dict(arch="gpt", n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512),
    "pangu-tiny": dict(arch="pangu", n_layer=3, n_head=4, n_embd=64, block_size=64, vocab_size=512),
    # -- for a CPU: learns Python in minutes on 2 cores -------------------------------------
    "gpt-mini": dict(arch="gpt", n_layer=4, n_head=4, n_embd=192, block_size=256, vocab_size=4096),
    "pangu-mini": dict(arch="pangu", n_layer=5, n_head=4, n_embd=192, block_size=256, vocab_size=4096),
    # -- GPT-2 and GPT-3 ---------------------------------------------------------------------
    "gpt2-124m": dict(arch="gpt", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-350m": dict(arch="gpt", n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-1.5b": dict(arch="gpt", n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
    "gpt3-175b": dict(arch="gpt", n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257),
    # -- PanGu-α -------------------------------------------------------------------------------
    "pangu-2.6b": dict(arch="pangu", n_layer=32, n_head=32, n_embd=2560, ffn_hidden=10240,
                       block_size=1024, vocab_size=40000),
    "pangu-13b": dict(arch="pangu", n_layer=40, n_head=40, n_embd=5120, ffn_hidden=20480,
                      block_size=1024, vocab_size=40000),
    "pangu-200b": dict(arch="pangu", n_layer=64, n_head=128, n_embd=16384, ffn_hidden=65536,
                       block_size=1024, vocab_size=40000),
}

# Parameter counts as published, for the presets that have one (used by tests and `loom describe`).
PUBLISHED_PARAMS: dict[str, float] = {
    "gpt2-124m": 124e6,
    "gpt2-350m": 355e6,
    "gpt2-1.5b": 1.558e9,  # OpenAI's released "1.5B" model: 1,557,611,200 with tied embeddings
    "gpt3-175b": 175e9,
    "pangu-2.6b": 2.6e9,
    "pangu-13b": 13.1e9,
    "pangu-200b": 207.0e9,
}

DEFAULT_PRESET = "gpt-mini"
