"""Parallel layouts from the command line: checked before any process starts, then launched."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.test_cli import loom


@pytest.mark.parametrize("args, fragment", [
    (["--nproc", "2", "parallel.tp=2", "model.n_head=3", "model.n_embd=48"], "model.n_head=3"),
    (["--nproc", "3", "parallel.tp=2"], "3 processes were started"),
    (["--nproc", "2", "parallel.pp=2", "parallel.microbatches=2", "model.n_layer=1"], "cannot fill"),
    (["--nproc", "4", "parallel.pp=2", "parallel.microbatches=3", "train.batch_size=4"], "parallel.microbatches=3"),
    (["--nproc", "2", "train.batch_size=3"], "cannot be split over parallel.dp=2"),
    (["--nproc", "2", "parallel.tp=2", "parallel.strategies={layers.*.mlp.fcx: colwise}"], "names no module"),
    (["--nproc", "2", "parallel.tp=2", "parallel.strategies={layers.*.mlp.fc: '((dp,mp),(mp,mp))'}"],
     "((dp,mp),(mp,mp))"),
    (["--nproc", "2", "parallel.schedule=interleaved", "parallel.pp=2", "parallel.microbatches=2"],
     "virtual_stages"),
    (["--nproc", "2", "parallel.offload=optimizer"], "parallel.zero>=1"),
    (["--nproc", "2", "parallel.sp=true"], "parallel.tp>1"),
    (["--nproc", "0"], "--nproc=0"),
    (["--nproc", "2", "parallel.ep=2"], "is dense"),
    (["--nproc", "3", "model=switch-tiny", "parallel.ep=3"], "must divide model.moe.experts=8"),
    (["--nproc", "4", "model=llama-tiny", "parallel.tp=4"], "model.n_kv_head=2 is not divisible by parallel.tp=4"),
])
def test_bad_layouts_are_one_line_and_exit_code_2_before_launch(args, fragment, tmp_path, loom_cli):
    code, _, err = loom_cli("train", "model=gpt-tiny", *args, cwd=tmp_path)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("loom: error:") and fragment in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # no process was started, nothing was written


@pytest.mark.slow
def test_nproc_2_trains_resumes_on_one_process_and_exports(tiny_corpus, tmp_path, loom_cli):
    run = tmp_path / "run"
    common = ["train.batch_size=4", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
              "train.ckpt_every=2", "train.progress=log"]
    proc = loom("train", "--nproc", "2", "model=gpt-tiny", "--data", str(tiny_corpus), "parallel.tp=2",
                "train.steps=2", *common, f"train.run_dir={run}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["layout"] == "tp=2" and len(records[-1]["mem_peak_mb"]) == 2
    assert proc.stderr.count("step 2/2") == 1  # one voice: rank 0's

    code, _, err = loom_cli("train", "--resume", str(run), "train.steps=4", "parallel.tp=1")  # tp=2's, one process
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "layout" not in records[-1]

    code, out, err = loom_cli("export", str(run))
    assert code == 0, err
    out = out.strip()
    weights = load_file(out)
    from loom.infer.load import load_for_inference

    _, model, _, step = load_for_inference(run, device="cpu")
    assert step == 4
    for name, p in model.named_parameters():
        torch.testing.assert_close(weights[name], p.detach(), rtol=0, atol=0)
    assert "lm_head.weight" not in weights  # tied: stored once


@pytest.mark.slow
def test_ctrl_c_under_nproc_2_stops_all_ranks_after_one_step_with_a_checkpoint(tiny_corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "loom", "train", "--nproc", "2", "model=gpt-tiny", "--data", str(tiny_corpus),
           "train.steps=100000", "train.batch_size=2", "train.log_every=1", "train.ckpt_every=0",
           "train.progress=log", f"train.run_dir={run}"]
    # its own process group, which a terminal's Ctrl-C signals as a whole: launcher and workers
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stderr:
        if line.startswith("step 3/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=180) == 130, rest
    assert rest.count("stopped at step") == 1 and "Traceback" not in rest
    ckpts = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and ckpts[0].startswith("step_") and ".tmp" not in ckpts[0]
