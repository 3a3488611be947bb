"""Preparing a corpus once: train a tokenizer, tokenize, split, cache.

:func:`prepare_data` turns a corpus (see :mod:`loom.data.corpus`) into two
flat token files, ``train.bin`` and ``val.bin``, plus the tokenizer, in a
cache folder keyed by the settings and the corpus files' sizes and
modification times. A later call with the same inputs memory-maps the cached
files instead of tokenizing again.

Cache layout (``<cache>/data/<sha1 key>/``)::

    train.bin      train tokens, uint16 (or uint32 for vocabularies > 65535)
    val.bin        validation tokens, same dtype
    tokenizer/     the tokenizer's files (see loom.data.tokenizer)
    meta.json      written last; its presence marks a complete cache entry

An entry's tokenizer is normally trained on the corpus. A run that must keep
its own tokenizer (resuming, evaluating) passes ``tokenizer_dir``: the normal
entry is used when its tokenizer is identical (same
:func:`tokenizer_fingerprint`), else the corpus is encoded with the given
tokenizer into a separate entry keyed by that fingerprint too.

Everything is built in a temporary sibling folder that is renamed into place
at the end, so an interrupted run never leaves an entry that looks valid
(it may leave a ``.tmp-*`` folder, which is safe to delete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loom.data.corpus import DataError, corpus_files, iter_documents
from loom.data.tokenizer import META_FILE as TOKENIZER_META_FILE
from loom.data.tokenizer import Tokenizer, load_tokenizer, resolve_kind, train_tokenizer

__all__ = [
    "PreparedData",
    "prepare_data",
    "token_dtype",
    "tokenizer_fingerprint",
]

_LOG = logging.getLogger("loom.data")

#: Bump when the cache layout or tokenization changes, to invalidate old entries.
FORMAT_VERSION = 2  # 2: documents framed by the tokenizer (a Llama tokenizer.json's <s>)
#: Validation gets at least this many tokens (two 1024-token windows) when possible.
MIN_VAL_TOKENS = 2 * 1024 + 1
_ENCODE_CHUNK_DOCS = 256
_SAMPLE_FILES = 16
_SAMPLE_CHARS_PER_FILE = 65_536
_ENTROPY_CHUNK = 1 << 24
META_FILE = "meta.json"


@dataclass(frozen=True, eq=False)
class PreparedData:
    """A tokenized corpus ready for training.

    Attributes:
        dir: the cache folder holding the files below.
        tokenizer: the tokenizer the tokens were made with.
        train: training tokens (read-only memmap); documents end with eos.
        val: validation tokens (read-only memmap), from documents unseen in
            ``train`` unless the corpus was too small (``meta["split"]``).
        meta: facts about the data, including ``kind``, ``vocab_size``,
            ``n_train_tokens``, ``n_val_tokens``, ``n_files``, ``source``,
            ``tokenizer_fingerprint`` (see :func:`tokenizer_fingerprint`;
            absent from entries made before it existed) and
            ``unigram_entropy_nats`` (the loss of the best model that ignores
            context: a trained model must get below it).
    """

    dir: Path
    tokenizer: Tokenizer
    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    meta: dict[str, Any]


def token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned dtype for the ids of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Return the entropy in nats of the token frequencies in ``tokens``."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), _ENTROPY_CHUNK):
        chunk = np.asarray(tokens[start : start + _ENTROPY_CHUNK])
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def cache_root(cache_dir: str | None) -> Path:
    """Return the cache root: ``cache_dir``, else ``$LOOM_CACHE``, else ``~/.cache/loom``."""
    return Path(cache_dir or os.environ.get("LOOM_CACHE") or "~/.cache/loom").expanduser()


def cache_key(
    kind: str, vocab_size: int, val_fraction: float, jsonl_field: str, files: list[Path]
) -> str:
    """Return the sha1 hex key of the settings and the files' identity."""
    stats = []
    for f in files:
        st = f.stat()
        stats.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    settings = [FORMAT_VERSION, kind, vocab_size, val_fraction, jsonl_field, sorted(stats)]
    return hashlib.sha1(json.dumps(settings).encode()).hexdigest()


