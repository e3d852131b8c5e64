"""Vision training through the one loop: a ViT learns the digits, a CLIP learns zero-shot digit
classification with caption templates it never saw, the contrastive loss is CLIP's, the shift
augmentation moves pixels as documented, and a paused run resumes bit-exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from triform.checkpoint import load_checkpoint
from triform.data.images import DIGIT_WORDS, TEST_TEMPLATES, TRAIN_TEMPLATES, digits
from triform.objectives.contrastive import contrastive_loss, random_shift
from triform.training.vision import VisionTrainConfig, train_vision


def _quiet(**changes) -> VisionTrainConfig:
    return VisionTrainConfig(progress=False, precision="float32", device="cpu", **changes)


def test_vit_reaches_95_percent_on_held_out_digits(tmp_path: Path) -> None:
    result = train_vision(_quiet(task="classify"), out_dir=tmp_path, log=lambda _: None)
    model, processor, meta = load_checkpoint(tmp_path, kind="vision")
    test = digits("test")
    with torch.no_grad():
        predicted = model(processor(test.images)).argmax(dim=-1)
    accuracy = float((predicted == test.labels).float().mean())
    assert accuracy >= 0.95, f"test accuracy {accuracy:.4f}"
    assert result.accuracy == pytest.approx(accuracy, abs=1e-6)
    assert meta["labels"] == list(DIGIT_WORDS) and meta["num_labels"] == 10 and len(test) == 359
    from sklearn.metrics import confusion_matrix

    expected = confusion_matrix(test.labels.numpy(), predicted.numpy(), labels=list(range(10)))
    assert result.confusion is not None and (result.confusion.numpy() == expected).all()


def test_clip_zero_shot_reaches_90_percent_with_held_out_templates(tmp_path: Path) -> None:
    result = train_vision(_quiet(task="clip"), out_dir=tmp_path, log=lambda _: None)
    model, processor, meta = load_checkpoint(tmp_path, kind="clip")
    assert meta["templates"] == list(TRAIN_TEMPLATES) and meta["test_templates"] == list(TEST_TEMPLATES)
    assert not set(TRAIN_TEMPLATES) & set(TEST_TEMPLATES)
    test = digits("test")
    with torch.no_grad():
        class_vectors = []
        for word in DIGIT_WORDS:  # prompt ensembling written out: mean of unit text vectors, renormalised
            rows = processor.texts([t.replace("{}", word) for t in TEST_TEMPLATES])
            text = F.normalize(model.text_proj(model.text.pool(model.text(rows), rows)), dim=-1)
            class_vectors.append(F.normalize(text.mean(dim=0), dim=0))
        weights = torch.stack(class_vectors)  # (10, P)
        images = F.normalize(model.image_proj(model.vision.pool(model.vision(processor.images(test.images)))), dim=-1)
        predicted = (images @ weights.t()).argmax(dim=-1)
    accuracy = float((predicted == test.labels).float().mean())
    assert accuracy >= 0.90, f"zero-shot accuracy {accuracy:.4f}"
    assert result.zero_shot == pytest.approx(accuracy, abs=1e-6)
    assert result.image_to_text is not None and result.image_to_text > 0.5
    assert result.text_to_image is not None and result.text_to_image > 0.5


def _plain_clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's pseudocode: (CE(logits, arange) + CE(logits.T, arange)) / 2, as a sum over the pairs."""
    b = logits.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        row = logits[i].double()
        col = logits[:, i].double()
        total += -(row[i] - torch.logsumexp(row, 0)) / 2
        total += -(col[i] - torch.logsumexp(col, 0)) / 2
    return total


def test_contrastive_loss_is_clips_symmetric_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    logits = 14.3 * image @ text.t()
    expected = _plain_clip_loss(logits)
    torch.testing.assert_close(contrastive_loss(logits).double(), expected, rtol=1e-5, atol=1e-5)
    # all groups distinct: the same loss as without groups
    torch.testing.assert_close(contrastive_loss(logits, torch.arange(6) * 7).double(), expected, rtol=1e-5, atol=1e-5)


def test_shared_groups_spread_the_target_over_their_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 5, generator=g, dtype=torch.float64) * 3
    groups = torch.tensor([4, 1, 4, 2, 1])
    total = 0.0
    for i in range(5):
        positives = [j for j in range(5) if groups[j] == groups[i]]
        row_norm = torch.logsumexp(logits[i], 0)
        col_norm = torch.logsumexp(logits[:, i], 0)
        total += -sum(float(logits[i, j] - row_norm) for j in positives) / len(positives) / 2
        total += -sum(float(logits[j, i] - col_norm) for j in positives) / len(positives) / 2
    assert float(contrastive_loss(logits, groups)) == pytest.approx(total, rel=1e-6)


def test_random_shift_moves_each_image_by_its_drawn_offset() -> None:
    images = torch.rand(4, 2, 5, 6, generator=torch.Generator().manual_seed(2))
    shifted = random_shift(images, 2, torch.Generator().manual_seed(3))
    offsets = torch.randint(-2, 3, (2, 4), generator=torch.Generator().manual_seed(3))
    for b in range(4):
        dy, dx = int(offsets[0, b]), int(offsets[1, b])
        expected = torch.zeros(2, 5, 6)
        for y in range(5):
            for x in range(6):
                if 0 <= y - dy < 5 and 0 <= x - dx < 6:
                    expected[:, y, x] = images[b, :, y - dy, x - dx]
        torch.testing.assert_close(shifted[b], expected, rtol=0, atol=0)
    edge = random_shift(images, 1, torch.Generator().manual_seed(4), pad="edge")
    assert edge.shape == images.shape and bool(((edge >= images.min()) & (edge <= images.max())).all())
    assert torch.equal(random_shift(images, 0, torch.Generator()), images)


@pytest.mark.parametrize("task, extra", [("classify", {"shift": 1}), ("clip", {})])
def test_paused_and_resumed_run_ends_with_the_same_weights(task: str, extra: dict, tmp_path: Path) -> None:
    cfg = _quiet(task=task, max_steps=10, eval_interval=4, **extra)
    train_vision(cfg, out_dir=tmp_path / "whole", log=lambda _: None)
    train_vision(cfg, out_dir=tmp_path / "paused", stop_after=6, log=lambda _: None)
    paused = load_file(str(tmp_path / "paused" / "checkpoint" / "model.safetensors"))
    resumed = train_vision(_quiet(), out_dir=tmp_path / "paused", resume=True, log=lambda _: None)
    assert resumed.fit.steps == 10 and resumed.task == task  # the saved task and schedule, not the defaults
    whole = load_file(str(tmp_path / "whole" / "checkpoint" / "model.safetensors"))
    after = load_file(str(tmp_path / "paused" / "checkpoint" / "model.safetensors"))
    assert whole.keys() == after.keys()
    assert any(not torch.equal(paused[k], after[k]) for k in after)  # the resumed part did train
    for k in whole:
        assert torch.equal(whole[k], after[k]), k
