"""Llama's named shapes.

Llama 3 (Grattafiori et al. 2024, "The Llama 3 Herd of Models", Table 3): 8B, 70B and 405B, each
with grouped-query attention of 8 key/value heads, a 128,256-token vocabulary, SwiGLU widths
14,336 / 28,672 / 53,248 and rotary base θ = 500,000; context 8,192 as pre-trained (the 128K
extension of Llama 3.1 rescales the rotary frequencies, which loom does not model).

Counted as the model holds them (``loom describe``): every weight once, the input embedding and
the untied output projection separately, the RMSNorm weights included; there are no biases.
``llama-tiny`` exists for tests; ``llama-mini`` has gpt-mini's depth, width and heads (4 layers,
d=192) with 2 key/value heads and an FFN of 512 (three matrices, as many weights as gpt-mini's
768-wide GELU MLP), and trains in minutes on two CPU cores.
"""

from __future__ import annotations

_LLAMA = dict(bias=False, layer_norm_eps=1e-5, positions="rotary")
_LLAMA3 = dict(_LLAMA, vocab_size=128256, block_size=8192, rope_theta=500000.0, n_kv_head=8)

PRESETS: dict[str, dict] = {
    "llama-tiny": dict(_LLAMA, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=176, block_size=64,
                       vocab_size=512),
    "llama-mini": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=192, ffn_hidden=512, block_size=256,
                       vocab_size=4096),
    "llama3-8b": dict(_LLAMA3, n_layer=32, n_head=32, n_embd=4096, ffn_hidden=14336),
    "llama3-70b": dict(_LLAMA3, n_layer=80, n_head=64, n_embd=8192, ffn_hidden=28672),
    "llama3-405b": dict(_LLAMA3, n_layer=126, n_head=128, n_embd=16384, ffn_hidden=53248),
}

# As the Llama 3 paper names them (Table 3); loom's counts: 8.030B, 70.554B, 405.853B.
PUBLISHED_PARAMS: dict[str, float] = {
    "llama3-8b": 8e9,
    "llama3-70b": 70e9,
    "llama3-405b": 405e9,
}
