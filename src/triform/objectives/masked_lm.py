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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.errors import DataError
from triform.objectives.base import Batch, BatchRng, mean_parts
from triform.tokenizers.byte import ByteTokenizer

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
    + w_cos · (1 - cos(student hidden, teacher hidden)) over real tokens, each a mean over its
    tokens. Returns (loss, parts)."""
    sums = distillation_sums(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask,
                             temperature=temperature)
    real, masked = int(attention_mask.bool().sum()), int((labels != IGNORE).sum())
    means = {"kl": sums["kl"] / real, "mlm": sums["mlm"] / masked, "cos": sums["cos"] / real}
    loss = weights[0] * means["kl"] + weights[1] * means["mlm"] + weights[2] * means["cos"]
    return loss, {k: v.item() for k, v in means.items()}


def masked_lm_sums(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy over the selected positions (``labels != IGNORE``)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def distillation_sums(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, student_hidden: Tensor, teacher_hidden: Tensor,
    attention_mask: Tensor, *, temperature: float = 2.0,
) -> dict[str, Tensor]:
    """DistilBERT's three losses as sums: "kl" (T² · KL(teacher_T || student_T), summed over real
    tokens), "mlm" (over masked tokens) and "cos" (1 - cos(student, teacher hidden), over real tokens)."""
    real = attention_mask.bool()
    s = student_logits[real].float() / temperature  # (N, V)
    t = teacher_logits[real].float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum") * temperature**2
    cos = (1.0 - F.cosine_similarity(student_hidden[real].float(), teacher_hidden[real].float(), dim=-1)).sum()
    return {"kl": kl, "mlm": masked_lm_sums(student_logits, labels), "cos": cos}


class ByteEncoderInputs:
    """Byte-level encoder inputs from documents: windows for masked-LM, segment pairs for NSP/SOP."""

    def __init__(self, docs: list[bytes], context: int, tok: ByteTokenizer) -> None:
        self.docs = [d for d in docs if len(d) > context]
        if not self.docs:
            raise DataError(f"no document is longer than the context ({context} bytes).")
        self.context, self.tok = context, tok
        self.weights = [len(d) for d in self.docs]
        half = (context - 3) // 2
        # Segments for the pair objectives: consecutive lines packed up to half the context each.
        self.segments: list[list[list[int]]] = []
        for d in self.docs:
            segs, cur = [], b""
            for line in d.split(b"\n"):
                if cur and len(cur) + len(line) + 1 > half:
                    segs.append(list(cur[:half]))
                    cur = b""
                cur = cur + b"\n" + line if cur else line
            if cur:
                segs.append(list(cur[:half]))
            self.segments.append([s for s in segs if s])

    def windows(self, n: int, rng: random.Random) -> Tensor:
        """``n`` rows of [CLS] + context-2 bytes + [SEP] from random places (full-sentence packing)."""
        rows = []
        for d in rng.choices(self.docs, weights=self.weights, k=n):
            s = rng.randrange(len(d) - (self.context - 2))
            rows.append([self.tok.bos_id, *d[s : s + self.context - 2], self.tok.eos_id])
        return torch.tensor(rows)

    def pairs(self, n: int, task: str, rng: random.Random) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(tokens, attention mask, segment ids, labels) for ``n`` NSP or SOP pairs, padded to the context."""
        try:
            items = sentence_pairs(self.segments, task=task, rng=rng, n=n)
        except ValueError as exc:
            raise DataError(f"the corpus is too small for {task}: {exc}") from None
        tokens = torch.full((n, self.context), self.tok.pad_id)
        types = torch.zeros((n, self.context), dtype=torch.long)
        for r, (a, b, _) in enumerate(items):
            row = [self.tok.bos_id, *a, self.tok.eos_id, *b, self.tok.eos_id][: self.context]
            tokens[r, : len(row)] = torch.tensor(row)
            types[r, len(a) + 2 : len(row)] = 1
        mask = (tokens != self.tok.pad_id).long()
        return tokens, mask, types, torch.tensor([y for *_, y in items])


PAIR_TASKS = {"mlm+nsp": "nsp", "mlm+sop": "sop"}


