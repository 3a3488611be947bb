"""Fine-tuning: ``train.init_from`` starts from another run's weights (not its optimizer or step),
drops the heads the new task does not use and initializes the new ones; the classification task's
batches and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom.config import ConfigError, config_to_yaml
from loom.parallel.plan import resolve_plan
from loom.tasks import build_task
from loom.tasks.classification import classification_metrics, read_labelled
from loom.train.init_from import run_init_config
from loom.train.rundir import load_run_config
from loom.train.trainer import Trainer
from tests.distributed.parity import (
    COMMON,
    config,
    process_of_this_rank,
    tiny_data,
    tiny_labelled_data,
    train_and_save,
    trainer,
)


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


# a gpt-tiny of another shape than its preset's (two blocks of width 64): one block of width 32, two heads
SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.dropout=0.0"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run of the SMALL model trained 2 steps: its checkpoint and its config.yaml."""
    run = tmp_path_factory.mktemp("small") / "run"
    train_and_save("gpt", SMALL, str(run), steps=2)
    (run / "config.yaml").write_text(config_to_yaml(config("gpt", SMALL)))
    return run


def test_a_run_started_from_a_loom_run_has_its_model_and_its_weights(small_run):
    """``train.init_from=RUN`` with no model.* settings: the run's model (not gpt-tiny's preset shape),
    and its first loss is the one the run's weights give on that batch."""
    cfg = run_init_config(small_run, COMMON)
    assert cfg.model == load_run_config(small_run).model and cfg.model.n_layer == 1 and cfg.model.n_embd == 32
    t = Trainer(cfg, resolve_plan(cfg, 1), None, tiny_data(), process=process_of_this_rank(),
                device=torch.device("cpu"))
    old = trainer("gpt", SMALL, process_of_this_rank(), small_run, resume=True)  # the run's own weights
    fresh = trainer("gpt", SMALL, process_of_this_rank())
    assert t.start_step == 0 and old.start_step == 2
    first = [x.mean_over_replicas(x.train_step(0)[0]).item() for x in (t, old, fresh)]
    assert first[0] == first[1] and first[0] != first[2], first


def test_settings_that_keep_the_runs_weights_apply(small_run):
    cfg = run_init_config(small_run, [*COMMON, "model=gpt-tiny", "model.dropout=0.1", "model.rope_theta=500"])
    saved = load_run_config(small_run).model
    assert cfg.model.dropout == 0.1 and cfg.model.preset == saved.preset
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == (saved.n_layer, saved.n_embd,
                                                                          saved.vocab_size)


@pytest.mark.parametrize("args, fragment", [
    (["model.n_embd=64"], "model.n_embd=64 (the run's 32) would change the run's weights ("),
    (["model.n_layer=2", "model.n_head=4"], "model.n_layer=2 (the run's 1) would change the run's weights (the "
                                            "run has no layers.1."),
    (["model.vocab_size=600"], "model.vocab_size=600 (the run's 512) would change the run's weights (tok_emb"),
    (["model.bias=false"], "model.bias=false (the run's true) would change the run's weights (this model has no"),
    (["model=gpt-mini"], "model=gpt-mini (n_layer=4, n_head=4, n_embd=192, block_size=256, vocab_size=4096; the "
                         "run has n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=512) would change the"),
    (["model=bert-mini"], "is a model.arch=gpt run (model=gpt-tiny); model=bert-mini is a bert: leave model= out"),
])
def test_a_setting_that_changes_the_runs_weights_is_one_line_before_launch(args, fragment, small_run, tmp_path,
                                                                         loom_cli):
    code, _, err = loom_cli("train", *args, f"train.init_from={small_run}", f"train.run_dir={tmp_path / 'run'}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"loom: error: train.init_from={small_run}") and fragment in err, err
    assert "model.n_head" not in err and not (tmp_path / "run").exists()  # the head count keeps every shape


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
