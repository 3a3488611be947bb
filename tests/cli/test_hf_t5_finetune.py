"""Fine-tuning an imported T5 on {source, target} pairs: ``loom train train.init_from=T5_DIR
train.task=seq2seq`` trains a tiny random ``transformers`` T5 with its own tokenizer's special
tokens (``<pad>`` pads and starts the decoder, ``</s>`` ends), and its first loss is
``transformers``' loss on the same batch; a directory holding only T5's ``spiece.model`` (no
``tokenizer.json``) is the run's tokenizer too."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from loom.data.tokenizer import SentencePieceTokenizer, pretrained_tokenizer  # noqa: E402
from loom.tasks import build_task  # noqa: E402
from loom.train.rundir import load_run_config, prepare_run_data  # noqa: E402
from tests.hf_models import t5_dir, t5_spiece  # noqa: E402

TEXTS = ["def f(x): return x + 1", "import os", "Return the sum of x and y.", "print(range(10))"] * 10
PAD, EOS = 0, 1  # T5's <pad> (also the decoder's start token) and </s>
STEPS = 3


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """{"tokenizer.json": a T5 directory as transformers saves it, "spiece.model": the same weights
    with only T5's SentencePiece model for a tokenizer}, each with a pairs file beside it."""
    fast = tmp_path_factory.mktemp("t5")
    ref = t5_dir(fast, TEXTS)
    sp = tmp_path_factory.mktemp("t5sp")
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (fast / f).is_file():
            shutil.copy(fast / f, sp / f)
    t5_spiece(sp, TEXTS)
    pairs = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    records = [{"source": f"def f{i}(x):\n    return x + {i}", "target": f"Return x plus {i}."} for i in range(40)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"tokenizer.json": fast, "spiece.model": sp}, ref, pairs


@pytest.mark.parametrize("files", ["tokenizer.json", "spiece.model"])
def test_an_imported_t5_fine_tunes_on_pairs_from_transformers_first_loss(files, t5_dirs, tmp_path, loom_cli):
    dirs, ref, pairs = t5_dirs
    run = tmp_path / "run"
    code, _, err = loom_cli("train", f"train.init_from={dirs[files]}", "train.task=seq2seq", f"data.path={pairs}",
                            "model.block_size=16", f"train.steps={STEPS}", "train.batch_size=4", "train.log_every=1",
                            "train.eval_every=100", "train.eval_batches=1", "train.lr=1e-3", "train.warmup_steps=0",
                            f"train.run_dir={run}")
    assert code == 0, err
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0]

    cfg = load_run_config(run)
    data = prepare_run_data(cfg, run / "tokenizer")
    assert isinstance(data.tokenizer, SentencePieceTokenizer) == (files == "spiece.model")
    task = build_task("seq2seq", data, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)
    assert (task.pad_id, task.bos_id, task.eos_id) == (PAD, PAD, EOS)
    b = task.train_batch(0, slice(None))
    with torch.no_grad():  # transformers shifts the labels right itself, <pad> first, -100 read as <pad>
        out = ref(input_ids=b["src_ids"], attention_mask=b["src_mask"], labels=b["labels"])
    assert torch.equal(ref._shift_right(b["labels"]), b["tgt_in"])
    assert abs(losses[0] - out.loss.item()) <= 1e-5 * out.loss.item(), (losses[0], out.loss.item())


def test_a_spiece_model_only_directory_is_a_sentencepiece_tokenizer_and_exports_as_one(t5_dirs, tmp_path, loom_cli):
    import sentencepiece as spm

    dirs, _, _ = t5_dirs
    tok = pretrained_tokenizer(dirs["spiece.model"])
    sp = spm.SentencePieceProcessor(model_file=str(dirs["spiece.model"] / "spiece.model"))
    text = "Return the sum of x and y."
    assert tok.encode(text) == sp.encode(text) and tok.decode(tok.encode(text)) == text
    assert (tok.eos_id, tok.pad_id) == (EOS, PAD)
    code, _, err = loom_cli("import", str(dirs["spiece.model"]), "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert (tmp_path / "run" / "tokenizer" / "spiece.model").is_file()
    # exported, it is transformers' T5Tokenizer again: the same ids, </s> at the end
    from transformers import AutoTokenizer

    code, _, err = loom_cli("export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "hf"))
    assert code == 0, err
    assert (tmp_path / "hf" / "spiece.model").read_bytes() == (dirs["spiece.model"] / "spiece.model").read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == sp.encode(text) + [EOS]


def test_a_tokenizer_seq2seq_cannot_use_is_one_line(tmp_path, loom_cli, t5_dirs):
    """A model directory's tokenizer without a padding token (GPT-2's byte-level BPE here, put in a
    T5's directory) is refused before a run directory is made."""
    from tests.hf_models import tiny_tokenizer

    dirs, _, pairs = t5_dirs
    path = tmp_path / "t5"
    path.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(dirs["tokenizer.json"] / f, path / f)
    tiny_tokenizer(TEXTS).save_pretrained(path)
    code, _, err = loom_cli("train", f"train.init_from={path}", "train.task=seq2seq", f"data.path={pairs}",
                            f"train.run_dir={tmp_path / 'r'}")
    assert code == 2 and "seq2seq needs a tokenizer with a padding token" in err, err
    assert "Traceback" not in err and not (tmp_path / "r").exists()
