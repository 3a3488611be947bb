"""Finding corpus files and reading documents out of them.

A corpus is a list of files. The default corpus is the Python standard
library's own source code (about 31 MB of real Python, needing no download).
A user corpus is a single file or a folder searched recursively for
``.txt``, ``.jsonl``, ``.md`` and ``.py`` files.

Every ``.jsonl`` line is one document (its ``jsonl_field`` key); every other
file is one document (its whole text), read in pieces so that memory stays
bounded whatever its size: a file longer than :data:`MAX_DOCUMENT_CHARS` is
cut into documents of at most that many characters, at line ends where it has
them. Bytes that are not UTF-8 become U+FFFD, one per byte, and are counted.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".md", ".py")
MAX_DOCUMENT_CHARS = 1 << 20  # longer text files are several documents (memory, not meaning)
_READ_CHARS = 1 << 18
_UNDECODED = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8
_EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages"})


class DataError(ValueError):
    """A problem with the user's data or data settings, explained in one line."""


def _accepted() -> str:
    """Describe what corpus paths are accepted, for error messages."""
    suffixes = ", ".join(SUPPORTED_SUFFIXES)
    return f"expected a {suffixes} file or a folder containing such files"


def stdlib_files() -> list[Path]:
    """Return all ``*.py`` files of the Python standard library, sorted.

    Third-party packages (anything under ``site-packages`` or
    ``dist-packages``) are excluded so the corpus does not depend on what
    happens to be installed.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _EXCLUDED_PARTS]  # don't descend
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(p for p in files if _EXCLUDED_PARTS.isdisjoint(p.parts) and p.is_file())


def _folder_files(folder: Path) -> list[Path]:
    """Return the supported files below ``folder``, skipping hidden entries."""
    found = []
    for p in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in p.relative_to(folder).parts)
        if not hidden and p.suffix in SUPPORTED_SUFFIXES and p.is_file():
            found.append(p)
    return sorted(found)


def corpus_files(path: str | None) -> list[Path]:
    """Return the files making up the corpus at ``path``.

    ``None`` means the Python standard library (see :func:`stdlib_files`).
    A file must have a supported suffix; a folder is searched recursively
    for supported files (hidden files and folders are skipped).

    Raises:
        DataError: the path does not exist, has an unsupported suffix, or
            is a folder without any supported file.
    """
    if path is None:
        return stdlib_files()
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"corpus path {path!r} does not exist ({_accepted()})")
    if p.is_dir():
        files = _folder_files(p)
        if not files:
            raise DataError(f"corpus folder {path!r} has no usable files ({_accepted()})")
        return files
    if p.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"corpus file {path!r} has an unsupported suffix ({_accepted()})")
    return [p]


def _decoded(text: str, file: Path, replaced: dict[str, int] | None) -> str:
    """``text`` read with ``surrogateescape``, each undecodable byte turned into U+FFFD and counted."""
    n = len(_UNDECODED.findall(text))
    if not n:
        return text
    if replaced is not None:
        replaced[str(file)] = replaced.get(str(file), 0) + n
    return _UNDECODED.sub("\ufffd", text)


def _jsonl_documents(file: Path, field: str, replaced: dict[str, int] | None = None) -> Iterator[str]:
    """Yield the ``field`` text of every JSON object line of ``file``."""
    with file.open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            line = _decoded(line, file, replaced)
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{where}: JSON line has no field {field!r} (set jsonl_field)")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {field!r} is not a string")
            yield text


def _text_documents(file: Path, replaced: dict[str, int] | None = None) -> Iterator[str]:
    """The text of ``file`` as one document, or, past :data:`MAX_DOCUMENT_CHARS`, as several cut at
    line ends (mid-line only where a line is longer than that); never more than about twice that
    much of it in memory."""
    pending = ""
    with file.open(encoding="utf-8", errors="surrogateescape") as f:  # universal newlines, as read_text
        while block := f.read(_READ_CHARS):
            pending += _decoded(block, file, replaced)
            while len(pending) > MAX_DOCUMENT_CHARS:
                cut = pending.rfind("\n", 0, MAX_DOCUMENT_CHARS) + 1 or MAX_DOCUMENT_CHARS
                yield pending[:cut]
                pending = pending[cut:]
    if pending:
        yield pending


def iter_documents(files: Iterable[Path], jsonl_field: str = "text",
                   replaced: dict[str, int] | None = None) -> Iterator[str]:
    """Yield the text of every non-empty document in ``files``, in order.

    ``.jsonl`` files give one document per line (the ``jsonl_field`` value);
    any other file is one document (several when it is longer than
    :data:`MAX_DOCUMENT_CHARS`), read as UTF-8 with undecodable bytes replaced
    by U+FFFD; ``replaced`` (when given) counts them per file.

    Raises:
        DataError: a ``.jsonl`` line is not JSON or lacks ``jsonl_field``.
    """
    for file in files:
        if file.suffix == ".jsonl":
            docs: Iterable[str] = _jsonl_documents(file, jsonl_field, replaced)
        else:
            docs = _text_documents(file, replaced)
        yield from (doc for doc in docs if doc)
