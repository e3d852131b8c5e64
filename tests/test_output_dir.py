"""`claim_output_dir`: which folders a command may write into, and `write_output_dir`'s swap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from triform.errors import ConfigError
from triform.output_dir import MARKER, check_output_dir, claim_output_dir, is_own_output, write_output_dir


def _marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def test_new_empty_and_own_folders_are_used(tmp_path: Path) -> None:
    new = claim_output_dir(tmp_path / "a" / "b", command="convert")
    assert new == tmp_path / "a" / "b" and new.is_dir() and _marker(new)["command"] == "convert"
    (new / "model.safetensors").write_bytes(b"earlier output")
    assert claim_output_dir(str(new), command="convert") == new  # its own output, recognised by the marker
    (tmp_path / "empty").mkdir()
    assert _marker(claim_output_dir(tmp_path / "empty", command="train"))["command"] == "train"


@pytest.mark.parametrize("layout", ["config.json", "checkpoint/config.json"])
def test_checkpoints_written_before_markers_are_own_output(tmp_path: Path, layout: str) -> None:
    config = tmp_path / "run" / layout
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"format": "triform", "model": {}}))
    (tmp_path / "run" / "loss.png").write_bytes(b"png")
    assert is_own_output(tmp_path / "run", "train")
    assert claim_output_dir(tmp_path / "run", command="train") == tmp_path / "run"
    assert (tmp_path / "run" / "loss.png").read_bytes() == b"png"  # claiming deletes nothing


def test_other_content_is_refused_unless_overwrite(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))  # not a triform checkpoint
    other = claim_output_dir(tmp_path / "other", command="train")  # another command's output
    afile = tmp_path / "file.txt"
    afile.write_text("a file")
    for path in (mine, hf, other):
        refusal = rf"^{re.escape(str(path))} already holds files .*choose another folder or pass --overwrite"
        with pytest.raises(ConfigError, match=refusal):
            claim_output_dir(path, command="convert")
        with pytest.raises(ConfigError):
            check_output_dir(path, command="convert")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(afile))} is a file.*--overwrite"):
        claim_output_dir(afile, command="convert")
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / MARKER).exists() and afile.read_text() == "a file"
    assert claim_output_dir(mine, command="convert", overwrite=True) == mine and _marker(mine)["command"] == "convert"
    assert (mine / "notes.txt").read_text() == "keep me"  # handed over, not emptied: replacing is the command's call
    assert claim_output_dir(afile, command="convert", overwrite=True) == afile and afile.read_text() == "a file"
    (other / MARKER).write_text("not json")
    with pytest.raises(ConfigError):
        claim_output_dir(other, command="train")


def test_check_creates_nothing(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new", command="convert")
    assert not (tmp_path / "new").exists()


def test_write_output_dir_replaces_the_folder_or_leaves_it(tmp_path: Path) -> None:
    out = claim_output_dir(tmp_path / "out", command="convert")
    (out / "stale.bin").write_bytes(b"old shard")

    def write(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"new")

    assert write_output_dir(out, write, command="convert") == out
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "model.safetensors"]

    def fail(folder: Path) -> None:
        (folder / "half").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_output_dir(out, fail, command="convert")
    assert (out / "model.safetensors").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
