"""BERT's named shapes (Devlin et al. 2018, section 3): BERT-Base L=12, H=768, A=12 ("110M") and
BERT-Large L=24, H=1024, A=16 ("340M"), WordPiece vocabulary of 30,522, 512 positions, post-LayerNorm.

How they are counted: every distinct parameter of the pretraining model (embeddings, encoder,
pooler, masked-LM transform and decoder bias, next-sentence head; the decoder's weight is the token
embedding and counts once): bert-base 110,106,428 (+0.10% on 110M); bert-large 336,226,108, which is
1.1% under the paper's rounded "340M" (the released checkpoint holds the same 336.2M).

``bert-tiny`` is for tests; ``bert-mini`` learns on 2 CPU cores in minutes.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "bert-tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=512, post_ln=True),
    "bert-mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=4096, post_ln=True),
    "bert-base": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=30522, post_ln=True,
                      layer_norm_eps=1e-12),
    "bert-large": dict(n_layer=24, n_head=16, n_embd=1024, block_size=512, vocab_size=30522, post_ln=True,
                       layer_norm_eps=1e-12),
}

PUBLISHED_PARAMS: dict[str, float] = {
    "bert-base": 110e6,
    "bert-large": 340e6,  # rounded up in the paper: the published shape holds 336.2M (see above)
}
