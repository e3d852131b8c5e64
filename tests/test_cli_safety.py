"""Nothing a user has is lost, and every option is checked: runs refuse folders they did not write
and ask for --resume or --overwrite; readers name the file and line; parser errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_error

from triform.cli.main import main
from triform.data.readers import read_conll, read_labelled, read_prompts, read_squad, read_texts
from triform.errors import DataError


def _tiny_train(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "gpt2-tiny", "--data", str(corpus), "--out", str(out), "--max-steps", "3",
            "--batch-size", "2", "--context", "16", "--eval-tokens", "64", "--final-eval-tokens", "64",
            "--sample-tokens", "0", "--progress", "false", *extra]


def test_train_never_replaces_a_run_or_a_users_files(tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_tiny_train(out, corpus_file)) == 0
    capsys.readouterr()
    weights = (out / "checkpoint" / "model.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    assert "--resume" in cli_error(capsys, _tiny_train(out, corpus_file))  # a finished run is not silently replaced
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == weights
    assert (out / "metrics.jsonl").read_text() == metrics  # ... and its metrics are not appended to
    (out / "notes.txt").write_text("mine")
    assert main(_tiny_train(out, corpus_file, "--overwrite", "--seed", "2")) == 0
    capsys.readouterr()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "final_eval" for r in lines) == 1  # a fresh run, not an appended one
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces the run's files only
    users = tmp_path / "mine"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    assert "did not write" in cli_error(capsys, _tiny_train(users, corpus_file))
    assert (users / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in users.iterdir()) == ["thesis.tex"]
    assert "did not write" in cli_error(capsys, ["pretrain", "--data", str(corpus_file), "--out", str(users), "--max-steps", "1"])
    (tmp_path / "vectors.npy").write_bytes(b"precious")
    assert "already exists" in cli_error(capsys, ["embed", str(users), str(users / "thesis.tex"), str(tmp_path / "vectors.npy")])
    assert (tmp_path / "vectors.npy").read_bytes() == b"precious"


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-1"], "lr must be positive"),
    (["train", "--batch-size", "0"], "batch_size must be a positive integer"),
    (["train", "--batch-size", "abc"], "--batch-size expects an integer, got 'abc'"),
    (["train", "--precision", "fp8"], "precision"),
    (["train", "--grad-accum", "3", "--batch-size", "16"], "not a multiple of grad_accum"),
    (["pretrain", "--max-steps", "-5"], "max_steps must be a positive integer"),
    (["pretrain", "--objective", "span", "--static-masks"], "--static-masks applies to the mlm"),
    (["pretrain", "--noise-density", "0.2"], "--noise-density applies to the span"),
    (["finetune", "--train", "x.jsonl", "--max-steps", "-1"], "max_steps must be a positive integer"),
    (["finetune", "--train", "x.jsonl", "--epochs", "0"], "epochs must be a positive integer"),
    (["eval", "ck", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["eval", "ck", "--tokens", "-3"], "--tokens must be a positive integer"),
    (["search", "ck", "q", "--index", "i", "--top-k", "0"], "--top-k must be a positive integer"),
    (["fill", "ck", "a[MASK]", "--generate", "-1"], "--generate must be an integer >= 0"),
    (["generate", "ck", "--prompts", "p.txt", "--kv-cache-gib", "0"], "--kv-cache-gib must be a positive number"),
    (["generate", "ck", "hi", "--weights", "int4"], "--weights must be one of"),
    (["generate", "ck", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["convert", "a", "b", "--to", "onnx"], "--to must be triform, hf or auto"),
    (["finetune", "--task", "translate", "--train", "x"], "--task must be classify, tag or qa"),
    (["nosuch"], "invalid choice"),
])
def test_every_bad_option_is_one_sentence(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert message in cli_error(capsys, argv)


def test_readers_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"text": "fine", "label": "x"}\n{"text": 42, "label": "y"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: 'text' must be text, got a number"):
        read_labelled(bad)
    bad.write_text('{"text": "fine", "label": ["x"]}\n')
    with pytest.raises(DataError, match=r"a.jsonl:1: 'label' must be text or a whole number"):
        read_labelled(bad)
    bad.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "\xff\xfe", "label": 2}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2 is not UTF-8"):
        read_labelled(bad)
    assert read_labelled(_write(tmp_path / "n.jsonl", '{"text": "t", "label": 3}\n')) == [("t", "3")]
    csv_file = _write(tmp_path / "c.csv", "text,label\nhello,1\n")
    assert read_labelled(csv_file) == [("hello", "1")]
    conll = tmp_path / "t.conll"
    conll.write_bytes(b"The O\nking \xc3\x28 NOUN\n")
    with pytest.raises(DataError, match=r"t.conll:2 is not UTF-8"):
        read_conll(conll)
    squad = _write(tmp_path / "s.json", json.dumps({"data": [{"paragraphs": [{"context": "abc", "qas": [
        {"id": "q1", "question": "?", "answers": [{"text": "b", "answer_start": "1"}]}]}]}]}))
    with pytest.raises(DataError, match=r"question 'q1': 'answer_start' must be a whole number, got str"):
        read_squad(squad)
    squad.write_text('{"data": [\n  {"paragraphs": 1,}\n]}')
    with pytest.raises(DataError, match=r"s.json:2 is not valid JSON"):
        read_squad(squad)
    texts = _write(tmp_path / "t.jsonl", '{"text": "a"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: 'text' must be text, got null"):
        read_texts(texts)
    with pytest.raises(DataError, match="is a folder"):
        read_prompts(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"caf\xe9 latin-1\r\nsecond\\nline\n")
    assert read_prompts(prompts) == [b"caf\xe9 latin-1", b"second\nline"]  # bytes pass through untouched


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
