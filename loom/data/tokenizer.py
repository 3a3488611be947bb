"""Tokenizers: training, encoding, decoding, saving and loading.

Two kinds are supported:

``bpe``
    Byte-level BPE trained with the Hugging Face ``tokenizers`` library, as
    used by GPT-2. Any text round-trips exactly through encode/decode.

``jieba-sp``
    The PanGu-alpha recipe for Chinese: spaces and newlines are replaced by
    the placeholders U+2582 and U+2583, the text is segmented into words by
    ``jieba``, the words are joined by spaces, and a SentencePiece BPE model
    is trained on (and applied to) the result, so no piece crosses a word
    boundary. Decoding reverses the mapping. ``jieba`` and ``sentencepiece``
    are optional dependencies (``pip install 'loom[zh]'``).

``wordpiece``
    BERT's WordPiece (Devlin et al. 2018), trained with the ``tokenizers``
    library: words and punctuation split apart, words into ``##``-continued
    pieces, case kept (code is case-sensitive). It reserves BERT's special
    tokens :data:`WORDPIECE_SPECIALS` ([PAD] [UNK] [CLS] [SEP] [MASK], then
    ``<|endoftext|>`` and [NL]) as ids 0-6; every line of a document ends
    with [NL], the sentence boundary masked-LM pretraining reads. Decoding
    does not restore the original spacing.

``hf`` and ``sentencepiece``
    A tokenizer that came with a model (``train.init_from``, ``data.tokenizer=DIR``):
    the directory's ``tokenizer.json`` read by ``tokenizers`` (:class:`HFTokenizer`),
    or, where it holds only T5's ``spiece.model`` or a Llama's ``tokenizer.model``, that
    SentencePiece model read by ``sentencepiece`` (:class:`SentencePieceTokenizer`,
    :class:`LlamaSentencePieceTokenizer`, which starts each text with ``<s>`` as ``transformers``'
    ``LlamaTokenizer`` does). They are loaded, not trained.

All reserve the special token ``<|endoftext|>`` (:data:`EOS_TOKEN`), which is
appended after every document when a corpus is tokenized. Literal occurrences
of that string inside documents are encoded as ordinary text.

A tokenizer is persisted as plain files: ``tokenizer_meta.json`` plus the
model file of its kind.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from loom.data.corpus import DataError

EOS_TOKEN = "<|endoftext|>"
KINDS: tuple[str, ...] = ("bpe", "jieba-sp", "wordpiece")
META_FILE = "tokenizer_meta.json"
#: Tokenizers are trained on at most this many characters of text, an evenly
#: strided subset of the documents, to keep training fast on few cores.
TRAIN_MAX_CHARS = 12_000_000
#: The smallest vocabulary: the 256 byte values plus ``<|endoftext|>``.
MIN_VOCAB_SIZE = 257
#: "auto" picks jieba-sp when more than this share of non-space chars is CJK.
CJK_THRESHOLD = 0.30

_SPACE, _NEWLINE = "\u2582", "\u2583"
_CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x3134F),  # Extensions B to G
)
_ZH_MISSING = (
    "Chinese tokenization (tokenizer=jieba-sp) needs jieba and sentencepiece: "
    "pip install 'loom[zh]'"
)

DocsFactory = Callable[[], Iterator[str]]


class Tokenizer(ABC):
    """Maps text to token ids and back.

    Attributes:
        kind: ``"bpe"`` or ``"jieba-sp"``.
    """

    kind: ClassVar[str]
    model_file: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The actual number of tokens in the vocabulary."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>``, appended after every document."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text``, no special tokens added (:meth:`document` adds them)."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts at once (faster than one by one)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of token ``ids``."""

    @abstractmethod
    def _write_model(self, path: Path) -> None:
        """Write the model file to ``path``."""

    @property
    def start_ids(self) -> list[int]:
        """The ids that start every document and prompt: none, but where the tokenizer's own conventions
        begin each text with a token (a Llama's ``<s>``, where its ``add_bos_token`` says so)."""
        return []

    def document(self, ids: list[int]) -> list[int]:
        """A text's ids, as :meth:`encode` gives them, framed as a document of a corpus or a record:
        :attr:`start_ids`, the ids, eos."""
        return [*self.start_ids, *ids, self.eos_id]

    def _meta(self) -> dict[str, Any]:
        """What :meth:`save` writes beside the model file (what ``load`` reads back)."""
        return {"kind": self.kind, "model_file": self.model_file, "eos_token": EOS_TOKEN}

    def save(self, dir: Path) -> None:
        """Save the tokenizer as files in ``dir`` (created if needed). Its :attr:`start_ids`, part of how
        it encodes a corpus, are written down (``document_start``) for the data cache's fingerprint."""
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        self._write_model(dir / self.model_file)
        meta = self._meta() | ({"document_start": self.start_ids} if self.start_ids else {})
        (dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"


class _TokenizersLibraryTokenizer(Tokenizer):
    """A tokenizer backed by a Hugging Face ``tokenizers.Tokenizer``, saved as its ``tokenizer.json``;
    special tokens written literally in the text are text."""

    model_file = "tokenizer.json"

    def __init__(self, hf: Any) -> None:
        self._hf = hf
        self._hf.encode_special_tokens = True  # a literal "<|endoftext|>" or "[MASK]" in the text is text

    @classmethod
    def load(cls, path: Path) -> _TokenizersLibraryTokenizer:
        """Load the model file written by :meth:`save`."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return int(self._hf.get_vocab_size(with_added_tokens=True))

    def _encode_lines(self, texts: list[str]) -> list[Any]:
        """The library's encodings of ``texts``, without special tokens added."""
        # encode_batch_fast skips computing offsets (~40% faster); newer tokenizers only.
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return encode(texts, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._hf.decode([int(i) for i in ids], skip_special_tokens=False))

    def _write_model(self, path: Path) -> None:
        self._hf.save(str(path))


class BpeTokenizer(_TokenizersLibraryTokenizer):
    """Byte-level BPE backed by a Hugging Face ``tokenizers.Tokenizer``."""

    kind = "bpe"

    def __init__(self, hf: Any) -> None:
        super().__init__(hf)
        self._eos_id = hf.token_to_id(EOS_TOKEN)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BpeTokenizer:
        """Train a byte-level BPE with ``vocab_size`` tokens on ``texts``."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @property
    def eos_id(self) -> int:
        return int(self._eos_id)

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._encode_lines(texts)]


class HFTokenizer(BpeTokenizer):
    """The tokenizer of a Hugging Face model directory (GPT-2's, Llama's, ...): its ``tokenizer.json``
    (or GPT-2's ``vocab.json`` + ``merges.txt``) read by the ``tokenizers`` library, with the
    directory's end-of-sequence token as loom's end of a document. Its ``tokenizer_config.json`` and
    ``special_tokens_map.json`` travel with it, so an exported model gets them back."""

    kind = "hf"
    model_file = "tokenizer.json"
    EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, hf: Any, eos_token: str = EOS_TOKEN, extra: dict[str, str] | None = None) -> None:
        self.eos_token, self.extra = eos_token, dict(extra or {})
        super().__init__(hf)
        self._eos_id = hf.token_to_id(eos_token)
        if self._eos_id is None:
            raise DataError(f"the tokenizer has no token {eos_token!r} (its end-of-sequence token)")
        self._start = _bos_start(self.extra, hf)

    @property
    def start_ids(self) -> list[int]:
        """``[bos]`` where ``transformers`` starts each text with the directory's ``bos_token`` (a Llama's
        or Mistral's ``tokenizer.json``: its post-processor, or ``add_bos_token``); else none."""
        return list(self._start)

    @classmethod
    def from_pretrained_dir(cls, dir: Path) -> HFTokenizer:
        """The tokenizer of the model directory ``dir`` (as ``transformers`` saves it)."""
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers

        dir = Path(dir).expanduser()
        if (dir / "tokenizer.json").is_file():
            hf = HFTok.from_file(str(dir / "tokenizer.json"))
        elif (dir / "vocab.json").is_file() and (dir / "merges.txt").is_file():  # GPT-2's older files
            hf = HFTok(models.BPE.from_file(str(dir / "vocab.json"), str(dir / "merges.txt")))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
        elif (dir / "vocab.txt").is_file():  # a BERT's WordPiece vocabulary alone
            hf = _bert_wordpiece(dir)
        else:
            raise DataError(f"{str(dir)!r} holds no tokenizer.json (nor vocab.json + merges.txt, a BERT's "
                            "vocab.txt, T5's spiece.model or a Llama's tokenizer.model); loom reads fast "
                            "(tokenizers-library) and SentencePiece tokenizers")
        extra = {f: (dir / f).read_text() for f in cls.EXTRA_FILES if (dir / f).is_file()}
        return cls(hf, _eos_token(dir, extra, hf), extra)

    @property
    def special_ids(self) -> dict[str, int] | None:
        """A BERT tokenizer's [CLS], [SEP] and [PAD] ids (under the names its files give them), and its
        end of a document; None when it lacks one of them (GPT-2's, Llama's)."""
        ids = {"<|endoftext|>": self.eos_id}
        for key, default in (("cls_token", CLS), ("sep_token", SEP), ("pad_token", PAD)):
            found = self._hf.token_to_id(_named_token(self.extra, key) or default)
            if found is None:
                return None
            ids[default] = int(found)
        return ids

    @property
    def pad_id(self) -> int | None:
        """The id of the padding token the directory's files name (T5's ``<pad>``), or None."""
        token = _named_token(self.extra, "pad_token")
        found = self._hf.token_to_id(token) if token else None
        return None if found is None else int(found)

    @classmethod
    def load(cls, path: Path) -> HFTokenizer:
        from tokenizers import Tokenizer as HFTok

        dir = Path(path).parent
        meta = json.loads((dir / META_FILE).read_text())
        extra = {f: (dir / f).read_text() for f in cls.EXTRA_FILES if (dir / f).is_file()}
        return cls(HFTok.from_file(str(path)), meta["eos_token"], extra)

    def _meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_file": self.model_file, "eos_token": self.eos_token}

    def save(self, dir: Path) -> None:
        super().save(dir)
        for name, text in self.extra.items():
            (Path(dir) / name).write_text(text)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model as a model directory brings it alone (T5's ``spiece.model``, no
    ``tokenizer.json``), read by ``sentencepiece``: the model's own end-of-sequence piece (T5's
    ``</s>``) ends a document, its padding piece (``<pad>``) pads. The embedding rows past the
    model's pieces (T5's 100 ``<extra_id_*>`` sentinels, the padding to 32,128) have no text."""

    kind = "sentencepiece"
    model_file = "spiece.model"

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self._sp.eos_id() < 0:
            raise DataError("the SentencePiece model has no end-of-sequence piece (eos_id); loom ends documents "
                            "with it")

    @classmethod
    def from_pretrained_dir(cls, dir: Path) -> SentencePieceTokenizer:
        return cls._checked(Path(dir) / cls.model_file)

    @classmethod
    def load(cls, path: Path) -> SentencePieceTokenizer:
        return cls._checked(Path(path))

    @classmethod
    def _checked(cls, path: Path, **flags: bool) -> Any:
        try:
            return cls(path.read_bytes(), **flags)
        except (RuntimeError, OSError) as e:  # not a SentencePiece model
            detail = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"{str(path)!r} is not a SentencePiece model ({detail})") from None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else None

    def special_tokens(self) -> dict[str, str]:
        """The pieces of its end, padding and unknown ids, as ``transformers``' tokenizer config names them."""
        ids = {"eos_token": self._sp.eos_id(), "pad_token": self._sp.pad_id(), "unk_token": self._sp.unk_id()}
        return {k: self._sp.id_to_piece(i) for k, i in ids.items() if i >= 0}

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size]))

    def _write_model(self, path: Path) -> None:
        path.write_bytes(self._proto)


