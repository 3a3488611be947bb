"""Hugging Face T5: tiny random ``T5ForConditionalGeneration`` models of T5's shape (ReLU, tied and
scaled output) and T5 v1.1's (gated-GELU, unscaled output), saved with ``save_pretrained``, are the
same models in loom (logits with a padded source, greedy decoding), exported back ``transformers``'
``AutoModelForSeq2SeqLM`` loads them with the same logits, and the SentencePiece-style tokenizer
comes along."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("transformers")  # the test extra; loom's import and export do not need it

from loom.config import load_config  # noqa: E402
from loom.data import DataError  # noqa: E402
from loom.data.tokenizer import HFTokenizer, pretrained_tokenizer  # noqa: E402
from loom.errors import ConfigError  # noqa: E402
from loom.models import build_model  # noqa: E402
from loom.models.hf import hf_model_settings, hf_state_dict, mapping  # noqa: E402
from loom.train.hf import check_hf_weights, load_hf_weights  # noqa: E402
from tests.hf_models import VOCAB, t5_dir  # noqa: E402

TOL = 1e-4
TEXTS = ["def f(x): return x + 1", "import os", "print(range(10))", "for i in range(3): pass"] * 10
PAD, EOS = 0, 1  # T5's <pad> (also the decoder's start token) and </s>


def imported(path, overrides=()):
    cfg = load_config(None, list(overrides), settings=hf_model_settings(path))
    check_hf_weights(path, cfg.model)
    model = build_model(cfg.model, "cpu")
    model.init_weights(cfg.train.seed)  # overwritten below: the test fails if any parameter is not
    load_hf_weights([model], cfg.model, path)
    return cfg, model.eval()


def batch(seed: int):
    """Sources (the second padded), their mask, and decoder inputs starting with the start token."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(src)
    mask[1, 8:] = 0
    src[1, 8:] = PAD
    tgt = torch.randint(3, VOCAB, (2, 9), generator=g)
    tgt[:, 0] = PAD
    return src, mask, tgt


def diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours - theirs).abs().max().item()


