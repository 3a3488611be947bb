import json
import shutil

import pytest
import torch

import loom.train.checkpoint as ckpt_mod
from loom.errors import RunError
from loom.infer.load import load_for_inference
from loom.train.checkpoint import checkpoint_dirs, latest_checkpoint
from loom.train.metrics import read_metrics
from tests.helpers import train


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def final_params(run_dir):
    _, model, _, _ = load_for_inference(run_dir, "cpu")
    return {k: v.clone() for k, v in model.state_dict().items()}


# dropout makes the RNG state part of what a resume must restore; grad_accum and clipping too
RESUME_SETTINGS = ["model.dropout=0.1", "train.grad_accum=2", "train.grad_clip=0.5"]


@pytest.mark.parametrize("extra", [
    ["model=gpt-tiny", "train.optimizer=adamw"],
    ["model=pangu-tiny", "train.optimizer=lamb", "train.precision=bf16"],
    ["model=gpt-tiny", "train.precision=fp64"],  # float64 weights and optimizer state round-trip too
    # a checkpoint between two log records: the first record after the resume must average the
    # same steps as the uninterrupted run's
    ["model=gpt-tiny", "train.log_every=3"],
])
def test_resume_equals_an_uninterrupted_run_step_for_step(tiny_config, tmp_path, extra):
    whole = tmp_path / "whole"
    train(tiny_config(*RESUME_SETTINGS, *extra, run_dir=whole), whole)

    cut = tmp_path / "cut"
    train(tiny_config(*RESUME_SETTINGS, *extra, run_dir=cut), cut)
    # crash after the step-4 checkpoint: what came later is lost
    shutil.rmtree(cut / "checkpoints" / "step_0000008")
    assert latest_checkpoint(cut).name == "step_0000004"
    train(tiny_config(*RESUME_SETTINGS, *extra, run_dir=cut), cut, resume=True)

    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b) and 8 in a
    assert all(a[s] == b[s] for s in a), (a, b)  # exact, not approximate
    pa, pb = final_params(whole), final_params(cut)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    want = torch.float64 if "train.precision=fp64" in extra else torch.float32
    assert all(v.dtype == want for v in pa.values() if v.is_floating_point())


def test_a_crash_mid_save_never_leaves_a_checkpoint_that_looks_valid(tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = ckpt_mod.dcp.save

    def crash_on_second_save(state, checkpoint_id):
        if "step_0000008" in str(checkpoint_id):
            real_save(state, checkpoint_id=checkpoint_id)  # the files are written ...
            raise KeyboardInterrupt  # ... but the process dies before the rename
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(ckpt_mod.dcp, "save", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run_dir=run), run)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000004"]
    assert list((run / "checkpoints").glob("step_0000008.tmp-*"))  # the partial save is there ...

    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    train(tiny_config(run_dir=run), run, resume=True)
    assert not list((run / "checkpoints").glob("*.tmp-*"))  # ... and cleared on resume
    assert latest_checkpoint(run).name == "step_0000008"


def test_a_run_writes_what_a_user_reads(tiny_config, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config("train.steps=12", run_dir=run), run)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12]
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file() and (run / "tokenizer").is_dir()
    assert json.loads((run / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert summary["unigram_entropy_nats"] > 0


def test_training_twice_into_one_run_dir_is_refused(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.steps=4", run_dir=run), run)
    with pytest.raises(RunError, match="--resume"):
        train(tiny_config("train.steps=4", run_dir=run), run)


def test_resuming_a_finished_run_changes_nothing(tiny_config, tmp_path):
    run = tmp_path / "run"
    first = train(tiny_config("train.steps=4", run_dir=run), run)
    before = (run / "metrics.jsonl").read_text()
    assert train(tiny_config("train.steps=4", run_dir=run), run, resume=True) == first
    assert (run / "metrics.jsonl").read_text() == before


def test_fp16_run_skips_a_step_with_injected_inf_and_says_so(tiny_config, tmp_path, monkeypatch, caplog):
    import loom.train.trainer as trainer_module

    real_parallelize = trainer_module.parallelize
    calls = {"n": 0}

    def poison_second_backward(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 2 else grad

    def parallelize_with_hook(*args, **kwargs):
        pm = real_parallelize(*args, **kwargs)
        pm.modules[0].layers["0"].mlp.fc.weight.register_hook(poison_second_backward)
        return pm

    monkeypatch.setattr(trainer_module, "parallelize", parallelize_with_hook)
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="loom.train"):
        summary = train(tiny_config("train.precision=fp16", "train.steps=3", "train.eval_every=3", run_dir=run), run)
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert records[1]["grad_norm"] is None  # inf, which JSON cannot hold
    assert records[1]["loss_scale"] == records[0]["loss_scale"] / 2
    assert summary["skipped_steps"] == 1
    assert "step 1: fp16 gradients hold inf/NaN; optimizer step skipped" in caplog.text


@pytest.mark.slow
def test_training_learns_well_below_the_unigram_entropy(tiny_config, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config("train.steps=300", "train.batch_size=16", "train.lr=3e-3", "train.eval_every=300",
                                "train.eval_batches=8", "train.log_every=50", "train.ckpt_every=0",
                                run_dir=run), run)
    assert summary["val_loss"] < summary["unigram_entropy_nats"] - 0.5


def test_pangu_trains_on_chinese_with_jieba_sentencepiece_and_generates_chinese(tiny_config, tmp_path, chinese_lines):
    from loom.infer.generate import generate

    corpus = tmp_path / "zh.jsonl"
    docs = ["".join(chinese_lines(20, seed=i)) for i in range(150)]
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    run = tmp_path / "run"
    summary = train(tiny_config("model=pangu-tiny", f"data.path={corpus}", "train.steps=30", "train.eval_every=30",
                                "train.lr=3e-3", "train.precision=bf16", "train.ckpt_every=0", run_dir=run), run)
    assert json.loads((run / "data.json").read_text())["kind"] == "jieba-sp"  # chosen by auto
    assert summary["val_loss"] < summary["unigram_entropy_nats"]

    _, model, tok, _ = load_for_inference(run, "cpu")
    prompt = tok.encode("我们今天")
    out = generate(model, torch.tensor([prompt]), 12, temperature=0.5, seed=0)
    text = tok.decode(out[0].tolist())
    assert text.startswith("我们今天")
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) > len(text) // 2


def test_resume_after_a_torn_metrics_line(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run_dir=run), run)
    shutil.rmtree(run / "checkpoints" / "step_0000008")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')  # the process died mid-write
    train(tiny_config(run_dir=run), run, resume=True)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 9))


def test_resume_refuses_to_change_the_model_or_data_and_leaves_the_run_intact(tiny_config, tmp_path):
    from loom.config import ConfigError
    from loom.train.rundir import load_resume_config

    run = tmp_path / "run"
    train(tiny_config(run_dir=run), run)
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="--resume keeps the run's model: model.n_embd=32"):
        load_resume_config(run, ["model.n_embd=32"])
    with pytest.raises(ConfigError, match="--resume keeps the run's data"):
        load_resume_config(run, ["data.val_fraction=0.2"])
    assert load_resume_config(run, ["train.steps=20"]).train.steps == 20
    assert (run / "config.yaml").read_text() == before


def test_diverging_training_stops_with_one_line(tiny_config, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"training diverged: the loss is nan at step \d+; lower train.lr"):
        train(tiny_config("train.lr=1e30", "train.grad_clip=0", "train.warmup_steps=0", run_dir=run), run)
