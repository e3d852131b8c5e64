"""Corpora as raw bytes, split into training and validation documents.

A corpus is loaded from a single text file, a directory, a glob pattern, or (by default) the
complete works of Shakespeare. Text stays as bytes: tokenizers operate on bytes, so nothing
here decodes it.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from triform.errors import DataError

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    """One named unit of text, such as a play or a file."""

    name: str
    text: bytes


@dataclass(frozen=True)
class Corpus:
    """A named corpus with its training and validation documents."""

    name: str
    train: tuple[Document, ...]
    val: tuple[Document, ...]

    def train_bytes(self) -> int:
        """Return the total size in bytes of the training documents."""
        return sum(len(doc.text) for doc in self.train)

    def val_bytes(self) -> int:
        """Return the total size in bytes of the validation documents."""
        return sum(len(doc.text) for doc in self.val)


def resolve_cache_dir(cache_dir: Path | None) -> Path:
    """Return the directory for downloaded data: `cache_dir` if given, else the `TRIFORM_CACHE`
    environment variable if set and non-empty, else `~/.cache/triform`; `~` is expanded in every
    case and the directory is not created.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TRIFORM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "triform"


def load_corpus(
    source: str | None = None, *, val_fraction: float = 0.1, cache_dir: Path | None = None
) -> Corpus:
    """Load a corpus and split it into training and validation documents. `source=None` gives the
    default Shakespeare corpus, whose validation set is a fixed group of held-out plays (so
    `val_fraction` does not change it) and which is fetched into `cache_dir` on first use. A single
    file is split by bytes at `int(len * (1 - val_fraction))`, matching nanoGPT's split. A directory
    (all regular files below it, hidden ones skipped) or a glob pattern (a source containing `*`,
    `?` or `[` that is not an existing path) with two or more files holds out whole files: in sorted
    order, every k-th file starting at index k-1, where k = max(2, round(1 / val_fraction)), or the
    last file if that selects none; a single matching file is split by bytes. Raises DataError for a
    bad `val_fraction`, a missing path, a directory or pattern matching no files, an unreadable
    file, an empty corpus, or one too small to give both splits some bytes.
    """
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 < val_fraction < 1
    ):
        raise DataError(
            f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}."
        )
    if source is None:
        from triform.data.shakespeare import shakespeare_corpus

        return shakespeare_corpus(cache_dir)

    if not source.strip():
        raise DataError("Corpus path is empty; pass a file, directory or glob pattern.")
    path = Path(source).expanduser()
    try:
        is_file, is_dir, exists = path.is_file(), path.is_dir(), path.exists()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DataError(f"Could not access corpus path '{source}': {reason}.") from None
    if is_file:
        return _split_bytes(path.name, _read(path, source), val_fraction, source)
    if is_dir:
        files = _directory_files(path)
        if not files:
            raise DataError(
                f"Directory '{source}' contains no (non-hidden) files to use as a corpus."
            )
        name = path.resolve().name or source
        named = [(file.relative_to(path).as_posix(), file) for file in files]
    elif exists:
        raise DataError(f"Corpus path '{source}' is neither a regular file nor a directory.")
    elif _GLOB_CHARS.intersection(source):
        files = _glob_files(str(path))
        if not files:
            raise DataError(f"Pattern '{source}' matches no files.")
        name = source
        named = [(str(file), file) for file in files]
    else:
        raise DataError(f"Corpus path '{source}' does not exist.")

    docs = [Document(doc_name, _read(file, str(file))) for doc_name, file in named]
    if len(docs) == 1:
        return _split_bytes(name, docs[0].text, val_fraction, source)
    return _split_files(name, docs, val_fraction, source)


def _directory_files(root: Path) -> list[Path]:
    """Return the regular files below `root`, sorted by relative path, skipping hidden files and
    anything inside hidden directories.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            file = Path(dirpath) / filename
            if not filename.startswith(".") and file.is_file():
                found.append(file)
    return sorted(found, key=lambda file: file.relative_to(root).as_posix())


def _glob_files(pattern: str) -> list[Path]:
    """Return the regular files matching `pattern` (with `**` recursive), sorted by path."""
    return sorted(
        Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file()
    )


def _read(path: Path, shown: str) -> bytes:
    """Read a file's bytes, turning any OS error into a DataError naming the path."""
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DataError(f"Could not read corpus file '{shown}': {reason}.") from None


def _split_bytes(name: str, text: bytes, val_fraction: float, source: str) -> Corpus:
    """Split one text at byte index `int(len * (1 - val_fraction))`: train first, val after."""
    _check_nonempty(len(text), source)
    cut = int(len(text) * (1 - val_fraction))
    corpus = Corpus(name, (Document(name, text[:cut]),), (Document(name, text[cut:]),))
    _check_split(corpus, source)
    return corpus


def _split_files(name: str, docs: list[Document], val_fraction: float, source: str) -> Corpus:
    """Hold out every k-th of the sorted documents for validation, as described in `load_corpus`."""
    _check_nonempty(sum(len(doc.text) for doc in docs), source)
    k = max(2, round(1 / val_fraction))
    held = set(range(k - 1, len(docs), k)) or {len(docs) - 1}
    train = tuple(doc for i, doc in enumerate(docs) if i not in held)
    val = tuple(doc for i, doc in enumerate(docs) if i in held)
    corpus = Corpus(name, train, val)
    _check_split(corpus, source)
    return corpus


def _check_nonempty(total: int, source: str) -> None:
    """Raise DataError if the corpus at `source` has no bytes at all."""
    if total == 0:
        raise DataError(f"Corpus '{source}' is empty (0 bytes).")


def _check_split(corpus: Corpus, source: str) -> None:
    """Raise DataError if either split of the corpus at `source` came out with no bytes."""
    if corpus.train_bytes() == 0 or corpus.val_bytes() == 0:
        raise DataError(
            f"Corpus '{source}' is too small to split into non-empty training and validation parts."
        )
