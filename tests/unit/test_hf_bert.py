"""Hugging Face BERT: a tiny random ``BertForPreTraining`` and ``BertForSequenceClassification``, saved
with ``save_pretrained``, are the same models in loom (masked-LM, next-sentence and classification
logits, with segments and padding), exported back ``transformers``' Auto classes load them with the
same logits, and the WordPiece tokenizer comes along."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")  # the test extra; loom's import and export do not need it

from loom.config import load_config  # noqa: E402
from loom.data.tokenizer import HFTokenizer  # noqa: E402
from loom.errors import ConfigError  # noqa: E402
from loom.models import build_model  # noqa: E402
from loom.models.hf import hf_model_settings  # noqa: E402
from tests.hf_models import VOCAB, bert_dir, bert_tokenizer, imported  # noqa: E402

TOL = 1e-4


def batch(seed: int):
    """Ids, two segments and a padded row."""
    x = torch.randint(5, VOCAB, (3, 20), generator=torch.Generator().manual_seed(seed))
    segments = torch.zeros_like(x)
    segments[:, 9:] = 1
    mask = torch.ones_like(x)
    mask[1, 14:] = 0
    return {"input_ids": x, "token_type_ids": segments, "attention_mask": mask}


def outputs(model, b):
    """Only real tokens' masked-LM logits compare (padding's are whatever each computes)."""
    return model(b["input_ids"], b["token_type_ids"], b["attention_mask"])


@pytest.fixture(scope="module", params=[0, 3], ids=["pretraining", "classification"])
def bert(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    return path, bert_dir(path, num_labels=request.param), request.param


def _close(ours, ref_out, b, n_classes):
    real = b["attention_mask"].bool()
    if n_classes:
        return (ours - ref_out.logits).abs().max().item() <= TOL
    mlm, nsp = ours
    return ((mlm - ref_out.prediction_logits)[real].abs().max().item() <= TOL
            and (nsp - ref_out.seq_relationship_logits).abs().max().item() <= TOL)


def test_imported_bert_gives_transformers_logits(bert):
    path, ref, n_classes = bert
    cfg, model = imported(path)
    m = cfg.model
    assert (m.arch, m.n_layer, m.n_embd, m.vocab_size, m.n_classes) == ("bert", 2, 32, VOCAB, n_classes)
    assert (m.post_ln, m.layer_norm_eps, m.activation) == (True, 1e-12, "gelu")
    b = batch(1)
    with torch.no_grad():
        assert _close(outputs(model, b), ref(**b), b, n_classes)


def test_tanh_gelu_is_not_hugging_face_bert(bert):
    """The check can fail: loom's tanh-approximate GELU (the encoders' default) gives other logits."""
    path, ref, n_classes = bert
    _, model = imported(path, ["model.activation=gelu_tanh"])
    b = batch(1)
    with torch.no_grad():
        assert not _close(outputs(model, b), ref(**b), b, n_classes)


def test_imported_then_exported_bert_loads_in_transformers_with_the_same_logits(bert, tmp_path):
    from transformers import AutoModelForPreTraining, AutoModelForSequenceClassification, AutoTokenizer

    from loom.infer.hf import export_hf
    from loom.train.hf import import_hf

    path, ref, n_classes = bert
    out = export_hf(import_hf(path, tmp_path / "run"), tmp_path / "hf")
    auto = AutoModelForSequenceClassification if n_classes else AutoModelForPreTraining
    back = auto.from_pretrained(out).eval()
    assert type(back) is type(ref)
    b = batch(2)
    with torch.no_grad():
        assert _close(outputs(imported(out)[1], b), back(**b), b, n_classes)
        theirs, again = ref(**b), back(**b)
    for key in theirs:
        assert (theirs[key] - again[key]).abs().max().item() <= TOL
    text = "def f(x): return os"
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(path)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and ours.unk_token_id not in ours(text)["input_ids"]


def test_the_wordpiece_tokenizer_is_the_runs_with_sep_ending_a_document(bert):
    from transformers import AutoTokenizer

    path, _, _ = bert
    ours, theirs = HFTokenizer.from_pretrained_dir(path), AutoTokenizer.from_pretrained(path)
    text = "import os print range"
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_token == "[SEP]" and ours.eos_id == theirs.sep_token_id


def test_a_bert_option_loom_lacks_is_one_clear_error(tmp_path, bert):
    path, _, _ = bert
    config = json.loads((path / "config.json").read_text())
    for key, value, match in [("position_embedding_type", "relative_key", "position_embedding_type='relative_key'"),
                              ("hidden_act", "relu", "hidden_act='relu' is not supported by loom's BERT"),
                              ("attention_probs_dropout_prob", 0.2, "dropouts .* differ"),
                              ("architectures", ["BertForMaskedLM"], "has no loom BERT equivalent")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match=match):
            hf_model_settings(tmp_path)


def test_model_activation_is_checked():
    with pytest.raises(ConfigError, match="model.activation='relu' is not a GELU loom has; valid: gelu_tanh, gelu"):
        load_config(None, ["model.arch=bert", "model=bert-tiny", "model.activation=relu"])
    assert load_config(None, ["model=bert-tiny"]).model.activation == "gelu_tanh"  # the default is unchanged


def test_llama_has_no_gelu_to_choose():
    with pytest.raises(ConfigError, match="the Llama family's MLP is SwiGLU"):
        load_config(None, ["model=llama-tiny", "model.activation=gelu"])


def test_classification_finetuning_of_an_imported_bert_keeps_its_encoder_and_starts_a_new_head(tmp_path):
    """``train.init_from=DIR train.task=classification`` on a pretrained Hugging Face BERT: the encoder's
    weights are the directory's, the classifier (which the directory lacks) is initialized as a run
    without init_from initializes it, its tokenizer's [CLS]/[SEP]/[PAD] frame the texts, and it learns."""
    import numpy as np

    from loom.models import materialize
    from loom.parallel.plan import resolve_plan
    from loom.train.hf import hf_init_config, initial_tokenizer
    from loom.train.rundir import prepare_run_data
    from loom.train.trainer import Trainer

    path, run = tmp_path / "bert", tmp_path / "run"
    bert_dir(path)  # BertForPreTraining: masked-LM and next-sentence heads, no classifier
    rng = np.random.default_rng(0)
    words = {"code": ["def", "return", "pass", "for"], "io": ["import", "print", "os", "range"]}
    with (tmp_path / "cls.jsonl").open("w") as f:
        for i in range(200):
            label = ("code", "io")[i % 2]
            f.write(json.dumps({"text": " ".join(rng.choice(words[label], 4)), "label": label}) + "\n")
    cfg = hf_init_config(path, ["train.task=classification", f"data.path={tmp_path / 'cls.jsonl'}",
                                "train.device=cpu", "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=2",
                                "train.steps=25", "train.progress=none", "model.block_size=16"])
    run.mkdir()
    data = prepare_run_data(cfg, initial_tokenizer(cfg, run))
    t = Trainer(cfg, resolve_plan(cfg, 1), None, data, device=torch.device("cpu"))
    assert t.cfg.model.n_classes == 2 and t.task.label_names == ["code", "io"]
    _, directory = imported(path)
    fresh = materialize(build_model(t.cfg.model), "cpu", cfg.train.seed)
    stored, new = dict(directory.named_parameters()), dict(fresh.named_parameters())
    for name, p in t.model.named_parameters():
        if name.startswith("pos_emb"):  # model.block_size=16: the first 16 of the directory's 32 positions
            assert torch.equal(p, stored[name][:16])
        elif name.startswith("classifier"):
            assert name not in stored and torch.equal(p, new[name]), name
        else:
            assert torch.equal(p, stored[name]), name
    assert not any(name.startswith(("mlm_", "nsp_")) for name, _ in t.model.named_parameters())
    special = data.tokenizer.special_ids
    first = t.task.train_batch(0, slice(0, 1))["input_ids"][0]
    assert first[0] == special["[CLS]"] and special["[SEP]"] in first.tolist()
    losses = [t.mean_over_replicas(t.train_step(s)[0]).item() for s in range(25)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_a_bert_directory_with_only_vocab_txt_tokenizes_as_transformers(tmp_path):
    """Older BERT directories hold ``vocab.txt`` and no ``tokenizer.json``: loom builds the WordPiece
    tokenizer ``transformers`` builds of it (lowercasing unless ``do_lower_case`` is false)."""
    from transformers import BertTokenizer

    from loom.data.tokenizer import pretrained_tokenizer

    vocab = bert_tokenizer().get_vocab()
    (tmp_path / "vocab.txt").write_text("".join(f"{t}\n" for t in sorted(vocab, key=vocab.get)))
    text = "def F(x): return OS.path  # \u00dcn\u00efcode"
    encoded = {}
    for lower in (True, False):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
        ours, theirs = pretrained_tokenizer(tmp_path), BertTokenizer.from_pretrained(tmp_path, do_lower_case=lower)
        encoded[lower] = ours.encode(text)
        assert encoded[lower] == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.eos_token == "[SEP]" and ours.special_ids is not None
    assert encoded[True] != encoded[False]  # the case option is read: the check can fail
