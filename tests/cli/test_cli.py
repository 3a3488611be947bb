"""The command line as a user meets it: real processes, exit codes, what is printed."""

import json
import os
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
])
def test_config_errors_are_one_line_and_exit_code_2(args, fragment, tmp_path):
    proc = loom(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("loom: error:") and fragment in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_describe_a_200b_model_without_allocating_it():
    out = loom("describe", "pangu-200b").stdout
    assert "206,861,008,896" in out and "published" in out


def test_train_resume_generate_eval_plot(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    common = ["model=pangu-tiny", "--data", str(tiny_corpus), "train.batch_size=4", "train.log_every=2",
              "train.eval_every=3", "train.eval_batches=2", "train.ckpt_every=3", "train.progress=log"]
    proc = loom("train", *common, "train.steps=6", f"train.run_dir={run}")
    assert "step 6/6" in proc.stderr and "val loss" in proc.stderr

    proc = loom("train", "--resume", str(run), "train.steps=9")
    assert "resumed from" in proc.stderr and "step 9/9" in proc.stderr

    out = loom("generate", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "1").stdout
    assert out.startswith("def ")
    again = loom("generate", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--seed", "1").stdout
    assert out == again

    result = json.loads(loom("eval", str(run)).stdout)
    assert result["step"] == 9 and result["val_loss"] > 0 and result["val_ppl"] > 1

    assert loom("plot", str(run)).stdout.strip().endswith("loss.png")
    assert (run / "loss.png").stat().st_size > 1000