def tokenizer_fingerprint(dir: str | Path, start_ids: list[int] | None = None) -> str:
    """Return the sha1 hex digest of the model file of the tokenizer saved in ``dir`` (and of the ids it
    starts each document with, where it starts them with any: ``start_ids`` of the loaded tokenizer,
    else the folder's ``document_start``, which :meth:`Tokenizer.save` writes).

    Two tokenizer folders with the same fingerprint encode text identically.

    Raises:
        DataError: ``dir`` is not a folder written by :meth:`Tokenizer.save`.
    """
    dir = Path(dir).expanduser()
    if not dir.is_dir():
        raise DataError(f"tokenizer folder {str(dir)!r} does not exist")
    try:
        meta = json.loads((dir / TOKENIZER_META_FILE).read_text())
        model = (dir / meta["model_file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{str(dir)!r} is not a tokenizer folder ({detail})") from None
    digest = hashlib.sha1(model)
    start = meta.get("document_start") if start_ids is None else start_ids
    if start:  # what frames each text is part of how a corpus is encoded
        digest.update(json.dumps(list(start)).encode())
    return digest.hexdigest()


def _load_given_tokenizer(dir: Path) -> tuple[Tokenizer, str]:
    """Load the tokenizer in ``dir`` and return it with its fingerprint.

    Raises:
        DataError: ``dir`` is missing or holds no loadable tokenizer (one line).
    """
    tokenizer_fingerprint(dir)  # a folder that is no tokenizer's: one line saying so
    try:
        tokenizer = load_tokenizer(dir)
    except DataError as e:
        raise DataError(f"cannot load the tokenizer in {str(dir)!r}: {e}") from None
    except Exception as e:  # a corrupt model file: the libraries raise various errors
        detail = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"cannot load the tokenizer in {str(dir)!r}: {detail}") from None
    # from what the loaded tokenizer does: a folder saved before document_start was written down (a
    # Llama tokenizer.model's add_bos_token alone in its meta) still tells its framing apart
    return tokenizer, tokenizer_fingerprint(dir, tokenizer.start_ids)


def _entry_fingerprint(dir: Path) -> str:
    """Return the tokenizer fingerprint of the complete cache entry ``dir``.

    Entries made before fingerprints were recorded get it computed here.
    """
    meta = json.loads((dir / META_FILE).read_text())
    return meta.get("tokenizer_fingerprint") or tokenizer_fingerprint(dir / "tokenizer")


