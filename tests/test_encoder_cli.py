"""`triform pretrain` (mlm, mlm+nsp, mlm+sop, distill) and `triform fill` on a synthetic corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from triform.cli.main import main
from triform.training.encoder_trainer import load_encoder_checkpoint


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("mlm")
    args = ["pretrain", "--data", str(corpus_file), "--out", str(out), "--context", "32", "--batch-size", "64",
            "--max-steps", "700", "--lr", "2e-3", "--warmup-steps", "50", "--seed", "1"]
    assert main(args) == 0
    return out


def test_pretrain_mlm_learns(mlm_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tok, meta = load_encoder_checkpoint(mlm_run)
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
    model, _, meta = load_encoder_checkpoint(tmp_path)
    assert model.pair is not None and meta["objective"] == objective
    assert model.cfg.share_layers == (preset == "albert-base-tiny")


def test_distill_student_has_half_the_layers(mlm_run: Path, tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pretrain", "--objective", "distill", "--teacher", str(mlm_run), "--data", str(corpus_file), "--out", str(tmp_path),
            "--context", "32", "--batch-size", "8", "--max-steps", "5"]
    assert main(args) == 0
    capsys.readouterr()
    student, _, _ = load_encoder_checkpoint(tmp_path)
    teacher, _, _ = load_encoder_checkpoint(mlm_run)
    assert student.cfg.stack.n_layers == teacher.cfg.stack.n_layers // 2 and student.cfg.family == "distilbert"


def test_encoder_commands_bad_input(mlm_run: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "objective must be" in _err(capsys, ["pretrain", "--objective", "gpt"])
    assert "needs --teacher" in _err(capsys, ["pretrain", "--objective", "distill"])
    assert "no [MASK]" in _err(capsys, ["fill", str(mlm_run), "no masks here"])
    assert "holds a decoder" in _err(capsys, ["fill", str(trained_run), "a[MASK]"])
    assert "at most" in _err(capsys, ["fill", str(mlm_run), "x" * 200 + "[MASK]"])
