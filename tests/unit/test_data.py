"""Tests for loom.data: corpora, tokenizers, prepared data and samplers."""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import loom.data.dataset as dataset_module
from loom.data import (
    BatchSampler,
    DataError,
    PreparedData,
    Tokenizer,
    eval_batches,
    load_tokenizer,
    prepare_data,
)
from loom.data.corpus import corpus_files, iter_documents, stdlib_files
from loom.data.dataset import token_dtype, tokenizer_fingerprint
from loom.data.tokenizer import EOS_TOKEN, resolve_kind, train_tokenizer

WORDS = (
    "alpha beta gamma delta epsilon model token batch layer attention vector "
    "matrix gradient optimizer learning rate python function return value"
).split()



def english_docs(n: int, seed: int = 0) -> list[str]:
    """Return ``n`` distinct English-like documents of a few lines each."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choices(WORDS, k=8)) for _ in range(3)]
        docs.append(f"document {i}: " + "\n".join(lines) + "\n")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    """Write ``docs`` as a .jsonl file with field "text"."""
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, list[str]]:
    """A small English corpus prepared once for several tests."""
    root = tmp_path_factory.mktemp("prepared")
    docs = english_docs(400)
    corpus = write_jsonl(root / "corpus.jsonl", docs)
    data = prepare_data(str(corpus), 400, tokenizer="bpe", val_fraction=0.05, cache_dir=str(root))
    return data, docs


# corpus ---------------------------------------------------------------------


def test_stdlib_files_listing() -> None:
    files = stdlib_files()
    assert len(files) > 500
    assert files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)


def test_corpus_files_folder_and_file(tmp_path: Path) -> None:
    for name in ["b.txt", "a.md", "sub/c.py", "sub/d.jsonl", "e.csv", ".hidden/f.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [f.relative_to(tmp_path).as_posix() for f in corpus_files(str(tmp_path))]
    assert found == ["a.md", "b.txt", "sub/c.py", "sub/d.jsonl"]
    assert corpus_files(str(tmp_path / "b.txt")) == [tmp_path / "b.txt"]
    assert corpus_files(None) == stdlib_files()


def test_corpus_files_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as e:
        corpus_files(str(missing))
    assert str(missing) in str(e.value) and ".jsonl" in str(e.value)
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported suffix.*\\.txt"):
        corpus_files(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable files"):
        corpus_files(str(tmp_path / "empty"))


def test_iter_documents(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": ""}\n{"body": "x", "text": "two"}\n')
    txt = tmp_path / "b.txt"
    txt.write_bytes(b"caf\xc3\xa9 \xff")
    (tmp_path / "c.txt").write_text("")
    docs = list(iter_documents([jsonl, txt, tmp_path / "c.txt"]))
    assert docs == ["one", "two", "café \ufffd"]


def test_iter_documents_missing_field(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n{"content": "two"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: .*'text'"):
        list(iter_documents([jsonl]))
    with pytest.raises(DataError, match=r"a\.jsonl:1: .*'content'"):
        list(iter_documents([jsonl], jsonl_field="content"))


# tokenizers -----------------------------------------------------------------


def test_bpe_round_trip(tmp_path: Path) -> None:
    docs = english_docs(100) + ["naïve café — 中文 😀 déjà vu\n\ttabs  and   spaces\r\n"]
    tok = train_tokenizer("bpe", lambda: iter(docs), 400)
    assert tok.kind == "bpe" and tok.vocab_size <= 400
    samples = [*docs[:5], "Ünïcödé ½ ∑ 😀 unseen: ÿ\x00\x7f", " leading space", ""]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(samples) == [tok.encode(t) for t in samples]
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    assert tok.eos_id not in tok.encode(f"a {EOS_TOKEN} b")  # literal text is not eos
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, Tokenizer) and loaded.kind == "bpe"
    assert loaded.encode(samples[5]) == tok.encode(samples[5])
    assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)


def test_jieba_sp_round_trip_and_word_boundaries(tmp_path: Path, chinese_lines) -> None:
    jieba = pytest.importorskip("jieba")
    pytest.importorskip("sentencepiece")
    lines = chinese_lines(300)
    docs = ["\n".join(lines[i : i + 10]) for i in range(0, 300, 10)]
    tok = train_tokenizer("jieba-sp", lambda: iter(docs), 600)
    assert tok.kind == "jieba-sp"
    samples = [docs[0], "我们 today 学习 Python 3\n\t生僻字龘！", lines[7] + EOS_TOKEN]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    text = lines[3]
    words = list(jieba.cut(text))
    word_ends = set(np.cumsum([len(w) for w in words]).tolist())
    pieces = [p.replace("\u2581", "") for p in tok.pieces(text)]  # type: ignore[attr-defined]
    assert "".join(pieces) == text
    piece_ends = set(np.cumsum([len(p) for p in pieces]).tolist())
    assert piece_ends >= word_ends  # every word boundary is a piece boundary
    assert any(len(p) > 1 for p in pieces)  # and pieces do merge characters
    tok.save(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").encode(text) == tok.encode(text)


def test_jieba_sp_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jieba", None)  # makes `import jieba` fail
    with pytest.raises(DataError, match=r"pip install 'loom\[zh\]'"):
        train_tokenizer("jieba-sp", lambda: iter(["你好"]), 600)


def test_resolve_kind(chinese_lines) -> None:
    chinese = "".join(chinese_lines(20))
    assert resolve_kind("auto", chinese) == "jieba-sp"
    assert resolve_kind("auto", "def f(x):\n    return x  # plain code") == "bpe"
    assert resolve_kind("auto", "中文" + "x" * 8) == "bpe"  # 20% CJK: below threshold
    assert resolve_kind("auto", "") == "bpe"
    assert resolve_kind("bpe", chinese) == "bpe"
    assert resolve_kind("jieba-sp", "english") == "jieba-sp"
    assert resolve_kind("wordpiece", "english") == "wordpiece"
    with pytest.raises(DataError, match="auto, bpe, jieba-sp, wordpiece"):
        resolve_kind("unigram", "")


def test_vocab_size_too_small() -> None:
    with pytest.raises(DataError, match="vocab_size must be at least 257"):
        train_tokenizer("bpe", lambda: iter(["abc"]), 100)


# prepare_data ---------------------------------------------------------------


def test_prepare_meta_and_entropy(prepared: tuple[PreparedData, list[str]]) -> None:
    data, docs = prepared
    meta = data.meta
    assert meta["kind"] == "bpe" and meta["n_files"] == 1 and meta["split"] == "documents"
    assert meta["vocab_size"] == data.tokenizer.vocab_size
    assert (meta["n_train_tokens"], meta["n_val_tokens"]) == (len(data.train), len(data.val))
    assert len(data.val) >= 2 * 1024 + 1
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    counts = np.bincount(np.asarray(data.train))
    p = counts[counts > 0] / counts.sum()
    assert meta["unigram_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
    first = data.tokenizer.decode(data.train[: list(data.train).index(data.tokenizer.eos_id)])
    assert first == docs[0]


def test_val_documents_not_in_train(prepared: tuple[PreparedData, list[str]]) -> None:
    data, docs = prepared
    eos = EOS_TOKEN

    def split_docs(tokens: np.ndarray) -> list[str]:
        text = data.tokenizer.decode(tokens.tolist())
        assert text.endswith(eos)
        return text[: -len(eos)].split(eos)

    train, val = split_docs(data.train), split_docs(data.val)
    assert len(val) == data.meta["n_val_documents"] > 0
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)


def test_cache_hit_does_not_retrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(english_docs(30)):
        (corpus / f"{i:03}.txt").write_text(doc)
    first = prepare_data(str(corpus), 300, cache_dir=str(tmp_path / "cache"))
    stamp = (first.dir / "train.bin").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained on a cache hit")

    monkeypatch.setattr(dataset_module, "train_tokenizer", fail)
    second = prepare_data(str(corpus), 300, cache_dir=str(tmp_path / "cache"))
    assert second.dir == first.dir and second.meta == first.meta
    assert (second.dir / "train.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(second.train, first.train)
    entries = sorted(p.name for p in (tmp_path / "cache" / "data").iterdir())
    assert entries == [first.dir.name]  # no temp folder left behind
    (corpus / "000.txt").write_text("changed")  # new content means a new entry
    with pytest.raises(AssertionError, match="retrained"):
        prepare_data(str(corpus), 300, cache_dir=str(tmp_path / "cache"))


def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text(" ".join(WORDS * 50))
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "env"))
    data = prepare_data(str(tmp_path / "a.txt"), 300)
    assert data.dir.parent == tmp_path / "env" / "data"


def test_small_corpus_tail_split(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("tiny corpus of one document. " * 20)
    data = prepare_data(str(tmp_path / "a.md"), 300, cache_dir=str(tmp_path))
    assert data.meta["split"] == "tail"
    assert 0 < len(data.val) <= len(data.train)
    assert data.meta["source"] == str((tmp_path / "a.md").resolve())


def test_prepare_chinese_auto(tmp_path: Path, chinese_lines) -> None:
    pytest.importorskip("jieba")
    pytest.importorskip("sentencepiece")
    lines = chinese_lines(400, seed=1)
    docs = ["\n".join(lines[i : i + 20]) for i in range(0, 400, 20)]
    corpus = write_jsonl(tmp_path / "zh.jsonl", docs)
    data = prepare_data(str(corpus), 600, cache_dir=str(tmp_path))
    assert data.meta["kind"] == data.tokenizer.kind == "jieba-sp"
    end = list(data.train).index(data.tokenizer.eos_id)
    assert data.tokenizer.decode(data.train[:end]) == docs[0]


def test_interrupted_prepare_leaves_no_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.txt").write_text(" ".join(WORDS * 50))

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_module, "_tokenize_and_split", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(tmp_path / "a.txt"), 300, cache_dir=str(tmp_path / "cache"))
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(str(tmp_path / "missing"), 300, cache_dir=str(tmp_path))
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="val_fraction"):
        prepare_data(str(tmp_path / "a.txt"), 300, val_fraction=1.0, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="valid choices"):
        prepare_data(str(tmp_path / "a.txt"), 300, tokenizer="char", cache_dir=str(tmp_path))
    write_jsonl(tmp_path / "b.jsonl", ["x"])
    with pytest.raises(DataError, match=r"b\.jsonl:1: .*'body'"):
        prepare_data(str(tmp_path / "b.jsonl"), 300, jsonl_field="body", cache_dir=str(tmp_path))


def _no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any tokenizer training or entry building fail the test."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("built a cache entry")

    monkeypatch.setattr(dataset_module, "_build", fail)
    monkeypatch.setattr(dataset_module, "train_tokenizer", fail)


def _first_doc(data: PreparedData) -> list[int]:
    """Return the tokens of the first training document (without eos)."""
    tokens = np.asarray(data.train).tolist()
    return tokens[: tokens.index(data.tokenizer.eos_id)]


@pytest.fixture()
def two_corpora(tmp_path: Path) -> tuple[Path, list[str], Path]:
    """A corpus with its documents, and a tokenizer folder trained on another corpus."""
    docs = english_docs(60)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    other_docs = [f"record {i}: " + "qu zy xw vo " * (i % 7 + 1) + "\n" for i in range(200)]
    other_corpus = write_jsonl(tmp_path / "other.jsonl", other_docs)
    other = prepare_data(str(other_corpus), 300, cache_dir=str(tmp_path / "other-cache"))
    run_tokenizer = tmp_path / "run" / "tokenizer"
    other.tokenizer.save(run_tokenizer)  # what a run keeps of its data
    return corpus, docs, run_tokenizer


def test_tokenizer_dir_same_tokenizer_uses_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    docs = english_docs(60)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    cache = str(tmp_path / "cache")
    first = prepare_data(str(corpus), 300, cache_dir=cache)
    assert first.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(first.dir / "tokenizer")
    run_tokenizer = tmp_path / "run" / "tokenizer"
    first.tokenizer.save(run_tokenizer)
    stamp = (first.dir / "train.bin").stat().st_mtime_ns
    _no_build(monkeypatch)
    for given in (first.dir / "tokenizer", run_tokenizer, str(run_tokenizer)):
        with caplog.at_level(logging.INFO, logger="loom.data"):
            data = prepare_data(str(corpus), 300, cache_dir=cache, tokenizer_dir=given)
        assert data.dir == first.dir and data.meta == first.meta
        assert "same tokenizer" in caplog.text
        caplog.clear()
    assert (first.dir / "train.bin").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir()] == [first.dir.name]
    # an entry from before fingerprints were recorded: computed on the fly
    meta = json.loads((first.dir / "meta.json").read_text())
    del meta["tokenizer_fingerprint"]
    (first.dir / "meta.json").write_text(json.dumps(meta))
    data = prepare_data(str(corpus), 300, cache_dir=cache, tokenizer_dir=run_tokenizer)
    assert data.dir == first.dir
    assert _first_doc(data) == first.tokenizer.encode(docs[0])


def test_tokenizer_dir_other_tokenizer_reencodes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    two_corpora: tuple[Path, list[str], Path],
) -> None:
    corpus, docs, run_tokenizer = two_corpora
    other = load_tokenizer(run_tokenizer)
    cache = str(tmp_path / "cache")
    own = prepare_data(str(corpus), 300, cache_dir=cache)
    assert tokenizer_fingerprint(run_tokenizer) != own.meta["tokenizer_fingerprint"]
    assert own.tokenizer.encode(docs[0]) != other.encode(docs[0])
    with caplog.at_level(logging.INFO, logger="loom.data"):
        data = prepare_data(
            str(corpus), 300, tokenizer="auto", cache_dir=cache, tokenizer_dir=run_tokenizer
        )
    assert "tokenized differently from this run's tokenizer; re-encoding with it" in caplog.text
    assert data.dir != own.dir and data.dir.parent == own.dir.parent
    assert data.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(run_tokenizer)
    assert data.meta["tokenizer_dir"] == str(run_tokenizer.resolve())
    assert data.meta["vocab_size"] == other.vocab_size == data.tokenizer.vocab_size
    assert all(data.tokenizer.encode(d) == other.encode(d) for d in docs[:10])
    assert _first_doc(data) == other.encode(docs[0])
    assert data.tokenizer.decode(_first_doc(data)) == docs[0]
    n_tokens = sum(len(other.encode(d)) + 1 for d in docs)
    assert data.meta["n_train_tokens"] + data.meta["n_val_tokens"] == n_tokens
    # the second call finds the re-encoded entry; the normal one is untouched
    stamp = (data.dir / "train.bin").stat().st_mtime_ns
    _no_build(monkeypatch)
    again = prepare_data(str(corpus), 300, cache_dir=cache, tokenizer_dir=run_tokenizer)
    assert again.dir == data.dir and again.meta == data.meta
    assert (again.dir / "train.bin").stat().st_mtime_ns == stamp
    assert prepare_data(str(corpus), 300, cache_dir=cache).dir == own.dir
    names = sorted(p.name for p in (tmp_path / "cache" / "data").iterdir())
    assert names == sorted([own.dir.name, data.dir.name])


def test_tokenizer_dir_without_cache_encodes_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_corpora: tuple[Path, list[str], Path]
) -> None:
    corpus, docs, run_tokenizer = two_corpora
    other = load_tokenizer(run_tokenizer)
    cache = tmp_path / "cache"
    first = prepare_data(str(corpus), 300, cache_dir=str(cache), tokenizer_dir=run_tokenizer)
    shutil.rmtree(cache)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained a tokenizer")

    monkeypatch.setattr(dataset_module, "train_tokenizer", fail)
    data = prepare_data(str(corpus), 300, cache_dir=str(cache), tokenizer_dir=run_tokenizer)
    assert data.dir == first.dir and (data.dir / "train.bin").is_file()
    assert data.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(run_tokenizer)
    assert _first_doc(data) == other.encode(docs[0])
    assert np.array_equal(data.train, first.train) and np.array_equal(data.val, first.val)


def test_tokenizer_dir_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(" ".join(WORDS * 50))
    missing = tmp_path / "run" / "tokenizer"
    for folder in (missing, tmp_path):  # absent, and a folder holding no tokenizer
        with pytest.raises(DataError) as e:
            prepare_data(str(tmp_path / "a.txt"), 300, cache_dir=str(tmp_path), tokenizer_dir=folder)
        assert str(folder) in str(e.value) and "\n" not in str(e.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_meta.json").write_text('{"kind": "bpe", "model_file": "tokenizer.json"}')
    (broken / "tokenizer.json").write_text("not json")
    with pytest.raises(DataError, match="cannot load the tokenizer") as e:
        prepare_data(str(tmp_path / "a.txt"), 300, cache_dir=str(tmp_path), tokenizer_dir=broken)
    assert str(broken) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        tokenizer_fingerprint(missing)


def test_token_dtype() -> None:
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(150_000) == np.uint32


# samplers -------------------------------------------------------------------


def test_sampler_deterministic_and_rows() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    sampler = BatchSampler(tokens, block_size=16, batch_size=8, seed=3)
    x, y = sampler.batch(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens
    x2, y2 = BatchSampler(tokens, 16, 8, seed=3).batch(5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sampler.batch(6)[0])
    assert not torch.equal(x, BatchSampler(tokens, 16, 8, seed=4).batch(5)[0])
    for rows in (slice(0, 2), slice(2, 8), slice(3, 4)):
        xr, yr = sampler.batch(5, rows)
        assert torch.equal(xr, x[rows]) and torch.equal(yr, y[rows])


def test_sampler_resumable() -> None:
    tokens = np.random.default_rng(0).integers(0, 500, size=5_000).astype(np.uint16)
    warm = BatchSampler(tokens, 32, 4, seed=1)
    for step in range(5):
        warm.batch(step)
    fresh = BatchSampler(tokens, 32, 4, seed=1)
    assert torch.equal(warm.batch(5)[0], fresh.batch(5)[0])


def test_sampler_covers_edges() -> None:
    tokens = np.arange(9, dtype=np.uint32)
    x, y = BatchSampler(tokens, block_size=8, batch_size=3, seed=0).batch(0)
    assert torch.equal(x, torch.arange(8).expand(3, 8))  # only one window fits
    assert torch.equal(y, torch.arange(1, 9).expand(3, 8))


def test_sampler_too_short() -> None:
    with pytest.raises(DataError, match=r"only 8 tokens.*block_size \+ 1 = 9"):
        BatchSampler(np.arange(8), block_size=8, batch_size=2, seed=0)
    with pytest.raises(DataError, match="batch_size"):
        BatchSampler(np.arange(100), block_size=8, batch_size=0, seed=0)


def test_eval_batches_sequential() -> None:
    tokens = np.arange(1_000, dtype=np.uint16)
    batches = list(eval_batches(tokens, block_size=10, batch_size=32))
    assert [len(x) for x, _ in batches] == [32, 32, 32, 3]  # 99 windows of 10 (+1)
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(xs, torch.arange(990)) and torch.equal(ys, torch.arange(1, 991))
    limited = list(eval_batches(tokens, 10, 32, max_batches=2))
    assert len(limited) == 2 and torch.equal(limited[1][0], batches[1][0])
    again = list(eval_batches(tokens, 10, 32, max_batches=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(limited, again))
    with pytest.raises(DataError, match="only 5 tokens"):
        eval_batches(np.arange(5), 10, 2)