class MaskedLM:
    """Masked-LM pretraining of a byte-level encoder (RoBERTa's dynamic masks, or BERT's static ones
    with ``static_masks``), plus next-sentence or sentence-order prediction for ``mlm+nsp`` /
    ``mlm+sop``. Loss parts: "mlm" (per masked token) and "pair" (per pair); metric "pair_correct".
    Held-out batches are drawn the same way from ``val`` with fixed seeds."""

    parts: tuple[str, ...]
    weights: dict[str, float] = {}

    def __init__(self, train: ByteEncoderInputs, val: ByteEncoderInputs, *, objective: str = "mlm", batch_size: int = 32,
                 static_masks: bool = False, seed: int = 0, eval_batches: int = 8) -> None:
        self.name = objective
        self.train, self.val, self.batch_size = train, val, batch_size
        self.pair_task = PAIR_TASKS.get(objective)
        self.parts = ("mlm", "pair") if self.pair_task else ("mlm",)
        self.static_masks, self.seed, self.n_eval = static_masks, seed, eval_batches
        self.seen = 0  # sequences drawn so far: BERT's static masks are seeded by this index

    def _make(self, data: ByteEncoderInputs, py: random.Random, gen: torch.Generator, static_from: int | None) -> Batch:
        tok = data.tok
        if self.pair_task:
            tokens, mask, types, labels_pair = data.pairs(self.batch_size, self.pair_task, py)
        else:
            tokens = data.windows(self.batch_size, py)
            mask, types, labels_pair = torch.ones_like(tokens), None, None
        maskable = tokens < 256
        if static_from is not None:  # one generator per sequence index, so a sequence always gets the same mask
            rows = [mask_tokens(t[None], mask_id=tok.mask_id, random_ids=(0, 256), maskable=m[None],
                                generator=static_mask_generator(static_from + i, self.seed))
                    for i, (t, m) in enumerate(zip(tokens, maskable))]
            inputs, labels = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        else:
            inputs, labels = mask_tokens(tokens, mask_id=tok.mask_id, random_ids=(0, 256), maskable=maskable, generator=gen)
        tensors = {"inputs": inputs, "labels": labels, "mask": mask}
        if types is not None:
            tensors |= {"types": types, "pair_labels": labels_pair}
        return Batch(tensors, self.counts(tensors))

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        counts = {"mlm": int((tensors["labels"] != IGNORE).sum()), "tokens": tensors["inputs"].numel()}
        if "pair_labels" in tensors:
            counts |= {"pair": len(tensors["pair_labels"]), "pair_correct": len(tensors["pair_labels"])}
        return counts

    def batch(self, rng: BatchRng) -> Batch:
        start = self.seen if self.static_masks else None
        self.seen += self.batch_size
        return self._make(self.train, rng.py, rng.gen, start)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        out = model(batch["inputs"], attention_mask=batch["mask"], token_type_ids=batch.tensors.get("types"))
        sums = {"mlm": masked_lm_sums(out.mlm_logits, batch["labels"])}
        if "pair_labels" in batch.tensors and out.pair_logits is not None:
            y = batch["pair_labels"]
            sums["pair"] = F.cross_entropy(out.pair_logits.float(), y, reduction="sum")
            sums["pair_correct"] = (out.pair_logits.argmax(-1) == y).sum().float()
        return sums

    def eval_batches(self, final: bool) -> Iterator[Batch]:
        py, gen = random.Random(1234), torch.Generator().manual_seed(1234)
        for _ in range(self.n_eval):
            yield self._make(self.val, py, gen, None)

    def summarize(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        out = mean_parts(self, sums, counts)
        if "pair_correct" in out:
            out["pair_accuracy"] = out.pop("pair_correct")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state.get("seen", 0))


class Distillation(MaskedLM):
    """DistilBERT (arXiv 1910.01108): a student learns from a frozen ``teacher`` on masked windows
    through the soft-target KL (weight 5), masked-LM (2) and hidden-state cosine (1) losses."""

    weights = {"kl": 5.0, "mlm": 2.0, "cos": 1.0}

    def __init__(self, train: ByteEncoderInputs, val: ByteEncoderInputs, *, teacher: nn.Module, temperature: float = 2.0,
                 batch_size: int = 32, seed: int = 0, eval_batches: int = 8) -> None:
        super().__init__(train, val, objective="mlm", batch_size=batch_size, seed=seed, eval_batches=eval_batches)
        self.name, self.parts = "distill", ("kl", "mlm", "cos")
        self.teacher, self.temperature = teacher.eval().requires_grad_(False), temperature

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        real = int(tensors["mask"].sum())
        return {**super().counts(tensors), "kl": real, "cos": real}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        if next(self.teacher.parameters()).device != batch["inputs"].device:
            self.teacher.to(batch["inputs"].device)
        out = model(batch["inputs"], attention_mask=batch["mask"])
        with torch.no_grad():
            t = self.teacher(batch["inputs"], attention_mask=batch["mask"])
        return distillation_sums(out.mlm_logits, t.mlm_logits, batch["labels"], out.hidden, t.hidden, batch["mask"],
                                 temperature=self.temperature)
