"""The command line as a user meets it: real processes, exit codes, what is printed. Errors that
stop the command before it starts anything are checked in this process (``loom_cli``), the rest in
real ones."""

import json
import os
import signal
import subprocess
import sys

import pytest


def loom(*args, cwd=None, check=True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "loom", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"loom {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("args, fragment", [
    (["train", "model.n_layerz=3"], "unknown key 'model.n_layerz'"),
    (["train", "model=pangu-tiny", "model.n_head=5"], "not divisible by model.n_head=5"),
    (["train", "train.precision=fp4"], "choose one of: fp32, bf16, fp16"),
    (["train", "train.steps=ten"], "train.steps"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["train", "data.path=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["generate", "/tmp"], "not a loom run directory"),
    (["describe", "gpt-7"], "not a known preset"),
    (["describe", "gpt-tiny", "train.steps=3"], "model.key=value settings only"),
    (["train", "model=gpt3-175b"], "more than the"),  # 2.8 TB of training state: refused up front
    (["train", "train=3"], "'train' is a section of settings"),
    (["train", "train.lr=nan"], "train.lr=nan must be a finite number"),
    (["train", "train.device=cuda:7"], "CUDA device"),
    (["plot", "/tmp"], "not a loom run directory"),
])
def test_config_errors_are_one_line_and_exit_code_2(args, fragment, tmp_path, loom_cli):
    code, _, err = loom_cli(*args, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("loom: error:") and fragment in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.fixture(scope="module")
def trained_run(tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    loom("train", "model=gpt-tiny", "--data", str(tiny_corpus), "train.steps=2", "train.batch_size=2",
         "train.eval_batches=1", f"train.run_dir={run}")
    return run


@pytest.mark.parametrize("args, fragment", [
    (["generate", "RUN", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
    (["generate", "RUN", "--top-k", "-5"], "--top-k=-5 must be >= 0"),
    (["generate", "RUN", "--temperature", "-1"], "--temperature=-1.0 must be >= 0"),
    (["generate", "RUN", "--max-new-tokens", "100000"], "leaves no room for a prompt"),
    (["generate", "RUN", "--device", "tpu"], "--device='tpu' is not valid"),
    (["eval", "RUN", "--batches", "-1"], "--batches=-1 must be >= 1"),
    (["generate", "RUN", "--beam", "3"], "--beam and --n-best are for seq2seq runs"),
    (["generate", "RUN", "--prompt", "a", "--text", "b"], "give --prompt or --text, not both"),
    (["eval", "RUN", "--beam", "2"], "--beam and --examples are for seq2seq runs"),
    (["plot", "RUN", "--out", "/nonexistent/dir/x.png"], "No such file or directory"),
    (["train", "--resume", "RUN", "model.n_embd=32"], "--resume keeps the run's model"),
])
def test_bad_flags_on_a_trained_run_are_one_line_and_exit_code_2(trained_run, args, fragment, loom_cli):
    code, _, err = loom_cli(*[str(trained_run) if a == "RUN" else a for a in args])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


def test_ctrl_c_stops_after_a_step_with_a_checkpoint_and_resume_finishes(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "loom", "train", "model=gpt-tiny", "--data", str(tiny_corpus), "train.steps=100000",
           "train.batch_size=2", "train.log_every=1", "train.ckpt_every=0", "train.progress=log",
           f"train.run_dir={run}"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stderr:  # wait until it trains
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    assert "stopped at step" in rest and "loom train --resume" in rest
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not ckpts[0].endswith(".tmp")
    stopped = int(ckpts[0].split("_")[1])
    assert stopped >= 3
    done = loom("train", "--resume", str(run), f"train.steps={stopped + 2}")
    assert f"step {stopped + 2}/{stopped + 2}" in done.stderr


def test_describe_a_200b_model_without_allocating_it(loom_cli):
    out = loom_cli("describe", "pangu-200b")[1]
    assert "206,861,008,896" in out and "published" in out


def test_train_resume_generate_eval_plot(tiny_corpus, tmp_path, loom_cli):
    """Training in a real process; resuming and the commands that read the run in this one (a start of
    the interpreter and torch each would cost more than the command; resuming in a real process is
    tested with Ctrl-C below)."""
    run = tmp_path / "run"
    common = ["model=pangu-tiny", "--data", str(tiny_corpus), "train.batch_size=4", "train.log_every=2",
              "train.eval_every=3", "train.eval_batches=2", "train.ckpt_every=3", "train.progress=log"]
    proc = loom("train", *common, "train.steps=6", f"train.run_dir={run}")
    assert "step 6/6" in proc.stderr and "val loss" in proc.stderr

    code, _, err = loom_cli("train", "--resume", str(run), "train.steps=9")
    assert code == 0, err
    assert "resumed from" in err and "step 9/9" in err

    code, out, err = loom_cli("generate", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "1")
    assert code == 0, err
    assert out.startswith("def ")
    code, again, err = loom_cli("generate", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "1")
    assert code == 0, err
    assert out == again

    code, out, err = loom_cli("eval", str(run))
    assert code == 0, err
    result = json.loads(out)
    assert result["step"] == 9 and result["val_loss"] > 0 and result["val_ppl"] > 1

    code, out, err = loom_cli("plot", str(run))
    assert code == 0, err
    assert out.strip().endswith("loss.png")
    assert (run / "loss.png").stat().st_size > 1000
