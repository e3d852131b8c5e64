"""Fine-tuning objectives for encoders over finite labelled sets, drawn in shuffled epochs:
sequence classification, token tagging and extractive question answering (span start/end)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.objectives.base import Batch, BatchRng, EpochOrder, mean_parts
from triform.objectives.masked_lm import IGNORE


def pad_rows(rows: list[list[int]], value: int) -> Tensor:
    """Right-padded (B, longest) tensor of ragged rows."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


class _Finetune:
    """Shared parts: an epoch order over ``n`` examples, no held-out batches (the commands score
    their test sets with the task's own metric), and the loss as a mean over its count."""

    name = "finetune"
    parts = ("loss",)
    weights: dict[str, float] = {}

    def __init__(self, n: int, batch_size: int) -> None:
        self.order, self.batch_size = EpochOrder(n), batch_size

    def take(self, rng: BatchRng) -> list[int]:
        return self.order.take(self.batch_size, rng.py)

    def eval_batches(self, final: bool) -> Iterator[Batch]:
        return iter(())

    def summarize(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        return mean_parts(self, sums, counts)

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


class Classification(_Finetune):
    """Cross-entropy per example over pre-tokenized inputs (N, T) with masks and segment ids; each
    batch is trimmed to its longest row."""

    name = "classify"

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor, labels: Tensor, *,
                 batch_size: int) -> None:
        super().__init__(len(labels), batch_size)
        self.input_ids, self.attention_mask, self.token_type_ids, self.labels = input_ids, attention_mask, token_type_ids, labels

    def batch(self, rng: BatchRng) -> Batch:
        idx = torch.tensor(self.take(rng))
        width = int(self.attention_mask[idx].sum(1).max())  # trim the batch's padding
        tensors = {"ids": self.input_ids[idx, :width], "mask": self.attention_mask[idx, :width],
                   "types": self.token_type_ids[idx, :width], "y": self.labels[idx]}
        return Batch(tensors, self.counts(tensors))

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        return {"loss": len(tensors["ids"]), "tokens": int(tensors["mask"].sum())}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = model(batch["ids"], attention_mask=batch["mask"], token_type_ids=batch["types"])
        return {"loss": F.cross_entropy(logits.float(), batch["y"], reduction="sum")}


class Tagging(_Finetune):
    """Cross-entropy per scored token (a word's first piece or byte; others carry ``IGNORE``)."""

    name = "tag"

    def __init__(self, rows: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int) -> None:
        super().__init__(len(rows), batch_size)
        self.rows, self.pad_id = rows, pad_id

    def batch(self, rng: BatchRng) -> Batch:
        idx = self.take(rng)
        ids = pad_rows([self.rows[i][0] for i in idx], self.pad_id)
        labels = pad_rows([self.rows[i][1] for i in idx], IGNORE)
        mask = pad_rows([[1] * len(self.rows[i][0]) for i in idx], 0)
        tensors = {"ids": ids, "labels": labels, "mask": mask}
        return Batch(tensors, self.counts(tensors))

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        return {"loss": int((tensors["labels"] != IGNORE).sum()), "tokens": int(tensors["mask"].sum())}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = model(batch["ids"], attention_mask=batch["mask"])
        return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                                        reduction="sum")}


class SpanExtraction(_Finetune):
    """Extractive QA: the mean of the start and end cross-entropies, per question. Rows are
    (ids, start, end) in token positions."""

    name = "qa"

    def __init__(self, rows: list[tuple[list[int], int, int]], *, pad_id: int, batch_size: int) -> None:
        super().__init__(len(rows), batch_size)
        self.rows, self.pad_id = rows, pad_id

    def batch(self, rng: BatchRng) -> Batch:
        idx = self.take(rng)
        ids = pad_rows([self.rows[i][0] for i in idx], self.pad_id)
        mask = pad_rows([[1] * len(self.rows[i][0]) for i in idx], 0)
        tensors = {"ids": ids, "mask": mask, "start": torch.tensor([self.rows[i][1] for i in idx]),
                   "end": torch.tensor([self.rows[i][2] for i in idx])}
        return Batch(tensors, self.counts(tensors))

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        return {"loss": len(tensors["ids"]), "tokens": int(tensors["mask"].sum())}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        start, end = model(batch["ids"], attention_mask=batch["mask"])
        both = F.cross_entropy(start.float(), batch["start"], reduction="sum") + F.cross_entropy(end.float(), batch["end"], reduction="sum")
        return {"loss": both / 2}
