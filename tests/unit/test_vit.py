"""ViT: patches as tokens, the published shapes, and the digits task."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from loom.config import load_config
from loom.models import build_model, count_params, materialize
from loom.tasks import build_task
from tests.distributed.parity import tiny_image_data


def test_patch_embedding_is_a_strided_convolution():
    cfg = load_config(None, ["model=vit-tiny"]).model
    model = materialize(build_model(cfg).double(), "cpu", seed=0)
    images = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    x = model.embed(images)  # (B, 1 + 16, d)
    conv = F.conv2d(images, model.patch_proj.weight.view(-1, 1, 2, 2), model.patch_proj.bias, stride=2)
    patches = conv.flatten(2).transpose(1, 2)  # (B, 16, d), rows first
    torch.testing.assert_close(x[:, 1:], patches + model.pos_emb.weight[1:])
    torch.testing.assert_close(x[:, 0], (model.cls_emb.weight[0] + model.pos_emb.weight[0]).expand(3, -1))
    assert model(images).shape == (3, 10)


def test_published_shapes():
    counts = {p: count_params(build_model(load_config(None, [f"model={p}"]).model))
              for p in ("vit-b-16", "vit-l-16", "vit-h-14")}
    # with the 1000-class head: 86M, 307M (the paper rounds up 304.3M), 632M
    assert counts == {"vit-b-16": 86_567_656, "vit-l-16": 304_326_632, "vit-h-14": 632_045_800}


def test_digits_task_holds_out_a_fixed_fifth():
    task = build_task("image_classification", tiny_image_data(), 17, 16, seed=0)
    batch = task.train_batch(3, slice(0, 16))
    assert batch["images"].shape == (16, 1, 8, 8) and batch["images"].max() <= 1.0 and task.n_classes == 10
    assert sum(len(b["labels"]) for b in task.eval_batches(1000)) == 359  # 20% of 1,797
    other = build_task("image_classification", tiny_image_data(), 17, 16, seed=7)
    assert np.array_equal(other.val[1], task.val[1])


def test_image_folder(tmp_path):
    from PIL import Image

    from loom.tasks.image_classification import image_folder

    for k, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((5, 7), 100 * k, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    images, labels, names = image_folder(tmp_path, size=8, channels=1)
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1] and names == ["a", "b"]
    assert images[0].max() == 0 and abs(images[-1].mean() - 100 / 255) < 1e-6
