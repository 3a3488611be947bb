"""Image classification (ViT): images in, one label each.

**Data.** scikit-learn's handwritten digits (1,797 8×8 grayscale images, 10 classes, shipped
inside the package: no download), or ``data.path=DIR``: a folder in the usual one-subfolder-per-class
layout (``DIR/cat/1.png``, ``DIR/dog/7.jpg``), read with Pillow, each image converted to the model's
channels (grayscale or RGB) and resized to its ``image_size``; the subfolders' sorted names are the
labels. No text is read and no tokenizer made. Pixels are scaled to [0, 1]. A fixed 20% is
held out (the same for every seed). The loss is the mean cross-entropy over the images; ``loom eval``
reports accuracy and macro-F1 beside the majority-class baseline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loom.errors import ConfigError
from loom.models.config import ModelConfig
from loom.tasks.base import Batch, OneLabelTask
from loom.tasks.classification import HELD_OUT

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's handwritten digits: images (n, 1, 8, 8) in [0, 1], labels, label names."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64), [str(i) for i in range(10)]


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file as (channels, size, size) in [0, 1]: grayscale (1) or RGB (3), resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size))
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{str(path)!r} is not an image Pillow can read ({e.__class__.__name__})") from None
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def image_folder(root: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image under ``root/<class>/``, as (n, channels, size, size) in [0, 1], labels, class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                images.append(read_image(f, size, channels))
                labels.append(k)
    if len(classes) < 2 or not images:
        raise ConfigError(f"data.path={str(root)!r} needs one subfolder of images per class (2 or more); "
                          f"found {len(classes)} classes and {len(images)} images")
    return np.stack(images), np.array(labels, dtype=np.int64), classes


@dataclass
class ImageData:
    """A task's images, what ``loom train`` prepares instead of a token corpus for this task."""

    images: tuple[np.ndarray, np.ndarray, list[str]]  # (n, C, H, W) in [0, 1], labels, label names
    meta: dict = field(default_factory=dict)  # data.json
    tokenizer: None = None  # images need none


def load_images(path: str | None, model: ModelConfig) -> ImageData:
    """The digits (``path`` None) or the folder ``path``, at the model's size and channels."""
    if path is None:
        if (model.image_size, model.channels) != (8, 1):
            raise ConfigError(f"the built-in digits are 8x8 grayscale, but the model reads {model.channels}-channel "
                              f"{model.image_size}x{model.image_size} images; set data.path=DIR (one subfolder of "
                              "images per class) or model.image_size=8 model.channels=1")
        images, source = digits(), "sklearn-digits"
    else:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.path={path!r}: image classification reads a folder with one subfolder of "
                              "images per class (DIR/cat/1.png, DIR/dog/2.jpg)")
        images, source = image_folder(root, model.image_size, model.channels), str(root.resolve())
    counts = np.bincount(images[1], minlength=len(images[2]))
    return ImageData(images, {"source": source, "images": int(len(images[1])), "image_size": model.image_size,
                              "channels": model.channels, "labels": dict(zip(images[2], map(int, counts)))})


class ImageClassification(OneLabelTask):
    """Batches: ``images`` (B, C, H, W) and ``labels`` (B,)."""

    name = "image_classification"
    example_noun = "images"
    load_data = staticmethod(load_images)  # its data: images, not a token corpus

    @classmethod
    def from_data(cls, data, block_size: int, batch_size: int, seed: int) -> ImageClassification:
        images = getattr(data, "images", None)  # (images, labels, names), given directly
        task = cls(*(images if images is not None else digits()), batch_size=batch_size, seed=seed)
        task.seq = block_size
        return task

    @staticmethod
    def image_batch(paths: list[Path], size: int, channels: int) -> Batch:
        """Image files as the model reads them (``loom predict``); ``labels`` all 0."""
        images = np.stack([read_image(Path(p), size, channels) for p in paths])
        return {"images": torch.from_numpy(images), "labels": torch.zeros(len(paths), dtype=torch.long)}

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

    @staticmethod  # loom predict calls it on the class
    def inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
        return (batch["images"],)

    def tokens(self, batch: Batch) -> int:
        return batch["labels"].numel() * self.seq  # each image is patches + [CLS] tokens
