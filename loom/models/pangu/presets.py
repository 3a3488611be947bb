"""PanGu-α's named shapes (Zeng et al. 2021, Table 1). ``n_layer`` counts the top query layer, as the
reference implementation does (``n_layer - 1`` decoder blocks followed by the top query layer).
``pangu-tiny`` exists for tests; ``pangu-mini`` trains in minutes on two CPU cores."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "pangu-tiny": dict(n_layer=3, n_head=4, n_embd=64, block_size=64, vocab_size=512),
    "pangu-mini": dict(n_layer=5, n_head=4, n_embd=192, block_size=256, vocab_size=4096),
    "pangu-2.6b": dict(n_layer=32, n_head=32, n_embd=2560, ffn_hidden=10240, block_size=1024, vocab_size=40000),
    "pangu-13b": dict(n_layer=40, n_head=40, n_embd=5120, ffn_hidden=20480, block_size=1024, vocab_size=40000),
    "pangu-200b": dict(n_layer=64, n_head=128, n_embd=16384, ffn_hidden=65536, block_size=1024, vocab_size=40000),
}

PUBLISHED_PARAMS: dict[str, float] = {
    "pangu-2.6b": 2.6e9,
    "pangu-13b": 13.1e9,
    "pangu-200b": 207.0e9,
}