@pytest.fixture(scope="module", params=[False, True], ids=["t5", "t5-v1.1"])
def t5(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    return path, t5_dir(path, TEXTS, v1_1=request.param), request.param


def test_imported_t5_gives_transformers_logits(t5):
    path, ref, v1_1 = t5
    cfg, model = imported(path)
    m = cfg.model
    assert (m.arch, m.n_layer, m.decoder_layers, m.n_embd, m.n_head, m.vocab_size) == ("encdec", 2, 3, 32, 4, VOCAB)
    assert (m.norm, m.positions, m.bias, m.feed_forward, m.tie_embeddings) == (
        "rms", "relative", False, "gated-gelu" if v1_1 else "relu", not v1_1)
    src, mask, tgt = batch(1)
    with torch.no_grad():
        assert diff(model(src, mask, tgt), ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits) <= TOL


def test_a_v1_1_saved_by_transformers_5_reads_its_output_projection_from_the_embedding(tmp_path):
    """transformers 5 ties v1.1's output projection to the embedding and saves it once (with
    ``scale_decoder_outputs=false``): loom's own projection starts from the embedding, unscaled."""
    ref = t5_dir(tmp_path, TEXTS, v1_1=True, own_head=False, decoder_layers=2)
    cfg, model = imported(tmp_path)
    assert not cfg.model.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight
    src, mask, tgt = batch(4)
    with torch.no_grad():
        assert diff(model(src, mask, tgt), ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits) <= TOL


def test_the_output_scaling_is_checked(t5):
    """The check can fail: T5's tied output is scaled by d^-0.5, v1.1's own is not; swapping them shows."""
    path, ref, v1_1 = t5
    _, model = imported(path, [f"model.tie_embeddings={str(v1_1).lower()}"])
    src, mask, tgt = batch(1)
    with torch.no_grad():
        assert diff(model(src, mask, tgt), ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits) > 0.1


def greedy(model, src, mask, max_new: int) -> torch.Tensor:
    """Greedy decoding with the model's own encode / new_cache / decode, finished rows padded after
    </s> (as transformers' generate returns them): (B, 1 + generated) from the start token."""
    memory, src_mask = model.encode(src, mask)
    cache = model.new_cache(src.size(0), max_new + 1)
    out = torch.full((src.size(0), 1), PAD)
    done = torch.zeros(src.size(0), dtype=torch.bool)
    for _ in range(max_new):
        nxt = model.decode(out[:, -1:], memory, src_mask, cache)[:, -1].argmax(-1)
        nxt = torch.where(done, PAD, nxt)
        out, done = torch.cat([out, nxt[:, None]], dim=1), done | (nxt == EOS)
        if done.all():
            break
    return out


def test_greedy_decoding_of_the_imported_t5_is_transformers_generate(t5):
    path, ref, _ = t5
    _, model = imported(path)
    src, mask, _ = batch(3)
    with torch.no_grad():
        theirs = ref.generate(input_ids=src, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1,
                               use_cache=False)  # transformers 5.24 sizes its cache by the encoder's layers
        ours = greedy(model, src, mask, 12)
    assert ours.shape[1] > 2 and torch.equal(ours, theirs)


def test_imported_then_exported_t5_loads_in_transformers_with_the_same_logits(t5, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from loom.infer.hf import export_hf
    from loom.train.hf import import_hf

    path, ref, v1_1 = t5
    run = import_hf(path, tmp_path / "run")
    assert json.loads((run / "init.json").read_text())["model_type"] == "t5"
    out = export_hf(run, tmp_path / "hf")
    back = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    src, mask, tgt = batch(2)
    with torch.no_grad():
        theirs = ref(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        again = back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        assert diff(again, theirs) <= TOL
        assert diff(imported(out)[1](src, mask, tgt), theirs) <= TOL
    text = "for i in range(10): print(os)"
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(path)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


def test_the_t5_tokenizer_is_the_runs_with_eos_ending_a_document(t5):
    from transformers import AutoTokenizer

    path, _, _ = t5
    ours, theirs = HFTokenizer.from_pretrained_dir(path), AutoTokenizer.from_pretrained(path)
    text = "import os\nprint(range(3))"
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_token == "</s>" and ours.eos_id == theirs.eos_token_id == EOS


def test_a_spiece_model_that_is_not_one_is_one_clear_error(tmp_path):
    """(A real ``spiece.model`` alone is the run's tokenizer: tests/cli/test_hf_t5_finetune.py.)"""
    (tmp_path / "spiece.model").write_bytes(b"\0")
    with pytest.raises(DataError, match="spiece.model' is not a SentencePiece model"):
        pretrained_tokenizer(tmp_path)
    (tmp_path / "spiece.model").unlink()
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        pretrained_tokenizer(tmp_path)


def test_relative_bias_tables_are_one_per_stack_as_in_transformers(t5, caplog):
    """loom holds T5's two tables where transformers does (each stack's first self-attention), so a
    table loom trained is the table it exports."""
    path, ref, _ = t5
    cfg, model = imported(path)
    tables = {n: p for n, p in model.named_parameters() if "rel_bias" in n}
    assert sorted(tables) == ["layers.0.attn.rel_bias.weight", f"layers.{cfg.model.n_layer}.attn.rel_bias.weight"]
    with torch.no_grad():
        for p in tables.values():
            p.add_(0.5)
    with caplog.at_level(logging.WARNING, logger="loom"):
        state = hf_state_dict(model, cfg.model)
    assert not caplog.records
    for stack, name in zip(("encoder", "decoder"), sorted(tables, key=lambda n: int(n.split(".")[1]))):
        key = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert torch.equal(state[key], tables[name].t()) and torch.equal(state[key], ref.state_dict()[key] + 0.5)


def test_a_t5_option_loom_lacks_is_one_clear_error(tmp_path, t5):
    path, _, _ = t5
    config = json.loads((path / "config.json").read_text())
    for key, value, match in [("feed_forward_proj", "gated-silu", "feed_forward_proj='gated-silu' is not supported"),
                              ("relative_attention_num_buckets", 64, "relative_attention_num_buckets=64"),
                              ("d_kv", 16, "d_kv=16 × num_heads=4 differs from d_model=32"),
                              ("architectures", ["T5EncoderModel"], "has no loom equivalent"),
                              ("model_type", "switch_transformers", "has no loom model family")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match=match):
            hf_model_settings(tmp_path)


def test_vaswanis_transformer_has_no_transformers_equivalent():
    cfg = load_config(None, ["model=transformer-tiny"]).model
    with pytest.raises(ConfigError, match="model.norm='layer'.* is not T5 .* --format safetensors"):
        mapping(cfg).config_to_hf(cfg)


def test_an_untied_output_projection_is_not_tied_across_pipeline_stages():
    """T5 v1.1's own output projection: the family's tied pair (embedding, output) drops out of its
    pipeline split, so that a pipeline neither re-ties them nor adds their gradients."""
    from loom.models.registry import families

    spec = families()["encdec"]
    for tie in (True, False):
        cfg = load_config(None, ["model=t5-tiny", f"model.tie_embeddings={str(tie).lower()}"]).model
        model = build_model(cfg)
        assert (model.lm_head.weight is model.tok_emb.weight) == tie
        assert spec.pipeline_split(cfg).tied == ((("lm_head.weight", "tok_emb.weight"),) if tie else ())
