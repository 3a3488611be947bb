"""ViT's named shapes (Dosovitskiy et al. 2020, Table 1): ViT-Base/16 (86M), ViT-Large/16 (307M),
ViT-Huge/14 (632M) on 224×224 RGB images, counted with the 1000-class ImageNet head.
``vit-tiny`` reads scikit-learn's 8×8 handwritten digits (10 classes) in 2×2 patches."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "vit-tiny": dict(n_layer=4, n_head=4, n_embd=64, image_size=8, patch_size=2, channels=1, n_classes=10,
                     block_size=17, vocab_size=257),
    "vit-b-16": dict(n_layer=12, n_head=12, n_embd=768, image_size=224, patch_size=16, channels=3, n_classes=1000,
                     block_size=197, vocab_size=257, layer_norm_eps=1e-6),
    "vit-l-16": dict(n_layer=24, n_head=16, n_embd=1024, image_size=224, patch_size=16, channels=3, n_classes=1000,
                     block_size=197, vocab_size=257, layer_norm_eps=1e-6),
    "vit-h-14": dict(n_layer=32, n_head=16, n_embd=1280, image_size=224, patch_size=14, channels=3, n_classes=1000,
                     block_size=257, vocab_size=257, layer_norm_eps=1e-6),
}

PUBLISHED_PARAMS: dict[str, float] = {"vit-b-16": 86e6, "vit-l-16": 307e6, "vit-h-14": 632e6}