class LlamaSentencePieceTokenizer(SentencePieceTokenizer):
    """A Llama's SentencePiece BPE model as the original Llama and Llama-2 releases (and many
    fine-tunes) bring it alone (``tokenizer.model``, no ``tokenizer.json``), with ``transformers``'
    ``LlamaTokenizer`` conventions: ``<s>`` starts every document and prompt (:attr:`start_ids`:
    ``add_bos_token``, true unless ``tokenizer_config.json`` says otherwise) and ``</s>`` ends a
    document (once: ``add_eos_token`` is kept for the export, a corpus document ends with ``</s>``
    either way); no padding piece. Unknown characters become bytes where the model
    was trained with byte fallback (sentencepiece reads that from the model)."""

    model_file = "tokenizer.model"

    def __init__(self, model_proto: bytes, add_bos: bool = True, add_eos: bool = False) -> None:
        super().__init__(model_proto)
        if add_bos and self._sp.bos_id() < 0:
            raise DataError("the SentencePiece model has no beginning-of-sequence piece (bos_id), which "
                            "add_bos_token asks for")
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)

    @classmethod
    def from_pretrained_dir(cls, dir: Path) -> LlamaSentencePieceTokenizer:
        """``dir/tokenizer.model``, with ``add_bos_token``/``add_eos_token`` from the directory's
        ``tokenizer_config.json`` when it names them (``transformers``' defaults, true and false, if not)."""
        config_path = Path(dir) / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (OSError, ValueError) as e:
            raise DataError(f"{str(config_path)!r} is not JSON ({e})") from None
        for key in ("add_bos_token", "add_eos_token"):
            if not isinstance(config.get(key, False), bool):
                raise DataError(f"{str(config_path)!r}: {key} must be true or false, got {config[key]!r}")
        flags = {"add_bos": config.get("add_bos_token", True), "add_eos": config.get("add_eos_token", False)}
        return cls._checked(Path(dir) / cls.model_file, **flags)

    @classmethod
    def load(cls, path: Path) -> LlamaSentencePieceTokenizer:
        meta = json.loads((Path(path).parent / META_FILE).read_text())
        return cls._checked(Path(path), add_bos=meta.get("add_bos_token", True),
                            add_eos=meta.get("add_eos_token", False))

    @property
    def bos_id(self) -> int:
        """The id of ``<s>``, which starts every document where ``add_bos`` is true."""
        return int(self._sp.bos_id())

    @property
    def start_ids(self) -> list[int]:
        return [self.bos_id] if self.add_bos else []

    def special_tokens(self) -> dict[str, str]:
        ids = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(), "unk_token": self._sp.unk_id()}
        return {k: self._sp.id_to_piece(i) for k, i in ids.items() if i >= 0}

    def _meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_file": self.model_file, "add_bos_token": self.add_bos,
                "add_eos_token": self.add_eos}


