"""`triform train-vision`, `classify-image`, `zero-shot` and the vision part of `presets`, through
``triform.cli.main.main`` on tiny budgets, and one-sentence errors for every kind of bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error
from PIL import Image

from triform.checkpoint import save_checkpoint
from triform.cli.main import main
from triform.config import CLIP_PRESETS, VISION_PRESETS, get_preset
from triform.data.images import DIGIT_WORDS, TEST_TEMPLATES, digits
from triform.models.clip import CLIP
from triform.models.decoder import DecoderLM
from triform.models.vision import VisionClassifier
from triform.tokenizers.byte import ByteTokenizer

TOP = re.compile(r"^(?P<file>.+): (?P<rest>.+)$")


def _train(out: Path, task: str, steps: int, capsys: pytest.CaptureFixture[str]) -> list[str]:
    argv = ["train-vision", "--task", task, "--out", str(out), "--max-steps", str(steps), "--progress", "false",
            "--precision", "float32", "--device", "cpu"]
    assert main(argv) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The first 24 test digits as 24×24 greyscale PNGs (one saved as RGB, one as RGBA: they are converted)."""
    folder = tmp_path_factory.mktemp("pngs")
    test = digits("test")
    truth = []
    for i in range(24):
        pixels = (test.images[i, 0].numpy() * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((24, 24), Image.Resampling.NEAREST)
        if i == 1:
            image = image.convert("RGB")
        if i == 2:
            image = image.convert("RGBA")
        image.save(folder / f"digit{i:02d}.png")
        truth.append(DIGIT_WORDS[int(test.labels[i])])
    return folder, truth


def _parse_top(lines: list[str], names: set[str], k: int) -> list[tuple[str, list[tuple[str, float]]]]:
    parsed = []
    for line in lines:
        m = TOP.match(line)
        assert m, line
        pairs = []
        for item in m["rest"].split(", "):
            label, p = item.rsplit(" ", 1)
            pairs.append((label, float(p)))
        assert len(pairs) == k and all(label in names for label, _ in pairs)
        probs = [p for _, p in pairs]
        assert probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 0.0005 * k  # each shown rounded to 3 places
        parsed.append((m["file"], pairs))
    return parsed


def test_train_vision_classify_then_classify_image(tmp_path: Path, pngs: tuple[Path, list[str]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = _train(tmp_path / "vit", "classify", 200, capsys)
    m = re.match(r"trained classify on digits: (\d+) steps in \d+ s .*, 0\.10M parameters$", out[0])
    assert m and int(m[1]) == 200, out[0]
    acc = re.match(r"held-out \(359 images\): test accuracy (\d\.\d{4})$", out[1])
    assert acc and 0.0 <= float(acc[1]) <= 1.0, out[1]
    assert out[2] == f"checkpoint: {tmp_path / 'vit' / 'checkpoint'}" and (tmp_path / "vit" / "checkpoint").is_dir()
    assert out[3] == f"confusion matrix: {tmp_path / 'vit' / 'confusion.png'}"
    assert (tmp_path / "vit" / "confusion.png").stat().st_size > 5000

    folder, truth = pngs
    files = [str(folder / f"digit{i:02d}.png") for i in range(3)]
    assert main(["classify-image", str(tmp_path / "vit"), *files, "--top-k", "2"]) == 0
    parsed = _parse_top(capsys.readouterr().out.strip().splitlines(), set(DIGIT_WORDS), 2)
    assert [f for f, _ in parsed] == files
    assert main(["classify-image", str(tmp_path / "vit" / "checkpoint"), str(folder)]) == 0  # a folder, sorted
    parsed = _parse_top(capsys.readouterr().out.strip().splitlines(), set(DIGIT_WORDS), 3)
    assert [Path(f).name for f, _ in parsed] == [f"digit{i:02d}.png" for i in range(24)]
    correct = sum(pairs[0][0] == true for (_, pairs), true in zip(parsed, truth))
    assert correct >= 18, (parsed, truth)  # 200 steps already classify most test digits (chance: 2 or 3 of 24)


def test_train_vision_clip_then_zero_shot(tmp_path: Path, pngs: tuple[Path, list[str]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = _train(tmp_path / "clip", "clip", 12, capsys)
    assert re.match(r"trained clip on digits: 12 steps in \d+ s ", out[0]), out[0]
    scores = re.match(r"held-out \(359 images\): zero-shot accuracy (\d\.\d{4}) \(held-out templates\); "
                      r"recall@1 image->text (\d\.\d{4}), text->image (\d\.\d{4})$", out[1])
    assert scores and all(0 <= float(v) <= 1 for v in scores.groups()), out[1]
    folder, _ = pngs
    # defaults: the recorded class names and held-out templates
    assert main(["zero-shot", str(tmp_path / "clip"), str(folder / "digit00.png"), str(folder / "digit01.png")]) == 0
    _parse_top(capsys.readouterr().out.strip().splitlines(), set(DIGIT_WORDS), 3)
    argv = ["zero-shot", str(tmp_path / "clip"), str(folder), "--labels", "cat, dog,bird", "--templates", "a {}",
            "--templates", "a photo of a {}", "--top-k", "5"]
    assert main(argv) == 0
    parsed = _parse_top(capsys.readouterr().out.strip().splitlines(), {"cat", "dog", "bird"}, 3)  # k capped at 3
    assert len(parsed) == 24


def test_presets_list_vision_and_clip_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    vit = VisionClassifier(VISION_PRESETS["vit-digits"], 2)
    n_vit = sum(p.numel() for n, p in vit.named_parameters() if not n.startswith("head."))
    row = next(line for line in out.splitlines() if line.startswith("vit-digits "))
    assert row.split()[-1] == f"{n_vit / 1e3:.1f}K"
    n_clip = sum(p.numel() for p in CLIP(CLIP_PRESETS["clip-digits"]).parameters())
    row = next(line for line in out.splitlines() if line.startswith("clip-digits "))
    assert row.split()[-1] == f"{n_clip / 1e3:.1f}K"
    assert "clip-vit-b-32 " in out and "vit-base " in out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained checkpoints of each kind, saved directly (no training needed for the error paths)."""
    from triform.data.processor import CLIPProcessor, ImageProcessor

    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    save_checkpoint(root / "vit", VisionClassifier(VISION_PRESETS["vit-digits"], 10), ImageProcessor(8, 1),
                    extra={"labels": list(DIGIT_WORDS)})
    processor = CLIPProcessor(ByteTokenizer(), ImageProcessor(8, 1), 64)
    save_checkpoint(root / "clip", CLIP(CLIP_PRESETS["clip-digits"]), processor,
                    extra={"labels": list(DIGIT_WORDS), "test_templates": list(TEST_TEMPLATES)})
    save_checkpoint(root / "decoder", DecoderLM(get_preset("gpt2-tiny")), ByteTokenizer())
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    return {"root": root}


def test_vision_commands_refuse_bad_input_in_one_sentence(checkpoints: dict[str, Path], pngs: tuple[Path, list[str]],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = checkpoints["root"]
    folder, _ = pngs
    png = str(folder / "digit00.png")
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"\x89PNG not really")
    assert "unknown vision preset 'vit-huge'" in cli_error(capsys, ["train-vision", "--preset", "vit-huge"])
    assert "is a CLIP model; use --task clip" in cli_error(capsys, ["train-vision", "--preset", "clip-digits"])
    task = cli_error(capsys, ["train-vision", "--task", "segment"])
    assert "--task must be one of classify, clip, got 'segment'" in task
    assert "does not exist" in cli_error(capsys, ["classify-image", str(tmp_path / "nowhere"), png])
    assert "corrupt" in cli_error(capsys, ["classify-image", str(root / "corrupt"), png])
    decoder = cli_error(capsys, ["classify-image", str(root / "decoder"), png])
    assert "holds a decoder; this command needs a ViT checkpoint" in decoder
    assert "use triform zero-shot" in cli_error(capsys, ["classify-image", str(root / "clip"), png])
    assert "needs a CLIP checkpoint" in cli_error(capsys, ["zero-shot", str(root / "vit"), png])
    assert "could not be read as an image" in cli_error(capsys, ["classify-image", str(root / "vit"), str(bad_image)])
    assert "does not exist" in cli_error(capsys, ["classify-image", str(root / "vit"), str(tmp_path / "missing.png")])
    assert "at least 2 class names" in cli_error(capsys, ["zero-shot", str(root / "clip"), png, "--labels", "cat"])
    assert "has no '{}'" in cli_error(capsys, ["zero-shot", str(root / "clip"), png, "--templates", "a photo"])
    top_k = cli_error(capsys, ["classify-image", str(root / "vit"), png, "--top-k", "0"])
    assert "--top-k must be a positive integer" in top_k


def test_train_vision_refuses_bad_data_and_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "notes.txt").write_text("mine")
    assert "did not write" in cli_error(capsys, ["train-vision", "--out", str(tmp_path / "own"), "--max-steps", "1"])
    assert "does not exist" in cli_error(capsys, ["train-vision", "--data", str(tmp_path / "none"), "--max-steps", "1"])
    assert "val_fraction must be between 0 and 0.5" in cli_error(capsys, ["train-vision", "--val-fraction", "0.9"])
    assert "does not exist" in cli_error(capsys, ["train-vision", "--out", str(tmp_path / "fresh"), "--resume"])
