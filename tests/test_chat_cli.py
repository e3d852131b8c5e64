"""`triform chat` on a decoder checkpoint: replies on stdout equal the library's ChatSession, --stats
shows the second turn reusing the cache, and bytes that are not UTF-8 on stdin reach the model
unchanged instead of raising."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from triform.checkpoint import load_checkpoint
from triform.cli.main import main
from triform.inference.chat import ChatSession
from triform.inference.sampling import SamplingParams

FLAGS = ["--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]
STATS = re.compile(r"\[prompt (\d+) tokens: (\d+) from cache, (\d+) computed; (\d+) generated\]")


def _replies(run: Path, turns: list[str]) -> tuple[list[str], ChatSession]:
    lm, tok, _ = load_checkpoint(run)
    session = ChatSession(lm, tok, SamplingParams(temperature=0.0, max_new_tokens=8))
    return [session.reply(t) for t in turns], session


def test_chat_cli_replies_and_reuses_the_cache(
    trained_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    turns = ["KING:", "the lord"]
    want, session = _replies(trained_run, turns)
    assert all(w.strip() for w in want)  # the trained model says something each turn
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(t + "\n" for t in turns)))
    capsys.readouterr()
    assert main(["chat", str(trained_run), "--stats", *FLAGS]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(w + "\n" for w in want)
    stats = [tuple(map(int, m.groups())) for m in STATS.finditer(err)]
    assert len(stats) == 2
    (p1, reused1, new1, _), (p2, reused2, new2, gen2) = stats
    assert reused1 == 0 and new1 == p1
    assert reused2 > 0 and reused2 + new2 == p2 and new2 < p2 / 2  # the first turn stayed in the cache
    last = session.last
    assert last is not None and (p2, reused2, new2, gen2) == (
        last.prompt_tokens, last.reused_tokens, last.new_tokens, last.generated_tokens,
    )


def test_chat_cli_takes_bytes_that_are_not_utf8(
    trained_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = b"KING \xff\xfe:"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw + b"\n"), encoding="utf-8"))
    capsys.readouterr()
    assert main(["chat", str(trained_run), *FLAGS]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    (want,), session = _replies(trained_run, [raw.decode("utf-8", errors="surrogateescape")])
    assert out == want + "\n"
    assert raw in bytes(t for t in session.ids if t < 256)  # the byte tokenizer saw exactly what was typed
