"""`triform pretrain` (mlm, mlm+nsp, mlm+sop, distill) and `triform fill` on a synthetic corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli_error, minilm_folder

from triform.cli.main import main
from triform.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("mlm")
    args = ["pretrain", "--data", str(corpus_file), "--out", str(out), "--context", "32", "--batch-size", "64",
            "--max-steps", "700", "--lr", "2e-3", "--warmup-steps", "50", "--seed", "1"]
    assert main(args) == 0
    return out


def test_pretrain_mlm_learns(mlm_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tok, meta = load_checkpoint(mlm_run, kind="encoder")
    assert meta["objective"] == "mlm" and model.pair is None
    # fill: the synthetic grammar says "The king will speak of ..." after "KING:\n"
    assert main(["fill", str(mlm_run), "KING:\nThe k[MASK]ng will speak of", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[MASK] 1") and "b'i'" in out.splitlines()[0].split("  ")[0]
    assert out.splitlines()[-1] == "The king will speak of"  # the filled text, top-1 in the gap
    assert main(["fill", str(mlm_run), "KING:\n", "--generate", "10", "--steps", "3"]) == 0
    rounds = capsys.readouterr().out.strip().splitlines()
    assert [r.split(":")[0] for r in rounds if r.startswith("round")] == ["round 1", "round 2", "round 3"]


@pytest.mark.parametrize("objective, preset", [("mlm+nsp", "bert-base-tiny"), ("mlm+sop", "albert-base-tiny")])
def test_pretrain_pair_objectives(objective: str, preset: str, tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pretrain", "--objective", objective, "--preset", preset, "--data", str(corpus_file), "--out", str(tmp_path),
            "--context", "48", "--batch-size", "8", "--max-steps", "5"]
    assert main(args) == 0
    assert "held-out pair accuracy" in capsys.readouterr().out
    model, _, meta = load_checkpoint(tmp_path, kind="encoder")
    assert model.pair is not None and meta["objective"] == objective
    assert model.cfg.share_layers == (preset == "albert-base-tiny")


def test_distill_student_has_half_the_layers(mlm_run: Path, tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pretrain", "--objective", "distill", "--teacher", str(mlm_run), "--data", str(corpus_file), "--out", str(tmp_path),
            "--context", "32", "--batch-size", "8", "--max-steps", "5"]
    assert main(args) == 0
    capsys.readouterr()
    student, _, _ = load_checkpoint(tmp_path, kind="encoder")
    teacher, _, _ = load_checkpoint(mlm_run, kind="encoder")
    assert student.cfg.stack.n_layers == teacher.cfg.stack.n_layers // 2 and student.cfg.family == "distilbert"


def test_encoder_commands_bad_input(mlm_run: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "objective must be" in cli_error(capsys, ["pretrain", "--objective", "gpt"])
    assert "needs --teacher" in cli_error(capsys, ["pretrain", "--objective", "distill"])
    assert "no [MASK]" in cli_error(capsys, ["fill", str(mlm_run), "no masks here"])
    assert "holds a decoder" in cli_error(capsys, ["fill", str(trained_run), "a[MASK]"])
    assert "at most" in cli_error(capsys, ["fill", str(mlm_run), "x" * 200 + "[MASK]"])


def _labelled(tmp_path: Path) -> tuple[Path, Path]:
    """A separable task: sentences about kings vs about ladies (the synthetic grammar's subjects)."""
    import json
    import random

    rng = random.Random(0)

    def row() -> dict[str, str]:
        who = rng.choice(["king", "queen", "lord", "lady"])
        label = "royal" if who in ("king", "queen") else "noble"
        return {"text": f"The {who} will {rng.choice(['speak', 'hear'])} of {rng.choice(['love', 'death', 'night'])}.", "label": label}

    train, test = tmp_path / "train.jsonl", tmp_path / "test.csv"
    train.write_text("\n".join(json.dumps(row()) for _ in range(200)))
    rows = [row() for _ in range(40)]
    test.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows))
    return train, test