def pretrained_tokenizer(dir: str | Path) -> Tokenizer:
    """The tokenizer a Hugging Face model (or tokenizer) directory holds: its ``tokenizer.json`` (or
    GPT-2's ``vocab.json`` + ``merges.txt``, or a BERT's ``vocab.txt``), else its ``spiece.model``
    alone (T5's SentencePiece model) or its ``tokenizer.model`` alone (a Llama's).

    Raises:
        DataError: the directory holds none of them (one line).
    """
    dir = Path(dir).expanduser()
    has_fast = any((dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt"))
    if not has_fast and (dir / SentencePieceTokenizer.model_file).is_file():
        return SentencePieceTokenizer.from_pretrained_dir(dir)
    if not has_fast and (dir / LlamaSentencePieceTokenizer.model_file).is_file():
        return LlamaSentencePieceTokenizer.from_pretrained_dir(dir)
    return HFTokenizer.from_pretrained_dir(dir)


def _bert_wordpiece(dir: Path) -> Any:
    """A BERT directory's ``vocab.txt`` as the ``tokenizers`` WordPiece tokenizer ``transformers`` makes
    of it (``BertTokenizerFast``): BERT's normalizer (lowercasing as ``tokenizer_config.json``'s
    ``do_lower_case`` says, true by default), pre-tokenizer and ``##`` continuations, and
    ``[CLS] A [SEP] (B [SEP])`` around the text."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    config = dir / "tokenizer_config.json"
    options = json.loads(config.read_text()) if config.is_file() else {}
    special = {k: options.get(f"{k}_token", f"[{k.upper()}]") for k in ("unk", "cls", "sep")}
    hf = HFTok(models.WordPiece.from_file(str(dir / "vocab.txt"), unk_token=special["unk"]))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=options.get("tokenize_chinese_chars", True),
        strip_accents=options.get("strip_accents"), lowercase=options.get("do_lower_case", True))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    cls, sep = special["cls"], special["sep"]
    missing = [t for t in (cls, sep) if hf.token_to_id(t) is None]
    if missing:
        raise DataError(f"{str(dir / 'vocab.txt')!r} lacks {', '.join(missing)}; a BERT vocabulary holds its "
                        "[CLS] and [SEP] tokens")
    hf.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, hf.token_to_id(cls)), (sep, hf.token_to_id(sep))])
    return hf


def _eos_token(dir: Path, extra: dict[str, str], hf: Any) -> str:
    """The end-of-sequence token a model directory names (tokenizer_config.json, special_tokens_map.json,
    config.json's eos_token_id; BERT's, which has none, its separator [SEP]), else ``<|endoftext|>``."""
    eos = _named_token(extra, "eos_token")
    if eos:
        return eos
    config = dir / "config.json"
    if config.is_file():
        eos_id = json.loads(config.read_text()).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int) and hf.id_to_token(eos_id) is not None:
            return hf.id_to_token(eos_id)
    sep = _named_token(extra, "sep_token")
    if sep is None and hf.token_to_id(EOS_TOKEN) is None and hf.token_to_id(SEP) is not None:
        sep = SEP  # a BERT vocabulary whose files name no tokens (vocab.txt alone)
    return sep or EOS_TOKEN


def _bos_start(extra: dict[str, str], hf: Any) -> tuple[int, ...]:
    """``(bos,)`` where ``transformers`` starts every text of this tokenizer with its ``bos_token`` (as it
    does a Llama's or Mistral's): tokenizer_config.json's ``add_bos_token`` where it sets it, else
    where the tokenizer's post-processor puts that token first (an encoder's [CLS], not a ``bos_token``,
    is not a start: the masked-LM task frames its own pairs). Else ``()``."""
    config = json.loads(extra.get("tokenizer_config.json") or "{}")
    if config.get("add_bos_token") is False:
        return ()
    bos = _named_token(extra, "bos_token")
    found = hf.token_to_id(bos) if bos else None
    if config.get("add_bos_token") is True:
        if found is None:
            raise DataError(f"tokenizer_config.json sets add_bos_token but names no bos_token the vocabulary "
                            f"holds (got {bos!r})")
        return (int(found),)
    if found is None:
        return ()
    plain, framed = (hf.encode("a", add_special_tokens=flag).ids for flag in (False, True))
    return (int(found),) if framed[:1] == [found] and framed[1:1 + len(plain)] == plain else ()


def _named_token(extra: dict[str, str], key: str) -> str | None:
    """The token tokenizer_config.json or special_tokens_map.json names as ``key`` (e.g. ``eos_token``)."""
    for name in HFTokenizer.EXTRA_FILES:
        token = json.loads(extra[name]).get(key) if name in extra else None
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token:
            return token
    return None


def _import_zh() -> tuple[ModuleType, ModuleType]:
    """Import and return ``(jieba, sentencepiece)``, quietly.

    Raises:
        DataError: either package is not installed.
    """
    try:
        import jieba
        import sentencepiece
    except ImportError:
        raise DataError(_ZH_MISSING) from None
    jieba.setLogLevel(logging.WARNING)
    return jieba, sentencepiece


def _segment(text: str) -> str:
    """Apply the PanGu-alpha mapping: placeholders for whitespace, jieba words."""
    jieba, _ = _import_zh()
    mapped = text.replace(" ", _SPACE).replace("\n", _NEWLINE)
    return " ".join(jieba.cut(mapped))


def _unsegment(text: str) -> str:
    """Invert :func:`_segment` on SentencePiece-decoded text."""
    return text.replace(" ", "").replace(_SPACE, " ").replace(_NEWLINE, "\n")


def _sentences(texts: Iterator[str]) -> Iterator[str]:
    """Segment texts and cut them into lines (after each newline placeholder).

    SentencePiece trains on sentences and skips very long ones, so documents
    are split where they had newlines.
    """
    for text in texts:
        for line in _segment(text).replace(_NEWLINE, _NEWLINE + "\n").split("\n"):
            if line.strip():
                yield line


class JiebaSpTokenizer(Tokenizer):
    """jieba word segmentation followed by SentencePiece BPE (PanGu-alpha)."""

    kind = "jieba-sp"
    model_file = "sp.model"

    def __init__(self, model_proto: bytes) -> None:
        _, spm = _import_zh()
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> JiebaSpTokenizer:
        """Train a SentencePiece BPE with about ``vocab_size`` pieces on ``texts``.

        Raises:
            DataError: SentencePiece rejected the settings (e.g. ``vocab_size``
                smaller than the number of distinct characters it must keep).
        """
        _, spm = _import_zh()
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sentences(texts),
                model_writer=model,
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=0.9995,
                user_defined_symbols=[EOS_TOKEN],
                hard_vocab_limit=False,
                byte_fallback=True,  # rare characters become bytes, never <unk>
                normalization_rule_name="identity",  # keep text as is
                remove_extra_whitespaces=False,
                max_sentence_length=1 << 16,
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1]
            message = f"SentencePiece training failed (vocab_size={vocab_size}): {detail}"
            raise DataError(message) from None
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: Path) -> JiebaSpTokenizer:
        """Load the model file written by :meth:`save`."""
        return cls(Path(path).read_bytes())

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self._sp.piece_to_id(EOS_TOKEN))

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(_segment(text)))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode([_segment(t) for t in texts])]

    def decode(self, ids: Sequence[int]) -> str:
        return _unsegment(self._sp.decode([int(i) for i in ids]))

    def pieces(self, text: str) -> list[str]:
        """Return the SentencePiece pieces of ``text`` (for inspection)."""
        return list(self._sp.encode(_segment(text), out_type=str))

    def _write_model(self, path: Path) -> None:
        path.write_bytes(self._proto)


PAD, UNK, CLS, SEP, MASK, NL = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[NL]"
#: WordPiece's special tokens, in id order.
WORDPIECE_SPECIALS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK, EOS_TOKEN, NL)


class WordPieceTokenizer(_TokenizersLibraryTokenizer):
    """BERT's WordPiece backed by a Hugging Face ``tokenizers.Tokenizer``; each line ends with [NL]."""

    kind = "wordpiece"

    def __init__(self, hf: Any) -> None:
        super().__init__(hf)
        self.special_ids = {t: int(hf.token_to_id(t)) for t in WORDPIECE_SPECIALS}

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> WordPieceTokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        hf = HFTokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(WORDPIECE_SPECIALS),
                                            show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS_TOKEN]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each non-blank line's pieces followed by [NL] (blank lines leave nothing)."""
        lines = [[ln for ln in text.split("\n") if ln.strip()] for text in texts]
        flat = self._encode_lines([ln for doc in lines for ln in doc])
        out, i, nl = [], 0, self.special_ids[NL]
        for doc in lines:
            ids: list[int] = []
            for e in flat[i : i + len(doc)]:
                ids.extend(e.ids)
                ids.append(nl)
            i += len(doc)
            out.append(ids)
        return out


