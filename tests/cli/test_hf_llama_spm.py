"""A Llama directory whose tokenizer is only ``tokenizer.model`` (a SentencePiece BPE model, as the
original Llama and Llama-2 releases ship it, no ``tokenizer.json``): loom reads it with ``transformers``'
``LlamaTokenizer`` conventions (``<s>`` starting each document and prompt, ``add_bos_token``/``add_eos_token``
from ``tokenizer_config.json``, byte fallback), imports and trains from the directory, and exports the model
file back with a ``tokenizer_config.json`` that ``transformers`` reads as a ``LlamaTokenizer``."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from loom.data.tokenizer import LlamaSentencePieceTokenizer, pretrained_tokenizer  # noqa: E402
from loom.train.rundir import load_run_config, prepare_run_data  # noqa: E402
from tests.hf_models import llama_dir, llama_spm  # noqa: E402

WORDS = ("def return import print range value index list tensor model train loss step the a of to in is for "
         "with x y self None True False").split()
_rng = random.Random(0)
LINES = [" ".join(_rng.choice(WORDS) for _ in range(_rng.randint(3, 12))) + f" {i}" for i in range(300)]
# ASCII words, digits (split one by one), runs of spaces, a tab and a newline, and characters the model
# never saw (é, ö, ✓, 日本語: bytes, by byte fallback)
STRINGS = ["def f(x): return x + 1", "print(range(10))  # two  spaces", "tab\there\nnew line",
           "héllo wörld ✓ 日本語", "x"]
UNK, BOS, EOS = 0, 1, 2  # Llama's <unk>, <s>, </s>


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama whose tokenizer is ``tokenizer.model`` alone (no tokenizer.json nor
    tokenizer_config.json), <s> 1 and </s> 2 in its config.json."""
    path = tmp_path_factory.mktemp("llama")
    llama_dir(path, LINES)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / f).unlink(missing_ok=True)
    llama_spm(path, LINES)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "bos_token_id": BOS, "eos_token_id": EOS}))
    return path


def _transformers_ids(path, texts):
    from transformers import AutoTokenizer, LlamaTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, LlamaTokenizer)
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("flags", [None, {"add_bos_token": True}, {"add_bos_token": False, "add_eos_token": True}])
def test_ids_are_llama_tokenizers(flags, llama, tmp_path):
    """loom's ids are sentencepiece's own pieces, started by <s> (``start_ids``) as transformers'
    LlamaTokenizer starts a text for the directory (tokenizer_config.json's flags; without one, <s> first and
    no </s>, LlamaTokenizer's defaults); a corpus document ends with </s> once, whatever add_eos_token says."""
    path = tmp_path / "tok"
    path.mkdir()
    shutil.copy(llama / "tokenizer.model", path / "tokenizer.model")
    if flags is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **flags}))
    tok = pretrained_tokenizer(path)
    assert isinstance(tok, LlamaSentencePieceTokenizer) and tok.kind == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS, EOS, None)
    bos, eos = (flags or {}).get("add_bos_token", True), (flags or {}).get("add_eos_token", False)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    ids = [tok.encode(t) for t in STRINGS]
    assert ids == tok.encode_batch(STRINGS) == [sp.encode(t) for t in STRINGS]
    assert tok.start_ids == [BOS] * bos
    assert [tok.document(i) for i in ids] == [[BOS] * bos + i + [EOS] for i in ids]
    assert [tok.decode(i) for i in ids] == STRINGS
    with_bytes = ids[STRINGS.index("héllo wörld ✓ 日本語")]
    assert UNK not in with_bytes and sum(map(sp.IsByte, with_bytes)) >= len("é✓日本語".encode()) - 1
    if flags is None:  # transformers 5 reads tokenizer.model alone without <s>; transformers 4's slow one with it
        (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                "add_bos_token": True}))
    assert _transformers_ids(path, STRINGS) == [tok.start_ids + i + [EOS] * eos for i in ids]
    # a text that starts with a space: sentencepiece's (and Meta's Llama's) three ▁ for "  x"; transformers
    # 5's conversion of tokenizer.model (tokenizers' Metaspace) does not add the dummy prefix before a space
    assert tok.encode("  x") == sp.encode("  x")


