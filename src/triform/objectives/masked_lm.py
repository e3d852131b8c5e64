"""Encoder pretraining objectives: masked-LM corruption, sentence-pair tasks, distillation losses.

- BERT (arXiv 1810.04805): select 15% of the (non-special) tokens; of those, 80% become [MASK],
  10% a random token, 10% stay; predict the originals. Next-sentence prediction (NSP): segment B is
  the true continuation half of the time, a random segment otherwise.
- RoBERTa (arXiv 1907.11692): dynamic masking, a fresh mask every time a sequence is seen (BERT
  fixed each sequence's masks once, in preprocessing); no NSP; full-sentence packing.
- ALBERT (arXiv 1909.11942): sentence-order prediction (SOP): two consecutive segments, swapped
  half of the time.
- DistilBERT (arXiv 1910.01108): soft-target KL at temperature T (scaled by T²) + masked-LM +
  a cosine loss aligning the student's hidden states with the teacher's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # label of positions that are not predicted


@dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    """What share of tokens to select, and how selected tokens are corrupted."""

    rate: float = 0.15
    mask_share: float = 0.8
    random_share: float = 0.1  # the rest (10%) keep their token

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"masking rate must be in (0, 1), got {self.rate}.")
        if self.mask_share < 0 or self.random_share < 0 or self.mask_share + self.random_share > 1.0:
            raise ValueError("mask_share and random_share must be non-negative and sum to at most 1.")


def mask_tokens(
    tokens: Tensor, *, mask_id: int, random_ids: tuple[int, int], maskable: Tensor,
    generator: torch.Generator | None = None, config: MaskingConfig = MaskingConfig(),
) -> tuple[Tensor, Tensor]:
    """Corrupt ``tokens`` (B, T) for masked-LM training: returns (inputs, labels), labels holding the
    original id at selected positions and ``IGNORE`` elsewhere. ``maskable`` (B, T) is False for
    special tokens and padding; random replacements are drawn from ``random_ids`` = [low, high)."""
    dev = tokens.device
    u = torch.rand(tokens.shape, generator=generator, device=dev)
    selected = (u < config.rate) & maskable.bool()
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE))
    how = torch.rand(tokens.shape, generator=generator, device=dev)
    to_mask = selected & (how < config.mask_share)
    to_random = selected & (how >= config.mask_share) & (how < config.mask_share + config.random_share)
    rand = torch.randint(random_ids[0], random_ids[1], tokens.shape, generator=generator, device=dev)
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(to_random, rand, inputs)
    return inputs, labels


def static_mask_generator(sequence_index: int, seed: int) -> torch.Generator:
    """BERT's static masking: the same sequence always gets the same mask (seeded by its index)."""
    return torch.Generator().manual_seed(hash((seed, sequence_index)) & (2**63 - 1))


def sentence_pairs(
    segments: list[list[list[int]]], *, task: str, rng: random.Random, n: int,
) -> list[tuple[list[int], list[int], int]]:
    """``n`` (segment A, segment B, label) pairs from documents given as lists of segments.

    ``task="nsp"``: label 1 when B follows A in the same document, 0 when B is a random segment of
    another document (of the same one, not adjacent, when there is only one).
    ``task="sop"``: A and B are always consecutive; label 1 in order, 0 swapped.
    """
    if task not in ("nsp", "sop"):
        raise ValueError(f"task must be 'nsp' or 'sop', got {task!r}.")
    docs = [d for d in segments if len(d) >= 2]
    if not docs or (task == "nsp" and len(segments) < 2 and len(docs[0]) < 4):
        raise ValueError("sentence-pair tasks need documents with at least two segments (four for NSP within one document).")
    out = []
    for _ in range(n):
        d = rng.randrange(len(docs))
        i = rng.randrange(len(docs[d]) - 1)
        a, b = docs[d][i], docs[d][i + 1]
        label = int(rng.random() < 0.5)
        if not label:
            if task == "sop":
                a, b = b, a
            else:
                others = [j for j in range(len(segments)) if segments[j] is not docs[d] and segments[j]]
                if others:
                    other = segments[rng.choice(others)]
                    b = other[rng.randrange(len(other))]
                else:  # one document: any segment that is not A's neighbour
                    far = [j for j in range(len(docs[d])) if abs(j - i - 1) > 1 and j != i]
                    b = docs[d][rng.choice(far)]
        out.append((a, b, label))
    return out


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the selected positions."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, student_hidden: Tensor, teacher_hidden: Tensor,
    attention_mask: Tensor, *, temperature: float = 2.0, weights: tuple[float, float, float] = (5.0, 2.0, 1.0),
) -> tuple[Tensor, dict[str, float]]:
    """DistilBERT's loss: w_kl · T² · KL(teacher_T || student_T) over real tokens + w_mlm · masked-LM
    + w_cos · (1 - cos(student hidden, teacher hidden)) over real tokens. Returns (loss, parts)."""
    real = attention_mask.bool()
    s = student_logits[real].float() / temperature  # (N, V)
    t = teacher_logits[real].float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean") * temperature**2
    mlm = mlm_loss(student_logits, labels)
    cos = (1.0 - F.cosine_similarity(student_hidden[real].float(), teacher_hidden[real].float(), dim=-1)).mean()
    loss = weights[0] * kl + weights[1] * mlm + weights[2] * cos
    return loss, {"kl": kl.item(), "mlm": mlm.item(), "cos": cos.item()}
