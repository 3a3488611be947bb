"""Hugging Face model directories: a tiny random ``transformers`` GPT-2, saved with ``save_pretrained``,
is the same model in loom (logits, greedy generation), in every weights format it may be saved in."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")  # the test extra; loom's import and export do not need it

from loom.config import load_config  # noqa: E402
from loom.data.tokenizer import HFTokenizer  # noqa: E402
from loom.errors import ConfigError  # noqa: E402
from loom.infer.generate import generate  # noqa: E402
from loom.models import build_model  # noqa: E402
from loom.models.hf import hf_model_settings  # noqa: E402
from loom.train.hf import check_hf_weights, load_hf_weights  # noqa: E402
from tests.hf_models import VOCAB, gpt2_dir  # noqa: E402

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "for i in range(10): pass\n"] * 20


def imported(path):
    cfg = load_config(None, settings=hf_model_settings(path))
    check_hf_weights(path, cfg.model)
    model = build_model(cfg.model, "cpu")
    model.init_weights(cfg.train.seed)  # overwritten below: the test fails if any parameter is not
    load_hf_weights([model], cfg.model, path)
    return cfg, model.eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    return path, gpt2_dir(path, TEXTS)


def test_imported_gpt2_gives_transformers_logits(gpt2):
    path, ref = gpt2
    cfg, model = imported(path)
    assert (cfg.model.arch, cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == ("gpt", 2, 32, VOCAB)
    x = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-4


def test_imported_gpt2_greedy_generation_equals_transformers(gpt2):
    path, ref = gpt2
    _, model = imported(path)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    ours = generate(model, prompt, max_new_tokens=12, temperature=0)
    theirs = ref.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_sharded_safetensors_import_the_same(tmp_path, gpt2):
    path, ref = gpt2
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, model = imported(tmp_path)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-4


def test_the_older_bin_format_with_openai_names_imports_the_same(tmp_path, gpt2):
    """The original GPT-2 release: ``pytorch_model.bin``, names without ``transformer.``, the causal
    mask stored as a buffer."""
    path, ref = gpt2
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _, model = imported(tmp_path)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-4


def test_the_directory_tokenizer_encodes_as_transformers_does(gpt2):
    from transformers import AutoTokenizer

    path, _ = gpt2
    ours, theirs = HFTokenizer.from_pretrained_dir(path), AutoTokenizer.from_pretrained(path)
    text = "def g(y):\n    return os.path.join(y, 'x')\n"
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.eos_id == theirs.eos_token_id and ours.decode(ours.encode(text)) == text


def test_an_option_loom_lacks_is_one_clear_error(tmp_path, gpt2):
    path, _ = gpt2
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ConfigError, match="activation_function='relu' is not supported"):
        hf_model_settings(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    with pytest.raises(ConfigError, match="model_type='whisper' has no loom model family"):
        hf_model_settings(tmp_path)


def test_weights_that_do_not_fit_the_config_are_one_clear_error(tmp_path, gpt2):
    path, ref = gpt2
    ref.save_pretrained(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    cfg = load_config(None, settings=hf_model_settings(tmp_path))
    with pytest.raises(ConfigError, match="have no place in loom's gpt model"):
        check_hf_weights(tmp_path, cfg.model)