def test_finetune_classify_from_pretrained_checkpoint(mlm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = _labelled(tmp_path)
    args = ["finetune", "--task", "classify", "--train", str(train), "--test", str(test), "--base", str(mlm_run),
            "--epochs", "6", "--lr", "1e-3", "--batch-size", "16", "--out", str(tmp_path / "ft")]
    assert main(args) == 0
    out = capsys.readouterr().out
    acc = float(out.split("test accuracy ")[1].split()[0])
    assert acc >= 0.95, out
    model, _, meta = load_checkpoint(tmp_path / "ft", kind="encoder")
    assert meta["labels"] == ["noble", "royal"] and model.num_labels == 2


def test_finetune_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = _labelled(tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "The king will speak.", "label": "villain"}\n')
    assert "label 'villain'" in cli_error(capsys, ["finetune", "--train", str(train), "--test", str(other)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "", "label": "royal"}\n{"text": "x", "label": "noble"}\n')
    assert "empty text" in cli_error(capsys, ["finetune", "--train", str(empty)])
    long = tmp_path / "long.jsonl"
    long.write_text('{"text": "' + "a" * 300 + '", "label": "royal"}\n{"text": "b", "label": "noble"}\n')
    assert "more than the model's" in cli_error(capsys, ["finetune", "--train", str(long), "--truncate", "false", "--max-steps", "1"])
    assert "--task must be classify" in cli_error(capsys, ["finetune", "--task", "translate", "--train", str(train)])
    assert "does not exist" in cli_error(capsys, ["finetune", "--train", str(tmp_path / "missing.jsonl")])


def _conll(tmp_path: Path) -> tuple[Path, Path]:
    """Tag each word of the synthetic grammar's sentences by its role: subject noun, verb or other."""
    import random

    rng = random.Random(1)
    role = {"king": "NOUN", "queen": "NOUN", "lord": "NOUN", "lady": "NOUN", "speak": "VERB", "hear": "VERB"}

    def sentence() -> str:
        words = ["The", rng.choice(["king", "queen", "lord", "lady"]), "will", rng.choice(["speak", "hear"]), "of", rng.choice(["love", "death"])]
        return "\n".join(f"{w} {role.get(w, 'O')}" for w in words)

    train, test = tmp_path / "train.conll", tmp_path / "test.conll"
    train.write_text("\n\n".join(sentence() for _ in range(120)) + "\n")
    test.write_text("\n\n".join(sentence() for _ in range(20)) + "\n")
    return train, test


def test_finetune_tag(mlm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = _conll(tmp_path)
    args = ["finetune", "--task", "tag", "--train", str(train), "--test", str(test), "--base", str(mlm_run),
            "--epochs", "8", "--lr", "2e-3", "--batch-size", "16", "--out", str(tmp_path / "tagger")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert float(out.split("test token accuracy ")[1].split()[0]) >= 0.95, out
    model, _, meta = load_checkpoint(tmp_path / "tagger", kind="encoder")
    assert meta["labels"] == ["NOUN", "O", "VERB"] and model.num_labels == 3


def _squad(tmp_path: Path, n: int, seed: int, name: str) -> Path:
    """Two people, two verbs and two objects per context — "The king will speak of love. The lady will
    hear of night." — and a question about one of them: "Of what will the lady hear?". Both objects
    are spans of the same form, in either order, so the answer depends on the question."""
    import json
    import random

    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        who = rng.sample(["king", "queen", "lady", "lord"], 2)
        verbs = rng.sample(["speak", "hear"], 2)
        what = rng.sample(["love", "death", "night", "crown", "sword", "day"], 2)
        context = " ".join(f"The {w} will {v} of {o}." for w, v, o in zip(who, verbs, what))
        k = rng.randrange(2)
        start = context.index(f"{who[k]} will {verbs[k]} of {what[k]}") + len(f"{who[k]} will {verbs[k]} of ")
        paragraphs.append({"context": context, "qas": [{"id": f"{name}{i}", "question": f"Of what will the {who[k]} {verbs[k]}?",
                                                        "answers": [{"text": what[k], "answer_start": start}]}]})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}))
    return path


def _question_blind_exact_match(path: Path) -> float:
    """Exact match of always answering the first object: what a model that ignores the question gets."""
    import json

    paras = [p for a in json.loads(path.read_text())["data"] for p in a["paragraphs"]]
    return sum(p["context"].split(" of ")[1].split(".")[0] == p["qas"][0]["answers"][0]["text"] for p in paras) / len(paras)


def _qa_scores(out: str) -> tuple[float, float]:
    tail = out.split("test exact match ")[1]
    return float(tail.split(",")[0]), float(tail.split("F1 ")[1].split()[0])


def test_finetune_qa(mlm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = _squad(tmp_path, 480, 2, "train"), _squad(tmp_path, 40, 3, "test")
    assert _question_blind_exact_match(test) < 0.65  # the test set cannot be passed without reading the question
    args = ["finetune", "--task", "qa", "--train", str(train), "--test", str(test), "--base", str(mlm_run),
            "--epochs", "20", "--lr", "3e-3", "--batch-size", "16", "--max-length", "96"]
    assert main(args) == 0
    em, f1 = _qa_scores(capsys.readouterr().out)
    assert em >= 0.9 and f1 >= 0.9, (em, f1)


def test_best_span_respects_allowed_tokens_and_length() -> None:
    import torch

    from triform.models.encoder import best_span

    start = torch.tensor([[9.0, 0.0, 5.0, 0.0, 0.5, 1.0]])
    end = torch.tensor([[9.0, 0.0, -2.0, -2.0, 4.0, 3.0]])
    allowed = torch.tensor([[False, True, True, True, True, True]])  # position 0 is the question
    assert best_span(start, end, allowed, max_answer_len=5)[0] == (2, 4, 9.0)
    assert best_span(start, end, allowed, max_answer_len=2)[0][:2] == (4, 4)  # 2..4 is too long
    gap = torch.tensor([[False, True, True, False, True, True]])  # a span may not cross a disallowed token
    assert best_span(start, end, gap, max_answer_len=5)[0][:2] == (4, 4)
    assert best_span(start, end, torch.zeros_like(gap), max_answer_len=5)[0][:2] == (-1, -1)


def test_qa_answer_span_outside_context_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "The king will speak.", "qas": [
        {"id": "q1", "question": "Who?", "answers": [{"text": "queen", "answer_start": 4}]}]}]}]}))
    assert "answer span outside its context" in cli_error(capsys, ["finetune", "--task", "qa", "--train", str(bad)])
    conll = tmp_path / "x.conll"
    conll.write_text("justonecolumn\n")
    assert "needs a token and a tag" in cli_error(capsys, ["finetune", "--task", "tag", "--train", str(conll)])


