"""Fine-tuning: ``train.init_from`` starts from another run's weights (not its optimizer or step),
drops the heads the new task does not use and initializes the new ones; the classification task's
batches and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom.config import ConfigError
from loom.tasks import build_task
from loom.tasks.classification import classification_metrics, read_labelled
from tests.distributed.parity import process_of_this_rank, tiny_labelled_data, train_and_save, trainer


def test_init_from_moves_the_encoder_and_leaves_the_new_head_fresh(tmp_path):
    pretrained = tmp_path / "pretrained"
    train_and_save("bert", [], str(pretrained), steps=3)
    saved = trainer("bert", [], process_of_this_rank(), pretrained, resume=True)
    old = {n: p.detach().clone() for n, p in saved.model.named_parameters()}
    assert saved.start_step == 3

    t = trainer("bert-cls", [f"train.init_from={pretrained}"], process_of_this_rank())
    fresh = trainer("bert-cls", [], process_of_this_rank())
    got = dict(t.model.named_parameters())
    assert t.start_step == 0 and t.cfg.model.n_classes == 3  # sized by the data's labels
    assert not any(name.startswith(("mlm_", "nsp_")) for name in got)  # the pretraining heads are dropped
    for name, p in got.items():
        if name.startswith("classifier"):  # new: as a run without init_from initializes it
            assert torch.equal(p, dict(fresh.model.named_parameters())[name])
        else:  # moved: the pretrained run's values, not the fresh ones
            assert torch.equal(p, old[name]), name
            assert not torch.equal(p, dict(fresh.model.named_parameters())[name]) or name.endswith("bias")
    assert all(not s for s in (opt.state for opt in t.optimizers))  # no optimizer state came along
    # and it trains from there
    first = t.mean_over_replicas(t.train_step(0)[0]).item()
    assert np.isfinite(first)


def test_init_from_without_a_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        trainer("bert-cls", [f"train.init_from={tmp_path}"], process_of_this_rank())


def test_classification_batches_and_metrics():
    data = tiny_labelled_data()
    task = build_task("classification", data, 32, 8, seed=0)
    b = task.train_batch(4, slice(0, 8))
    assert b["input_ids"].shape == (8, 32) and (b["input_ids"][:, 0] == 2).all() and b["labels"].shape == (8,)
    n = b["attention_mask"].sum(1)
    assert all(b["input_ids"][r, n[r] - 1] == 3 and (b["input_ids"][r, n[r]:] == 0).all() for r in range(8))
    assert torch.equal(task.train_batch(4, slice(2, 5))["input_ids"], b["input_ids"][2:5])
    held_out = sum(len(x["labels"]) for x in task.eval_batches(1000))
    assert held_out == 80 and len(task.train[-1]) == 320  # 20% of 400, the same for every seed
    assert np.array_equal(build_task("classification", data, 32, 8, seed=9).val[0], task.val[0])
    # metrics from a confusion matrix (true, predicted)
    m = classification_metrics(np.array([[3.0, 1.0], [0.0, 4.0]]), majority=1)
    assert m["accuracy"] == 7 / 8 and m["macro_f1"] == pytest.approx((6 / 7 + 8 / 9) / 2)
    assert m["majority_accuracy"] == 0.5 and m["majority_macro_f1"] == pytest.approx((0 + 2 * 4 / 12) / 2)


def test_labelled_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x y", "label": "pos"}\n{"text": "z", "label": "neg"}\n')
    (tmp_path / "a.csv").write_text("text,label\nx y,pos\nz,neg\n")
    assert read_labelled(tmp_path / "a.jsonl") == read_labelled(tmp_path / "a.csv") == [("x y", "pos"), ("z", "neg")]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="needs a 'text' and a 'label'"):
        read_labelled(tmp_path / "b.jsonl")
