"""``loom import`` and ``loom export --format hf`` on a tiny random ``transformers`` BERT: what comes
back out is a directory ``transformers``' Auto classes load with the same logits and tokenizer; training
an imported BERT with its own tokenizer is one line."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.hf_models import VOCAB, bert_dir  # noqa: E402


def test_bert_import_then_export_gives_transformers_the_same_model(tmp_path, loom_cli):
    from transformers import AutoModelForPreTraining, AutoTokenizer

    path, run, out = tmp_path / "bert", tmp_path / "run", tmp_path / "hf"
    ref = bert_dir(path)
    code, _, err = loom_cli("import", str(path), "--out", str(run))
    assert code == 0, err
    code, _, err = loom_cli("export", str(run), "--format", "hf", str(out))
    assert code == 0, err
    model = AutoModelForPreTraining.from_pretrained(out).eval()
    x = torch.randint(5, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = ref(input_ids=x), model(input_ids=x)
    assert (theirs.prediction_logits - ours.prediction_logits).abs().max().item() <= 1e-4
    assert (theirs.seq_relationship_logits - ours.seq_relationship_logits).abs().max().item() <= 1e-4
    text = "import os print range"
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(path)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]

    data = tmp_path / "text.txt"
    data.write_text("def f(x): return x\nimport os\n" * 20)
    code, _, err = loom_cli("train", f"train.init_from={path}", f"data.path={data}", f"train.run_dir={tmp_path / 'r'}")
    assert code == 2 and "train.task=masked_lm from a Hugging Face model directory is not built yet" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()
