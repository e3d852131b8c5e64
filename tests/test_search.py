"""Semantic search and the embed/search commands with the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, minilm_folder

from triform.cli.main import main
from triform.data.corpus import resolve_cache_dir
from triform.data.shakespeare import CACHE_SUBDIR
from triform.inference.embed import SentenceEncoder
from triform.data.passages import split_passages
from triform.inference.search import PassageIndex

QUERY = "Is it better to go on living or to die and end one's suffering?"


def _minilm() -> str:
    return str(minilm_folder())


@pytest.fixture(scope="module")
def hamlet() -> Path:
    """Hamlet from the local Shakespeare cache that `make test`'s set-up fills; a test never downloads."""
    path = resolve_cache_dir(None) / CACHE_SUBDIR / "hamlet.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: fetch Shakespeare's works once with `make test` (or "
                    "`python -c 'from triform.data.shakespeare import fetch_shakespeare; fetch_shakespeare()'`).")
    return path


def test_split_passages() -> None:
    text = "A short one.\n\n" + "\n".join(f"line {i} of a long speech" for i in range(60)) + "\n\nThe end of it all, at last."
    passages = split_passages(text, max_chars=200, min_chars=10)
    assert all(len(p) <= 200 for p in passages)
    joined = "\n".join(passages)
    assert all(f"line {i} of a long speech" in joined for i in range(60)) and "The end of it all" in joined
    assert split_passages("tiny\n\n", min_chars=10) == []


def test_search_finds_the_soliloquy_first(hamlet: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    encoder = SentenceEncoder.from_folder(_minilm())
    index = PassageIndex.build(encoder, [("hamlet", hamlet.read_text(encoding="utf-8"))])
    assert 200 <= len(index.passages) <= 1000  # a few hundred passages
    hits = index.search(encoder, QUERY, k=3)
    assert "To be, or not to be" in hits[0].text
    assert hits[0].score > hits[1].score
    index.save(tmp_path / "idx")
    again = PassageIndex.load(tmp_path / "idx")
    assert again.search(encoder, QUERY, k=1)[0].text == hits[0].text
    # the command line: build, save, and answer; then answer from the saved index alone
    assert main(["search", _minilm(), QUERY, "--corpus", str(hamlet), "--index", str(tmp_path / "cli"), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#1") and "To be, or not to be" in out.split("#2")[0]
    assert main(["search", _minilm(), QUERY, "--index", str(tmp_path / "cli"), "--top-k", "1"]) == 0
    assert "To be, or not to be" in capsys.readouterr().out


def test_embed_command_writes_npy_and_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["The rest is silence.", "Frailty, thy name is woman!", "Something is rotten in the state of Denmark."]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    assert main(["embed", _minilm(), str(tmp_path / "in.txt"), str(tmp_path / "v.npy")]) == 0
    assert main(["embed", _minilm(), str(tmp_path / "in.jsonl"), str(tmp_path / "v.jsonl")]) == 0
    capsys.readouterr()
    want = SentenceEncoder.from_folder(_minilm()).embed(texts)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "v.npy")), want)
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in rows]), want)



def test_search_and_embed_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "give --corpus" in cli_error(capsys, ["search", _minilm(), "x"])
    assert "not a readable search index" in cli_error(capsys, ["search", _minilm(), "x", "--index", str(tmp_path)])
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "holds no texts" in cli_error(capsys, ["embed", _minilm(), str(tmp_path / "empty.txt"), str(tmp_path / "o.npy")])
    assert "must end in .npy or .jsonl" in cli_error(capsys, ["embed", _minilm(), "x", "o.csv"])
    assert "is not a model folder" in cli_error(capsys, ["embed", str(tmp_path / "nope"), "x", "o.npy"])
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    assert "\"text\" field" in cli_error(capsys, ["embed", _minilm(), str(tmp_path / "bad.jsonl"), str(tmp_path / "o.npy")])