def test_a_tokenizer_model_directory_imports_trains_and_exports_its_tokenizer(llama, tmp_path, loom_cli):
    run, tuned, out, data = tmp_path / "run", tmp_path / "tuned", tmp_path / "hf", tmp_path / "docs.jsonl"
    code, _, err = loom_cli("import", str(llama), "--out", str(run))
    assert code == 0, err
    assert (run / "tokenizer" / "tokenizer.model").read_bytes() == (llama / "tokenizer.model").read_bytes()

    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES[:200]))
    code, _, err = loom_cli("train", f"train.init_from={llama}", f"data.path={data}", f"train.run_dir={tuned}",
                            "model.block_size=16", "train.steps=1", "train.batch_size=2", "train.eval_every=1",
                            "train.eval_batches=1", "train.progress=none")
    assert code == 0, err
    assert json.loads((tuned / "init.json").read_text())["init_from"] == str(llama.resolve())
    prepared = prepare_run_data(load_run_config(tuned), tuned / "tokenizer")
    assert isinstance(prepared.tokenizer, LlamaSentencePieceTokenizer)
    tokens = np.concatenate([prepared.train, prepared.val]).tolist()
    assert tokens.count(BOS) == tokens.count(EOS) > 1 and tokens[0] == BOS  # each document: <s> ... </s>

    code, _, err = loom_cli("export", str(tuned), "--format", "hf", str(out))
    assert code == 0, err
    assert (out / "tokenizer.model").read_bytes() == (llama / "tokenizer.model").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS, EOS)
    assert _transformers_ids(out, STRINGS) == [prepared.tokenizer.start_ids + prepared.tokenizer.encode(t)
                                               for t in STRINGS]
    assert pretrained_tokenizer(out).start_ids == [BOS]  # and loom reads the export back alike


@pytest.mark.parametrize("add_eos", [False, True])
def test_sft_starts_a_record_once_and_ends_it_once(add_eos, llama, tmp_path):
    """Supervised fine-tuning with a Llama's tokenizer.model: <s> prompt response </s>, not a second <s>
    before the response nor a second </s> after it (add_eos_token)."""
    from types import SimpleNamespace

    from loom.tasks.sft import SFT

    shutil.copy(llama / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": add_eos}))
    tok = pretrained_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    records = [("print(x)", "return x"), ("def f", "loss 1")]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in records))
    data = SimpleNamespace(tokenizer=tok, meta={"source": str(tmp_path / "sft.jsonl"), "val_fraction": 0.5})
    task = SFT.from_data(data, block_size=32, batch_size=1, seed=0)
    (prompt, response), row = records[0], task.train_x[0].tolist()
    ids = [BOS] + sp.encode(prompt) + sp.encode(response) + [EOS]
    assert row[: len(ids)] == ids and row[len(ids):] == [EOS] * (32 - len(ids))  # </s> pads


@pytest.mark.parametrize("spoil, fragment", [
    ("model", "is not a SentencePiece model"),
    ("config", "add_bos_token must be true or false, got 'yes'"),
])
def test_a_bad_tokenizer_model_or_flag_is_one_line(spoil, fragment, llama, tmp_path, loom_cli):
    path = tmp_path / "llama"
    shutil.copytree(llama, path)
    if spoil == "model":
        (path / "tokenizer.model").write_bytes(b"not a model")
    else:
        (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}))
    code, _, err = loom_cli("import", str(path), "--out", str(tmp_path / "run"))
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_folders_differing_in_add_bos_token_alone_have_different_fingerprints(llama, tmp_path):
    """Also a folder saved before ``document_start`` was written down: its fingerprint comes from what the
    loaded tokenizer does, so two such folders never share a data cache entry."""
    from loom.data.dataset import _load_given_tokenizer, tokenizer_fingerprint
    from loom.data.tokenizer import META_FILE as TOKENIZER_META_FILE

    proto = (llama / "tokenizer.model").read_bytes()
    prints = {}
    for add_bos in (True, False):
        saved = tmp_path / f"bos-{add_bos}"
        LlamaSentencePieceTokenizer(proto, add_bos=add_bos).save(saved)
        assert _load_given_tokenizer(saved)[1] == tokenizer_fingerprint(saved)
        meta = json.loads((saved / TOKENIZER_META_FILE).read_text())
        meta.pop("document_start", None)  # as the stop before this one saved it
        (saved / TOKENIZER_META_FILE).write_text(json.dumps(meta))
        prints[add_bos] = _load_given_tokenizer(saved)[1]
    assert prints[True] != prints[False]
