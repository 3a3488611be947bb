"""Encoders from the command line: ``loom train`` on a folder of images (one subfolder per class,
no text corpus prepared), ``loom predict`` with an image classification run and a text
classification run, and the one-line errors for the wrong kind of run or input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

STEPS = ["train.steps=30", "train.batch_size=16", "train.warmup_steps=3", "train.lr=3e-3", "train.log_every=5",
         "train.eval_every=30", "train.eval_batches=2", "train.progress=none", "train.tensorboard=false"]


def _stripes(path, vertical: bool, seed: int, checker: bool = False) -> None:
    """An 8×8 grayscale PNG of bright stripes (vertical or horizontal; or a checkerboard) with noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 60, (8, 8))
    if checker:
        a[::2, ::2] += 180
        a[1::2, 1::2] += 180
    elif vertical:
        a[:, ::2] += 180
    else:
        a[::2, :] += 180
    Image.fromarray(a.astype(np.uint8)).save(path)


def _train(args: list[str]) -> int:
    """``loom train`` in this process, leaving the "loom" logger as it found it."""
    import logging

    from loom.cli import main

    logger = logging.getLogger("loom")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        return main(["train", *args])
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, vertical in (("horizontal", False), ("vertical", True)):
        (root / name).mkdir()
        for i in range(25):
            _stripes(root / name / f"{i}.png", vertical, seed=100 * vertical + i)
    return root


@pytest.fixture(scope="module")
def image_run(image_folder, tmp_path_factory):
    """vit-tiny trained on the folder in bf16 mixed precision: its run directory."""
    run = tmp_path_factory.mktemp("vit") / "run"
    assert _train(["model=vit-tiny", "model.n_classes=0", f"data.path={image_folder}", f"train.run_dir={run}",
                   "train.precision=bf16", *STEPS]) == 0
    return run


