"""The encoder-decoder's named shapes.

Vaswani et al. 2017, Table 3: the base model (N=6 layers in each stack, d=512, 8 heads, FFN 2048,
dropout 0.1) "65M" and the big one (d=1024, 16 heads, FFN 4096, dropout 0.3) "213M", with the
shared source-target vocabulary of about 37,000 tokens of WMT English-German (section 5.1).
T5 (Raffel et al. 2020, section 3.7): t5-small (6+6 layers, d=512, 8 heads, FFN 2048) "60M",
t5-base (12+12, d=768, 12 heads, FFN 3072) "220M", t5-large (24+24, d=1024, 16 heads, FFN 4096)
"770M", SentencePiece vocabulary of 32,000 (32,128 embedding rows as released). Switch Transformer
(Fedus et al. 2022, Table 9): Switch-Base, T5-Base with 128 experts in every other feed-forward
layer of both stacks, "7.4B".

How they are counted: every distinct parameter as the model holds it (``loom describe``), the shared
embedding once (it is also the output projection), every norm and bias:

==================  =============  ==========  ==========
preset              loom           published   difference
==================  =============  ==========  ==========
transformer-base       63,082,496  65M         -2.95%
transformer-big       214,245,376  213M        +0.58%
t5-small               60,506,624  60M         +0.84%
t5-base               222,903,552  220M        +1.32%
t5-large              737,668,096  770M        -4.2%
switch-base-128     7,415,217,408  7.4B        +0.21%
==================  =============  ==========  ==========

The T5 counts are those of the released checkpoints (60,506,624; 222,903,552; 737,668,096): one
relative-bias table per stack, as released; the paper's "770M" and "220M" are rounded. No one vocabulary makes both
of Vaswani's counts exact (65M needs ~40,800 tokens, 213M ~35,900); with the paper's 37,000 the big
model is within 0.6%, the base 3% under.

``*-tiny`` presets are for tests; ``*-mini`` ones learn the built-in seq2seq task on 2 CPU cores in minutes.
"""

from __future__ import annotations

# Vaswani et al. 2017: post-LN, LayerNorm with biases, sinusoidal positions, ReLU
_VASWANI = dict(post_ln=True, norm="layer", positions="sinusoidal", feed_forward="relu", bias=True,
                layer_norm_eps=1e-6)
# T5 (Raffel et al. 2020): pre-RMSNorm, relative position bias, no biases, ReLU
_T5 = dict(post_ln=False, norm="rms", positions="relative", feed_forward="relu", bias=False,
           layer_norm_eps=1e-6)
_T5_SIZES = dict(vocab_size=32128, block_size=512, dropout=0.1)
_T5_FULL = {**_T5, **_T5_SIZES}
_SWITCH = dict(experts=128, every=2, router="switch", top_k=1, capacity_factor=1.25)

PRESETS: dict[str, dict] = {
    "transformer-tiny": dict(_VASWANI, n_layer=2, decoder_layers=2, n_head=4, n_embd=64, ffn_hidden=256,
                             block_size=32, vocab_size=512),
    "transformer-mini": dict(_VASWANI, n_layer=3, decoder_layers=3, n_head=4, n_embd=128, ffn_hidden=512,
                             block_size=64, vocab_size=4096),
    "transformer-base": dict(_VASWANI, n_layer=6, decoder_layers=6, n_head=8, n_embd=512, ffn_hidden=2048,
                             block_size=512, vocab_size=37000, dropout=0.1),
    "transformer-big": dict(_VASWANI, n_layer=6, decoder_layers=6, n_head=16, n_embd=1024, ffn_hidden=4096,
                            block_size=512, vocab_size=37000, dropout=0.3),
    "t5-tiny": dict(_T5, n_layer=2, decoder_layers=2, n_head=4, n_embd=64, ffn_hidden=256, block_size=32,
                    vocab_size=512),
    "t5-mini": dict(_T5, n_layer=3, decoder_layers=3, n_head=4, n_embd=128, ffn_hidden=512, block_size=64,
                    vocab_size=4096),
    "t5-small": dict(_T5_FULL, n_layer=6, decoder_layers=6, n_head=8, n_embd=512, ffn_hidden=2048),
    "t5-base": dict(_T5_FULL, n_layer=12, decoder_layers=12, n_head=12, n_embd=768, ffn_hidden=3072),
    "t5-large": dict(_T5_FULL, n_layer=24, decoder_layers=24, n_head=16, n_embd=1024, ffn_hidden=4096),
    "encdec-switch-tiny": dict(_T5, n_layer=2, decoder_layers=2, n_head=4, n_embd=64, ffn_hidden=256,
                               block_size=32, vocab_size=512, moe=dict(_SWITCH, experts=4)),
    "switch-base-128": dict(_T5_FULL, n_layer=12, decoder_layers=12, n_head=12, n_embd=768, ffn_hidden=3072,
                            moe=_SWITCH),
}

PUBLISHED_PARAMS: dict[str, float] = {
    "transformer-base": 65e6,
    "transformer-big": 213e6,
    "t5-small": 60e6,
    "t5-base": 220e6,
    "t5-large": 770e6,
    "switch-base-128": 7.4e9,
}
