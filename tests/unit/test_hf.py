"""Hugging Face model directories: a tiny random ``transformers`` GPT-2 and Llama (grouped-query
attention), saved with ``save_pretrained``, are the same models in loom (logits, greedy generation),
in every weights format they may be saved in, and exported back ``transformers`` loads them with the
same logits."""

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
from tests.hf_models import VOCAB, gpt2_dir, imported, llama_dir  # noqa: E402

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "for i in range(10): pass\n"] * 20


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    return path, gpt2_dir(path, TEXTS)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_model(request, tmp_path_factory):
    """(directory, transformers model, loom family) of each family with a mapping."""
    if request.param == "gpt2":
        return *request.getfixturevalue("gpt2"), "gpt"
    path = tmp_path_factory.mktemp("llama")
    return path, llama_dir(path, TEXTS), "llama"


def test_imported_model_gives_transformers_logits(hf_model):
    path, ref, arch = hf_model
    cfg, model = imported(path)
    assert (cfg.model.arch, cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == (arch, 2, 32, VOCAB)
    if arch == "llama":
        assert (cfg.model.n_head, cfg.model.kv_heads) == (4, 2)  # grouped-query attention
    x = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-4


def test_imported_model_greedy_generation_equals_transformers(hf_model):
    path, ref, _ = hf_model
    _, model = imported(path)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    ours = generate(model, prompt, max_new_tokens=12, temperature=0)
    theirs = ref.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_imported_then_exported_model_loads_in_transformers_with_the_same_logits(hf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from loom.infer.hf import export_hf
    from loom.train.hf import import_hf

    path, ref, _ = hf_model
    out = export_hf(import_hf(path, tmp_path / "run"), tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (back(x).logits - ref(x).logits).abs().max().item() <= 1e-4


def test_shards_and_index_are_written_for_a_model_over_the_shard_size(gpt2, tmp_path, monkeypatch):
    """Written file by file: no read from the checkpoint holds more than one file's tensors."""
    from transformers import AutoModelForCausalLM

    from loom.infer import hf
    from loom.train.hf import import_hf

    path, ref = gpt2
    run, reads, read = import_hf(path, tmp_path / "run"), [], hf._read
    monkeypatch.setattr(hf, "_read", lambda *a: reads.append(read(*a)) or reads[-1])
    out = hf.export_hf(run, tmp_path / "hf", shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(reads) > 2
    total = sum(p.numel() for p in ref.parameters())
    assert max(sum(t.numel() for t in r.values()) for r in reads) < total / 2
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(out)(x).logits - ref(x).logits).abs().max().item() <= 1e-4


def test_a_vocabulary_padded_for_tensor_parallelism_imports_with_zero_rows(gpt2):
    path, ref = gpt2
    cfg = load_config(None, ["model.vocab_size=324"], settings=hf_model_settings(path))
    check_hf_weights(path, cfg.model)
    model = build_model(cfg.model, "cpu")
    model.init_weights(0)
    load_hf_weights([model], cfg.model, path)
    assert model.tok_emb.weight[VOCAB:].abs().max().item() == 0.0
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model.eval()(x)[..., :VOCAB] - ref(x).logits).abs().max().item() <= 1e-4


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


def _starting_tokenizer(path, gpt2, config: dict) -> None:
    """gpt2's tokenizer.json with a ``<s>`` its post-processor puts before every text (as a Llama's
    tokenizer.json does), and ``config`` as its tokenizer_config.json."""
    from tokenizers import Tokenizer, processors

    hf = Tokenizer.from_file(str(gpt2[0] / "tokenizer.json"))
    hf.add_special_tokens(["<s>"])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|endoftext|>", **config}))


@pytest.mark.parametrize("config, starts", [({"bos_token": "<s>"}, True), ({}, False),
                                            ({"bos_token": "<s>", "add_bos_token": False}, False)])
def test_a_directory_tokenizer_starts_each_text_as_transformers_does(config, starts, tmp_path, gpt2):
    """A tokenizer.json whose post-processor starts every text with the directory's bos_token (a Llama's,
    Mistral's): loom starts each document and prompt with it (``start_ids``), as transformers starts each
    text; not where it is no named bos_token, nor where tokenizer_config.json's add_bos_token is false."""
    from transformers import AutoTokenizer

    _starting_tokenizer(tmp_path / "tok", gpt2, config)
    ours = HFTokenizer.from_pretrained_dir(tmp_path / "tok")
    theirs, bos = AutoTokenizer.from_pretrained(tmp_path / "tok"), ours._hf.token_to_id("<s>")
    text = "def g(y):\n    return y\n"
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.start_ids == ([bos] if starts else [])
    assert ours.document(ours.encode(text)) == [bos] * starts + ours.encode(text) + [ours.eos_id]
    if config.get("add_bos_token") is not False:  # transformers 5 follows the post-processor, not the config
        assert theirs(text)["input_ids"] == [bos] + ours.encode(text)
    ours.save(tmp_path / "saved")  # the data cache's fingerprint sees the start
    meta = json.loads((tmp_path / "saved" / "tokenizer_meta.json").read_text())
    assert meta.get("document_start") == (ours.start_ids or None)
    assert HFTokenizer.load(tmp_path / "saved" / "tokenizer.json").start_ids == ours.start_ids


def test_add_bos_token_without_a_bos_token_in_the_vocabulary_is_one_clear_error(tmp_path, gpt2):
    from loom.data.corpus import DataError

    _starting_tokenizer(tmp_path / "tok", gpt2, {"bos_token": "<none>", "add_bos_token": True})
    with pytest.raises(DataError, match="sets add_bos_token but names no bos_token the vocabulary holds"):
        HFTokenizer.from_pretrained_dir(tmp_path / "tok")


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


@pytest.mark.parametrize("config, preset, params", [
    ({"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024},
     "gpt2-124m", 124_439_808),
    ({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
      "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192,
      "rope_theta": 500000.0, "tie_word_embeddings": False}, "llama3-8b", 8_030_261_248),
], ids=["gpt2", "llama3-8b"])
def test_a_published_config_json_is_the_published_model(tmp_path, config, preset, params):
    """The config.json of GPT-2 124M and of Llama 3 8B (as on the Hub) give loom's presets of those
    models, counted on the meta device: nothing is allocated."""
    from loom.models import count_params

    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = load_config(None, settings=hf_model_settings(tmp_path))
    assert cfg.model.preset == preset and count_params(build_model(cfg.model)) == params