def test_vit_trains_on_a_folder_of_images_without_a_text_corpus(image_run, image_folder):
    data = json.loads((image_run / "data.json").read_text())
    assert data["source"] == str(image_folder.resolve()) and data["labels"] == {"horizontal": 25, "vertical": 25}
    assert not (image_run / "tokenizer").exists() and "cache" not in data  # no tokenizer, no token files
    assert json.loads((image_run / "labels.json").read_text()) == ["horizontal", "vertical"]
    summary = json.loads((image_run / "summary.json").read_text())
    assert summary["val_loss"] < 0.5 * np.log(2), summary  # well below chance (ln 2) on held-out stripes
    losses = [json.loads(line)["loss"] for line in (image_run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # in bf16 mixed precision


def test_predict_gives_an_image_its_label(image_run, tmp_path, loom_cli):
    for vertical, label in ((True, "vertical"), (False, "horizontal")):
        _stripes(tmp_path / "x.png", vertical, seed=999)
        code, out, err = loom_cli("predict", str(image_run), "--image", str(tmp_path / "x.png"), "--top-k", "5")
        assert code == 0, err
        rows = [line.split("\t") for line in out.strip().splitlines()]
        assert [r[0] for r in rows][0] == label and len(rows) == 2  # top-k capped at the classes
        probs = [float(r[1]) for r in rows]
        assert probs[0] > 0.5 and probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3
    code, out, _ = loom_cli("predict", str(image_run), "--image", str(tmp_path / "x.png"), "--json")
    answer = json.loads(out)
    assert answer["label"] == "horizontal" and answer["top"][0] == {"label": "horizontal",
                                                                    "probability": answer["probability"]}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """bert-tiny fine-tuned from scratch on a labelled .jsonl file (which words a line holds)."""
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    words = {"fruit": ["apple", "pear", "plum", "grape"], "tool": ["hammer", "saw", "drill", "wrench"]}
    with (root / "data.jsonl").open("w") as f:
        for i in range(120):
            label = "fruit" if i % 2 else "tool"
            f.write(json.dumps({"text": " ".join(rng.choice(words[label], 5)), "label": label}) + "\n")
    run = root / "run"
    assert _train(["model=bert-tiny", "train.task=classification", f"data.path={root / 'data.jsonl'}",
                   "model.vocab_size=512", f"train.run_dir={run}", *STEPS]) == 0
    return run


def test_predict_gives_a_text_its_label(text_run, loom_cli):
    assert json.loads((text_run / "labels.json").read_text()) == ["fruit", "tool"]
    for text, label in (("pear plum apple grape pear", "fruit"), ("saw drill hammer wrench", "tool")):
        code, out, err = loom_cli("predict", str(text_run), "--text", text, "--json")
        assert code == 0, err
        answer = json.loads(out)
        assert answer["label"] == label and answer["probability"] > 0.5, answer


@pytest.mark.parametrize("run, args, fragment", [
    ("image", ["--text", "hello"], "classifies images (train.task=image_classification); give --image, not --text"),
    ("text", ["--image", "IMG"], "classifies texts (train.task=classification); give --text, not --image"),
    ("image", [], "loom predict needs one input: --text"),
    ("image", ["--text", "a", "--image", "IMG"], "loom predict needs one input"),
    ("image", ["--image", "/nonexistent.png"], "--image /nonexistent.png: no such file"),
    ("image", ["--image", "NOTIMG"], "is not an image Pillow can read"),
    ("image", ["--image", "IMG", "--top-k", "0"], "--top-k=0 must be >= 1"),
    ("gpt", ["--text", "hello"], "is a train.task=causal_lm run; loom predict classifies with a classification "
                                 "(--text) or image_classification (--image) run (for this one: loom generate"),
])
def test_predict_refuses_the_wrong_run_or_input_in_one_line(run, args, fragment, image_run, text_run, image_folder,
                                                            tmp_path, loom_cli):
    if run == "gpt":  # a language model's run: only its config is read before the refusal
        (tmp_path / "gpt").mkdir()
        (tmp_path / "gpt" / "config.yaml").write_text("model:\n  preset: gpt-tiny\n")
    path = {"image": image_run, "text": text_run, "gpt": tmp_path / "gpt"}[run]
    img, notimg = image_folder / "vertical" / "0.png", image_run / "config.yaml"
    args = [str(img) if a == "IMG" else str(notimg) if a == "NOTIMG" else a for a in args]
    code, out, err = loom_cli("predict", str(path), *args)
    assert code == 2 and not out, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loom: error:") and fragment in lines[0], err


@pytest.mark.parametrize("kinds, model", [(("horizontal", "vertical"), ["model=vit-tiny", "model.n_classes=0"]),
                                          (("checker", "horizontal", "vertical"), [])])
def test_a_vit_run_fine_tunes_on_a_folder_of_images(kinds, model, image_run, tmp_path, loom_cli):
    """``train.init_from=VIT_RUN data.path=FOLDER``: with the run's class count every weight comes over;
    with another count the body does and the classifier starts as a fresh run's would. The model is the
    run's, named (``model=vit-tiny``) or not: the class count is the folder's."""
    import torch

    from loom.config import load_config
    from loom.infer.load import load_for_inference
    from loom.models import build_model, materialize

    folder = tmp_path / "images"
    for kind in kinds:
        (folder / kind).mkdir(parents=True)
        for i in range(8):
            _stripes(folder / kind / f"{i}.png", kind == "vertical", seed=500 + i, checker=kind == "checker")
    run = tmp_path / "run"
    # a learning rate too small to move a weight: what the run holds after its step is what it started from
    code, _, err = loom_cli("train", *model, f"data.path={folder}", f"train.init_from={image_run}",
                            f"train.run_dir={run}", "train.steps=1",
                            "train.warmup_steps=0", "train.lr=1e-12", "train.min_lr=0", "train.batch_size=8",
                            "train.eval_batches=1", "train.progress=none", "train.tensorboard=false")
    assert code == 0, err
    got = dict(load_for_inference(run, device="cpu")[1].named_parameters())
    old = dict(load_for_inference(image_run, device="cpu")[1].named_parameters())
    cfg = load_config(None, ["model=vit-tiny", f"model.n_classes={len(kinds)}"])
    fresh = dict(materialize(build_model(cfg.model), "cpu", cfg.train.seed).named_parameters())
    for name, p in got.items():
        want = fresh[name] if name.startswith("cls_head.") and len(kinds) != 2 else old[name]
        torch.testing.assert_close(p.float(), want.float(), rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert got["cls_head.weight"].shape == (len(kinds), 64)


def test_fine_tuning_a_vit_run_of_another_width_is_one_line(image_run, image_folder, tmp_path, loom_cli):
    """Only a class head may change shape: a setting that changes any other weight's names itself, before
    a run starts."""
    code, _, err = loom_cli("train", "model=vit-tiny", "model.n_classes=0", "model.n_embd=32",
                            f"data.path={image_folder}", f"train.init_from={image_run}",
                            f"train.run_dir={tmp_path / 'run'}", "train.progress=none")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"train.init_from=\S+: model.n_embd=32 \(the run's 64\) would change the run's weights "
                     r"\((?!cls_head)\S+ is \([\d, ]*64[\d, ]*\) there, \([\d, ]*32[\d, ]*\) here\)", err), err
    assert not (tmp_path / "run").exists()


def test_a_missing_image_folder_is_one_line_before_a_run_starts(tmp_path, loom_cli):
    code, _, err = loom_cli("train", "model=vit-tiny", f"data.path={tmp_path / 'none'}",
                            f"train.run_dir={tmp_path / 'run'}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "reads a folder with one subfolder of images per class" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragment", [
    (["model=vit-tiny", "--nproc", "2", "parallel.tp=2", "parallel.sp=true"],
     "parallel.sp=true is not supported for model.arch=vit: its sequence ([CLS] + image patches"),
    (["model=vit-tiny", "model.moe.experts=4"], "ViT's blocks have no Mixture-of-Experts layers"),
    (["model=vit-tiny", "--nproc", "2", "parallel.ep=2"], "is dense"),
    # 16x16 images in 2x2 patches: 64 patches + [CLS], not the preset's 17
    (["model=vit-tiny", "model.image_size=16"], "model.block_size=17, but a ViT's sequence is 65 tokens"),
])
def test_a_layout_an_encoder_cannot_train_is_one_line_before_launch(args, fragment, tmp_path, loom_cli):
    code, _, err = loom_cli("train", *args, f"train.run_dir={tmp_path / 'run'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "run").exists()


def test_the_planner_proposes_no_sequence_parallelism_for_vit():
    from loom.config import load_config
    from loom.planner.hardware import parse_cluster
    from loom.planner.search import candidates

    cfg = load_config(None, ["model=vit-b-16"]).model
    found = candidates(cfg, parse_cluster("8xa100-80g"), 64)
    assert any(c.plan.tp > 1 for c in found) and not any(c.plan.sp for c in found)


def test_generate_with_an_encoder_run_is_one_line(image_run, loom_cli):
    code, out, err = loom_cli("generate", str(image_run), "--prompt", "x")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert "is a train.task=image_classification run; loom generate continues text" in err and "loom predict" in err
