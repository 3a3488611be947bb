"""What a user watching a run sees: train.log holds the step lines and the error that stopped the
run whatever train.progress shows, the bar stays visible on a terminal that reports no width, and
the metrics reach TensorBoard event files."""

from __future__ import annotations

import io
import os

import pytest

from loom.train.metrics import read_metrics
from loom.train.trainer import BAR_FALLBACK_COLUMNS, Trainer, bar_width
from tests.conftest import TINY_OVERRIDES


def _args(corpus, run, *extra):
    return ["train", *TINY_OVERRIDES, f"data.path={corpus}", f"train.run_dir={run}", "train.device=cpu",
            "train.steps=4", "train.eval_every=4", "train.ckpt_every=4", *extra]


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_bar_without_terminal_width_stays_visible_and_log_and_tensorboard_hold_the_metrics(
        loom_cli, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    # a console that reports a size of 0 x 0: tqdm left to itself would draw nothing at all
    monkeypatch.setattr(os, "get_terminal_size", lambda *a: os.terminal_size((0, 0)))
    run = tmp_path / "run"
    code, _, err = loom_cli(*_args(tiny_corpus, run, "train.progress=bar"))
    assert code == 0, err
    assert "4/4" in err and "█" in err  # the bar itself is drawn, not only the counters
    text = (run / "train.log").read_text()
    for step in range(1, 5):
        assert f"step {step}/4 | loss " in text  # the step lines, though the terminal shows a bar
    assert "step 1/4" not in err  # ... and the terminal does not get them twice
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    scalars = _scalars(run / "tensorboard")
    for key, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                     ("tokens_per_s", "perf/tokens_per_s"), ("mfu", "perf/mfu")]:
        assert [s for s, _ in scalars[tag]] == [r["step"] for r in records]
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in records], rel=1e-6)  # float32
    val = read_metrics(run / "metrics.jsonl")[-1]
    assert scalars["val/loss"] == [(4, pytest.approx(val["val_loss"], rel=1e-6))]
    assert scalars["val/ppl"] == [(4, pytest.approx(val["val_ppl"], rel=1e-6))]


def test_tensorboard_can_be_switched_off(loom_cli, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = loom_cli(*_args(tiny_corpus, run, "train.steps=1", "train.tensorboard=false"))
    assert code == 0, err
    assert not (run / "tensorboard").exists()


def test_train_log_holds_the_one_line_error_that_stopped_the_run(loom_cli, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = loom_cli(*_args(tiny_corpus, run, "train.progress=bar", "train.lr=1e30", "train.grad_clip=0",
                                   "train.warmup_steps=0"))
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("loom: error: training diverged")]
    assert len(line) == 1 and err.count("loom: error:") == 1  # the terminal shows it once
    log = (run / "train.log").read_text()
    assert line[0] in log and "Traceback" not in log


def test_train_log_holds_the_traceback_of_an_unexpected_error(loom_cli, tiny_corpus, tmp_path, monkeypatch):
    real = Trainer.train_step

    def failing(self, step):
        if step == 2:
            raise RuntimeError("a bug in step 3")
        return real(self, step)

    monkeypatch.setattr(Trainer, "train_step", failing)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="a bug in step 3"):
        loom_cli(*_args(tiny_corpus, run, "train.progress=none"))
    log = (run / "train.log").read_text()
    assert "step 1/4 | loss" in log and "step 2/4 | loss" in log and "step 3/4" not in log
    assert "Traceback (most recent call last)" in log and "RuntimeError: a bug in step 3" in log
    assert "in failing" in log  # the frame that raised


def test_bar_width_falls_back_when_the_terminal_reports_none(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert bar_width(io.StringIO()) == {"ncols": BAR_FALLBACK_COLUMNS, "nrows": 20}  # not a terminal at all
    monkeypatch.setattr(os, "get_terminal_size", lambda *a: os.terminal_size((0, 0)))
    assert bar_width(io.StringIO()) == {"ncols": BAR_FALLBACK_COLUMNS, "nrows": 20}
    monkeypatch.setenv("COLUMNS", "72")
    assert bar_width(io.StringIO()) == {"ncols": 72, "nrows": 20}
    monkeypatch.setattr(os, "get_terminal_size", lambda *a: os.terminal_size((120, 40)))
    r, w = os.pipe()
    try:
        with os.fdopen(w, "w") as stream:
            assert bar_width(stream) == {"dynamic_ncols": True}
    finally:
        os.close(r)


def test_a_resumed_run_hides_the_tensorboard_events_of_the_steps_it_repeats(loom_cli, tiny_corpus, tmp_path,
                                                                           monkeypatch):
    real = Trainer.train_step

    def failing(self, step):
        if step == 3:  # after step 3 is logged, past the checkpoint of step 2
            raise RuntimeError("the machine went away")
        return real(self, step)

    run = tmp_path / "run"
    args = _args(tiny_corpus, run, "train.ckpt_every=2", "model.dropout=0.1")
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", failing)
        with pytest.raises(RuntimeError):
            loom_cli(*args)
    assert [s for s, _ in _scalars(run / "tensorboard")["train/loss"]] == [1, 2, 3]
    code, _, err = loom_cli("train", "--resume", str(run))
    assert code == 0, err
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    losses = _scalars(run / "tensorboard")["train/loss"]
    assert [s for s, _ in losses] == [1, 2, 3, 4]  # step 3 once: the resumed run's
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in records], rel=1e-6)
