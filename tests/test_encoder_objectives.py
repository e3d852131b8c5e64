"""Encoder pretraining objectives: masking statistics, dynamic vs static masks, sentence pairs, and
learning (a tiny BERT's masked-LM loss falls; a DistilBERT student learns from its teacher)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import synthetic_text

from triform.config import get_encoder_preset
from triform.models.encoder import EncoderForPreTraining, student_from_teacher
from triform.objectives.masked_lm import (
    IGNORE,
    MaskingConfig,
    distillation_loss,
    mask_tokens,
    mlm_loss,
    sentence_pairs,
    static_mask_generator,
)
from triform.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer()


def test_masking_statistics_match_bert() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (400, 250), generator=g)
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False  # [CLS] / [SEP] positions are never selected
    inputs, labels = mask_tokens(tokens, mask_id=TOK.mask_id, random_ids=(0, 256), maskable=maskable, generator=g)
    n = int(maskable.sum())
    selected = labels != IGNORE
    k = int(selected.sum())
    p = 0.15
    assert abs(k / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert not selected[~maskable].any()
    assert torch.equal(labels[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])
    masked = int((inputs[selected] == TOK.mask_id).sum())
    unchanged = int((inputs[selected] == tokens[selected]).sum())
    changed = k - masked - unchanged  # random replacements (a random draw equal to the original counts as unchanged)
    for share, want in ((masked / k, 0.8), (changed / k, 0.1 * 255 / 256), (unchanged / k, 0.1 + 0.1 / 256)):
        assert abs(share - want) < 4 * math.sqrt(want * (1 - want) / k)


def test_dynamic_masks_change_static_masks_do_not() -> None:
    tokens = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    kw = dict(mask_id=TOK.mask_id, random_ids=(0, 256), maskable=maskable)
    g = torch.Generator().manual_seed(2)
    first, second = mask_tokens(tokens, generator=g, **kw)[1], mask_tokens(tokens, generator=g, **kw)[1]
    assert not torch.equal(first, second)  # RoBERTa: a fresh mask each time the sequence is seen
    a = mask_tokens(tokens, generator=static_mask_generator(7, seed=3), **kw)[1]
    b = mask_tokens(tokens, generator=static_mask_generator(7, seed=3), **kw)[1]
    assert torch.equal(a, b)  # BERT: the same sequence always gets the same mask
    with pytest.raises(ValueError):
        MaskingConfig(rate=1.5)


def test_sentence_pairs_nsp_and_sop() -> None:
    docs = [[[d * 100 + i] for i in range(6)] for d in range(5)]  # segment ids encode (document, index)
    rng = random.Random(0)
    nsp = sentence_pairs(docs, task="nsp", rng=rng, n=2000)
    positives = [(a, b) for a, b, y in nsp if y == 1]
    assert abs(len(positives) / 2000 - 0.5) < 0.05
    assert all(b[0] == a[0] + 1 for a, b in positives)  # the true next segment
    assert all(b[0] // 100 != a[0] // 100 for a, b, y in nsp if y == 0)  # from another document
    sop = sentence_pairs(docs, task="sop", rng=rng, n=2000)
    assert all((b[0] == a[0] + 1) if y else (a[0] == b[0] + 1) for a, b, y in sop)
    assert abs(sum(y for *_, y in sop) / 2000 - 0.5) < 0.05


def _windows(data: bytes, n: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[bos] + bytes + [eos] windows and the mask of positions that may be selected."""
    starts = torch.randint(0, len(data) - length, (n,), generator=g).tolist()
    rows = [[TOK.bos_id, *data[s : s + length], TOK.eos_id] for s in starts]
    tokens = torch.tensor(rows)
    maskable = tokens < 256
    return tokens, maskable


def _train_teacher(steps: int) -> tuple[EncoderForPreTraining, list[float], bytes]:
    torch.manual_seed(0)
    data = synthetic_text(600, seed=1).encode()
    model = EncoderForPreTraining(get_encoder_preset("bert-base-tiny"), pair_head=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))  # post-norm needs it
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        tokens, maskable = _windows(data, 64, 30, g)
        inputs, labels = mask_tokens(tokens, mask_id=TOK.mask_id, random_ids=(0, 256), maskable=maskable, generator=g)
        loss = mlm_loss(model(inputs).mlm_logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
        losses.append(loss.item())
    return model.eval(), losses, data


@pytest.fixture(scope="module")
def teacher() -> tuple[EncoderForPreTraining, list[float], bytes]:
    return _train_teacher(800)


def test_tiny_bert_mlm_loss_falls(teacher) -> None:
    _, losses, _ = teacher
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 4.5  # about ln(264) at initialisation
    # Byte unigram statistics alone plateau near 3 nats; well below that the model reads the context.
    assert last < 1.5


def test_distilbert_student_learns_from_its_teacher(teacher) -> None:
    model, _, data = teacher
    student = student_from_teacher(model)
    assert student.cfg.stack.n_layers == model.cfg.stack.n_layers // 2 and student.encoder.embeddings.token_type is None
    torch.testing.assert_close(student.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)
    held_out, maskable = _windows(data, 64, 30, torch.Generator().manual_seed(4))
    inputs, labels = mask_tokens(held_out, mask_id=TOK.mask_id, random_ids=(0, 256), maskable=maskable,
                                 generator=torch.Generator().manual_seed(5))

    def agreement() -> float:
        """Share of masked positions where the student's top-1 prediction is the teacher's."""
        student.eval()
        with torch.no_grad():
            same = student(inputs).mlm_logits.argmax(-1) == model(inputs).mlm_logits.argmax(-1)
        student.train()
        return same[labels != IGNORE].float().mean().item()

    before = agreement()
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(120):
        tokens, maskable = _windows(data, 32, 30, g)
        inputs, labels = mask_tokens(tokens, mask_id=TOK.mask_id, random_ids=(0, 256), maskable=maskable, generator=g)
        mask = torch.ones_like(tokens)
        with torch.no_grad():
            t = model(inputs)
        s = student(inputs)
        loss, _ = distillation_loss(s.mlm_logits, t.mlm_logits, labels, s.hidden, t.hidden, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    after = agreement()
    assert after > 0.6 and after > before + 0.1, (before, after)
