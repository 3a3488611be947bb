"""Image classification (ViT): images in, one label each.

**Data.** scikit-learn's handwritten digits (1,797 8×8 grayscale images, 10 classes, shipped
inside the package: no download); :func:`image_folder` reads a folder in the usual
one-subfolder-per-class layout with Pillow (``loom train`` does not route ``data.path`` to it yet:
its data step reads text). Pixels are scaled to [0, 1]. A fixed 20% is
held out (the same for every seed). The loss is the mean cross-entropy over the images; ``loom eval``
reports accuracy and macro-F1 beside the majority-class baseline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from loom.errors import ConfigError
from loom.tasks.base import Batch, OneLabelTask
from loom.tasks.classification import HELD_OUT

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's handwritten digits: images (n, 1, 8, 8) in [0, 1], labels, label names."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64), [str(i) for i in range(10)]


def image_folder(root: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image under ``root/<class>/``, as (n, channels, size, size) in [0, 1], labels, class names."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    im = im.convert("L" if channels == 1 else "RGB").resize((size, size))
                    a = np.asarray(im, dtype=np.float32) / 255.0
                images.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
                labels.append(k)
    if len(classes) < 2 or not images:
        raise ConfigError(f"data.path={str(root)!r} needs one subfolder of images per class (2 or more); "
                          f"found {len(classes)} classes and {len(images)} images")
    return np.stack(images), np.array(labels, dtype=np.int64), classes


class ImageClassification(OneLabelTask):
    """Batches: ``images`` (B, C, H, W) and ``labels`` (B,)."""

    name = "image_classification"
    example_noun = "images"

    @classmethod
    def from_data(cls, data, block_size: int, batch_size: int, seed: int) -> ImageClassification:
        images = getattr(data, "images", None)  # (images, labels, names), given directly
        task = cls(*(images if images is not None else digits()), batch_size=batch_size, seed=seed)
        task.seq = block_size
        return task

    seq = 1  # the tokens an image is to the model (patches + [CLS]: model.block_size), for throughput

    def __init__(self, images: np.ndarray, labels: np.ndarray, names: list[str], batch_size: int, seed: int):
        self.label_names, self.n_classes = names, len(names)
        self.batch_size, self.seed = batch_size, seed
        order = np.random.default_rng(0).permutation(len(labels))  # the same held-out split for every run
        n_val = max(1, int(HELD_OUT * len(labels)))
        self.val = (images[order[:n_val]], labels[order[:n_val]])
        self.train = (images[order[n_val:]], labels[order[n_val:]])
        self.majority = int(np.bincount(self.train[1], minlength=self.n_classes).argmax())

    def train_batch(self, step: int, rows: slice) -> Batch:
        pick = np.random.default_rng([self.seed, step]).integers(len(self.train[1]), size=self.batch_size)[rows]
        return {"images": torch.from_numpy(self.train[0][pick]), "labels": torch.from_numpy(self.train[1][pick])}

    def eval_batches(self, max_batches: int) -> Iterator[Batch]:
        for k in range(min(max_batches, -(-len(self.val[1]) // self.batch_size))):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            yield {"images": torch.from_numpy(self.val[0][sl]), "labels": torch.from_numpy(self.val[1][sl])}

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch["images"],)

    def tokens(self, batch: Batch) -> int:
        return batch["labels"].numel() * self.seq  # each image is patches + [CLS] tokens