def _check_kind(kind: str) -> str:
    """Return ``kind`` if it is a concrete tokenizer kind, else raise DataError."""
    if kind not in KINDS:
        choices = ", ".join(("auto",) + KINDS)
        raise DataError(f"unknown tokenizer {kind!r}; valid choices: {choices}")
    return kind


def _tokenizer_class(kind: str) -> type[Tokenizer]:
    """Return the class implementing tokenizer ``kind``."""
    return {"bpe": BpeTokenizer, "jieba-sp": JiebaSpTokenizer, "wordpiece": WordPieceTokenizer}[_check_kind(kind)]


def _is_cjk(ch: str) -> bool:
    """Whether ``ch`` is a CJK ideograph."""
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def cjk_fraction(text: str) -> float:
    """Share of the non-whitespace characters of ``text`` that are CJK ideographs."""
    chars = [ch for ch in text if not ch.isspace()]
    if not chars:
        return 0.0
    return sum(map(_is_cjk, chars)) / len(chars)


def resolve_kind(kind: str, sample_text: str) -> str:
    """Turn a tokenizer setting into a concrete kind.

    ``"auto"`` becomes ``"jieba-sp"`` when more than 30% of the non-space
    characters of ``sample_text`` are CJK ideographs, else ``"bpe"``.

    Raises:
        DataError: ``kind`` is not ``"auto"``, ``"bpe"`` or ``"jieba-sp"``.
    """
    if kind == "auto":
        return "jieba-sp" if cjk_fraction(sample_text) > CJK_THRESHOLD else "bpe"
    return _check_kind(kind)