def _sample_text(files: list[Path], jsonl_field: str) -> str:
    """Return text from up to 16 evenly spaced files, to detect the language."""
    step = max(1, len(files) // _SAMPLE_FILES)
    parts = []
    for file in files[::step][:_SAMPLE_FILES]:
        taken = 0
        for doc in iter_documents([file], jsonl_field):
            parts.append(doc[: _SAMPLE_CHARS_PER_FILE - taken])
            taken += len(parts[-1])
            if taken >= _SAMPLE_CHARS_PER_FILE:
                break
    return "".join(parts)


def _load(dir: Path) -> PreparedData:
    """Open the complete cache entry in ``dir``."""
    meta = json.loads((dir / META_FILE).read_text())
    dtype = np.dtype(meta["dtype"])
    return PreparedData(
        dir=dir,
        tokenizer=load_tokenizer(dir / "tokenizer"),
        train=np.memmap(dir / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(dir / "val.bin", dtype=dtype, mode="r"),
        meta=meta,
    )


def _chunks(docs: Iterator[str], size: int, max_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Group ``docs`` into lists of ``size``, or fewer once they hold ``max_chars`` characters (the
    last may be shorter): what is encoded at once, and so held in memory as token lists."""
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) == size or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_corpus(
    tokenizer: Tokenizer, docs: Iterator[str], path: Path, dtype: np.dtype
) -> np.ndarray:
    """Write every document's tokens followed by eos to ``path``.

    Returns:
        The number of tokens (eos included) of each document.
    """
    lengths: list[int] = []
    with path.open("wb") as f:
        for chunk in _chunks(docs, _ENCODE_CHUNK_DOCS):
            flat: list[int] = []
            for ids in tokenizer.encode_batch(chunk):
                doc = tokenizer.document(ids)
                flat.extend(doc)
                lengths.append(len(doc))
            np.asarray(flat, dtype=dtype).tofile(f)
    return np.asarray(lengths, dtype=np.int64)


def _document_split(lengths: np.ndarray, val_fraction: float) -> np.ndarray | None:
    """Choose every k-th document for validation; None if that cannot work.

    ``k`` starts at the spacing that gives ``val_fraction`` of the tokens
    (or at least :data:`MIN_VAL_TOKENS`) and shrinks until the chosen
    documents hold at least :data:`MIN_VAL_TOKENS`. Gives up (None) when
    validation would need more than half the tokens.

    Returns:
        A boolean mask over documents, True for validation.
    """
    n_tokens = int(lengths.sum())
    target = max(math.ceil(val_fraction * n_tokens), MIN_VAL_TOKENS)
    k = max(2, n_tokens // target)
    while k >= 2:
        mask = np.arange(len(lengths)) % k == k // 2
        n_val = int(lengths[mask].sum())
        if n_val >= MIN_VAL_TOKENS:
            return mask if n_val <= n_tokens // 2 else None
        k = k * 2 // 3
    return None


def _split_ranges(
    lengths: np.ndarray, val_fraction: float
) -> tuple[list[slice], list[slice], str]:
    """Return token ranges of train and validation, and the split method.

    Prefers whole documents (``"documents"``); for corpora too small for
    that, validation is the tail of the token stream (``"tail"``).
    """
    n_tokens = int(lengths.sum())
    mask = _document_split(lengths, val_fraction)
    if mask is None:
        n_val = min(max(math.ceil(val_fraction * n_tokens), MIN_VAL_TOKENS), n_tokens // 2)
        cut = n_tokens - n_val
        return [slice(0, cut)], [slice(cut, n_tokens)], "tail"
    offsets = np.concatenate(([0], np.cumsum(lengths)))  # token offset of each document
    change = np.flatnonzero(mask[1:] != mask[:-1]) + 1  # runs of same-split documents
    train, val = [], []
    firsts, ends = np.concatenate(([0], change)), np.concatenate((change, [len(mask)]))
    for first, end in zip(firsts, ends):
        (val if mask[first] else train).append(slice(int(offsets[first]), int(offsets[end])))
    return train, val, "documents"


def _write_ranges(tokens: np.ndarray, ranges: list[slice], path: Path) -> int:
    """Write ``tokens[r]`` for each range ``r`` to ``path``; return the token count."""
    with path.open("wb") as f:
        for r in ranges:
            tokens[r].tofile(f)
    return sum(r.stop - r.start for r in ranges)


def _tokenize_and_split(
    tokenizer: Tokenizer, docs: Iterator[str], dir: Path, val_fraction: float
) -> dict[str, Any]:
    """Encode ``docs`` into ``dir``/train.bin and val.bin; return facts for meta."""
    dtype = token_dtype(tokenizer.vocab_size)
    all_path = dir / "all.bin"
    lengths = _encode_corpus(tokenizer, docs, all_path, dtype)
    if lengths.sum() < 2:
        raise DataError("the corpus has no text to train on (all documents are empty)")
    all_tokens = np.memmap(all_path, dtype=dtype, mode="r")
    train, val, method = _split_ranges(lengths, val_fraction)
    facts = {
        "dtype": dtype.name,
        "n_documents": len(lengths),
        "split": method,
        "n_val_documents": len(val) if method == "documents" else None,
        "n_train_tokens": _write_ranges(all_tokens, train, dir / "train.bin"),
        "n_val_tokens": _write_ranges(all_tokens, val, dir / "val.bin"),
    }
    del all_tokens
    all_path.unlink()
    return facts


def _build(
    dir: Path,
    files: list[Path],
    vocab_size: int,
    settings: dict[str, Any],
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Write the token and tokenizer files into ``dir``.

    Args:
        tokenizer: encode with this tokenizer; None to train one of
            ``settings["kind"]`` with ``vocab_size`` tokens on the corpus.

    Returns:
        Facts about the result, for meta.json.
    """
    kind, val_fraction, jsonl_field = (
        settings["kind"], settings["val_fraction"], settings["jsonl_field"]
    )
    start = time.perf_counter()
    if tokenizer is None:
        tokenizer = train_tokenizer(kind, lambda: iter_documents(files, jsonl_field), vocab_size)
        _LOG.info(
            "trained %s tokenizer (vocab %d) in %.1fs",
            kind,
            tokenizer.vocab_size,
            time.perf_counter() - start,
        )
    trained = time.perf_counter()
    replaced: dict[str, int] = {}
    facts = _tokenize_and_split(tokenizer, iter_documents(files, jsonl_field, replaced), dir, val_fraction)
    encoded = time.perf_counter()
    if replaced:  # said, not silently replaced
        worst = max(replaced, key=replaced.get)
        _LOG.warning("%d bytes that are not UTF-8 (in %d file(s); most in %s: %d) were read as U+FFFD",
                     sum(replaced.values()), len(replaced), worst, replaced[worst])
    facts["replaced_bytes"] = sum(replaced.values())
    _LOG.info(
        "encoded %d documents into %d train + %d val tokens (%s split) in %.1fs",
        facts["n_documents"],
        facts["n_train_tokens"],
        facts["n_val_tokens"],
        facts["split"],
        encoded - trained,
    )
    train = np.memmap(dir / "train.bin", dtype=facts["dtype"], mode="r")
    facts["unigram_entropy_nats"] = unigram_entropy(train, tokenizer.vocab_size)
    del train
    tokenizer.save(dir / "tokenizer")
    facts.update(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
    facts["tokenizer_fingerprint"] = tokenizer_fingerprint(dir / "tokenizer")
    facts["tokenizer_seconds"] = round(trained - start, 3)
    facts["prepare_seconds"] = round(time.perf_counter() - start, 3)
    return facts


def _publish(tmp: Path, final: Path) -> None:
    """Atomically rename ``tmp`` to ``final``, unless another process won the race."""
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / META_FILE).is_file():  # a concurrent prepare finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(final)  # an incomplete leftover: replace it
        os.rename(tmp, final)


def _create_entry(
    final: Path,
    files: list[Path],
    vocab_size: int,
    settings: dict[str, Any],
    tokenizer: Tokenizer | None = None,
) -> None:
    """Build a cache entry in a temporary folder, then move it to ``final``.

    ``tokenizer`` is passed to :func:`_build` (None: train one).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name[:12]}-"))
    try:
        facts = _build(tmp, files, vocab_size, settings, tokenizer)
        meta = {"format_version": FORMAT_VERSION, **settings, **facts}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks complete
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _LOG.info("data ready in %s (%.1fs)", final, meta["prepare_seconds"])


def prepare_data(
    path: str | None,
    vocab_size: int,
    tokenizer: str = "auto",
    val_fraction: float = 0.01,
    cache_dir: str | None = None,
    jsonl_field: str = "text",
    *,
    tokenizer_dir: str | Path | None = None,
) -> PreparedData:
    """Tokenize the corpus at ``path`` once and return it memory-mapped.

    Args:
        path: a corpus file or folder (see :func:`loom.data.corpus.corpus_files`);
            None for the Python standard library's source code.
        vocab_size: requested vocabulary size (the actual one is in meta).
        tokenizer: ``"bpe"``, ``"jieba-sp"``, or ``"auto"`` (jieba-sp for
            mostly-Chinese corpora, else bpe). Ignored for the kind when
            ``tokenizer_dir`` is given.
        val_fraction: share of tokens held out for validation, as whole
            documents (every k-th) when the corpus is large enough.
        cache_dir: cache root; default ``$LOOM_CACHE`` or ``~/.cache/loom``.
        jsonl_field: the text field of ``.jsonl`` records.
        tokenizer_dir: a folder written by :meth:`Tokenizer.save` (e.g. a
            run's ``tokenizer/``) whose tokenizer must be used instead of
            training one. The normal cache entry is returned when its
            tokenizer is identical; otherwise the corpus is encoded with the
            given tokenizer into (or loaded from) an entry of its own.

    Raises:
        DataError: bad path, settings, data or ``tokenizer_dir``.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    given: Tokenizer | None = None
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir).expanduser().resolve()
        given, fingerprint = _load_given_tokenizer(tokenizer_dir)
        resolve_kind(tokenizer, "")  # still reject an unknown setting
        if tokenizer not in ("auto", given.kind):
            _LOG.warning(
                "tokenizer=%s ignored: the tokenizer in %s is %s",
                tokenizer,
                tokenizer_dir,
                given.kind,
            )
    files = corpus_files(path)
    if given is not None:
        kind = given.kind
    else:
        sample = _sample_text(files, jsonl_field) if tokenizer == "auto" else ""
        kind = resolve_kind(tokenizer, sample)
    root = cache_root(cache_dir) / "data"
    key = cache_key(kind, vocab_size, val_fraction, jsonl_field, files)
    final = root / key
    if given is None:
        if (final / META_FILE).is_file():
            _LOG.info("using cached data in %s", final)
            return _load(final)
    else:
        own = root / hashlib.sha1((key + fingerprint).encode()).hexdigest()
        if (final / META_FILE).is_file():
            if _entry_fingerprint(final) == fingerprint:
                _LOG.info("using cached data in %s (same tokenizer as %s)", final, tokenizer_dir)
                return _load(final)
            _LOG.info(
                "the cached data in %s was tokenized differently from this run's tokenizer; "
                "%s (tokenizer %s)",
                final,
                "using the copy encoded with it" if (own / META_FILE).is_file()
                else "re-encoding with it",
                tokenizer_dir,
            )
        final = own
        if (final / META_FILE).is_file():
            _LOG.info("using cached data encoded with the tokenizer of %s: %s", tokenizer_dir, final)
            return _load(final)
    source = "python-stdlib" if path is None else str(Path(path).expanduser().resolve())
    how = f"tokenizer {kind}" if given is None else f"the {kind} tokenizer of {tokenizer_dir}"
    _LOG.info("preparing %s (%d files, %s) into %s", source, len(files), how, final)
    settings: dict[str, Any] = {
        "kind": kind,
        "source": source,
        "n_files": len(files),
        "val_fraction": val_fraction,
        "jsonl_field": jsonl_field,
    }
    if given is not None:
        settings["tokenizer_dir"] = str(tokenizer_dir)
    _create_entry(final, files, vocab_size, settings, given)
    return _load(final)