def _minilm() -> str:
    return str(minilm_folder())


def test_wordpiece_base_for_classify_tag_and_qa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same commands fine-tune a real WordPiece checkpoint (all-MiniLM-L6-v2)."""
    train, test = _labelled(tmp_path)
    common = ["--base", _minilm(), "--batch-size", "16", "--lr", "1e-4"]
    assert main(["finetune", "--train", str(train), "--test", str(test), "--epochs", "3", *common, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert float(out.split("test accuracy ")[1].split()[0]) >= 0.95, out
    model, tok, meta = load_checkpoint(tmp_path / "c", kind="encoder")
    assert tok.kind == "wordpiece" and meta["labels"] == ["noble", "royal"]
    conll_train, conll_test = _conll(tmp_path)
    assert main(["finetune", "--task", "tag", "--train", str(conll_train), "--test", str(conll_test), "--epochs", "4", *common]) == 0
    out = capsys.readouterr().out
    assert float(out.split("test token accuracy ")[1].split()[0]) >= 0.95, out
    qa_train, qa_test = _squad(tmp_path, 480, 2, "train"), _squad(tmp_path, 40, 3, "test")
    assert _question_blind_exact_match(qa_test) < 0.65
    assert main(["finetune", "--task", "qa", "--train", str(qa_train), "--test", str(qa_test), "--epochs", "2", *common]) == 0
    em, f1 = _qa_scores(capsys.readouterr().out)
    assert em >= 0.9 and f1 >= 0.9, (em, f1)