def _training_texts(docs_iter_factory: DocsFactory, max_chars: int) -> Iterator[str]:
    """Yield an evenly strided subset of the documents of at most ``max_chars``.

    A first pass measures the corpus; the second keeps every ``stride``-th
    document (truncating the last one) so the sample spans the whole corpus
    rather than its first files.
    """
    total = sum(len(doc) for doc in docs_iter_factory())
    stride = max(1, math.ceil(total / max_chars))
    budget = max_chars
    for i, doc in enumerate(docs_iter_factory()):
        if budget <= 0:
            return
        if i % stride == 0:
            yield doc[:budget]
            budget -= len(doc)


def train_tokenizer(
    kind: str, docs_iter_factory: DocsFactory, vocab_size: int, max_chars: int = TRAIN_MAX_CHARS
) -> Tokenizer:
    """Train a tokenizer of ``kind`` with (about) ``vocab_size`` tokens.

    Args:
        kind: ``"bpe"`` or ``"jieba-sp"``.
        docs_iter_factory: returns a fresh iterator over the documents each
            time it is called (it is called twice).
        vocab_size: the requested vocabulary size; small corpora may give
            fewer tokens (see :attr:`Tokenizer.vocab_size`).
        max_chars: to keep training fast, only an evenly strided subset of
            the documents totalling at most this many characters is used.

    Raises:
        DataError: unknown kind, too small ``vocab_size``, or missing
            optional dependencies.
    """
    cls = _tokenizer_class(kind)
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), "
            f"got {vocab_size}"
        )
    return cls.train(_training_texts(docs_iter_factory, max_chars), vocab_size)


def load_tokenizer(dir: Path) -> Tokenizer:
    """Load a tokenizer saved with :meth:`Tokenizer.save` from ``dir``.

    Raises:
        DataError: ``dir`` holds no tokenizer or one of an unknown kind.
    """
    meta_path = Path(dir) / META_FILE
    if not meta_path.is_file():
        raise DataError(f"no tokenizer in {str(dir)!r} (missing {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] in (HFTokenizer.kind, SentencePieceTokenizer.kind):  # loaded, never trained
        loaded: type[HFTokenizer | SentencePieceTokenizer] = HFTokenizer
        if meta["kind"] == SentencePieceTokenizer.kind:  # T5's spiece.model or a Llama's tokenizer.model
            llama = meta["model_file"] == LlamaSentencePieceTokenizer.model_file
            loaded = LlamaSentencePieceTokenizer if llama else SentencePieceTokenizer
        return loaded.load(Path(dir) / meta["model_file"])
    cls = _tokenizer_class(meta["kind"])
    return cls.load(Path(dir) / meta["model_file"])
