"""What the training loop asks of an objective: seeded batches, and summed losses with their counts.

An objective turns data into micro-batches (``batch(rng)``) and a model's outputs into *summed*
losses (``loss(model, batch)``). Each batch carries, counted on the host when it was made, how many
items each summed loss covers (target tokens, masked tokens, sentence pairs, examples). The loop adds
the sums and the counts over every micro-batch of an optimizer step and divides once, so k
micro-batches give exactly the gradient of one k-times-larger batch (torchtitan's global token
normalisation; a mean of per-micro-batch means would weight short batches up).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One micro-batch: tensors for the model (on the host until the loop moves them) and, per loss
    part or metric, the number of items its sum covers."""

    tensors: dict[str, Tensor]
    counts: dict[str, int]

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}, self.counts)

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]


@dataclass
class BatchRng:
    """The random streams an objective draws its batches from: Python's (document and span choices)
    and a torch generator (windows, masks), both seeded from the run's seed and saved with every
    checkpoint so a resumed run draws the same batches."""

    seed: int
    py: random.Random = field(init=False)
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.py = random.Random(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"py": list(self.py.getstate()[1]), "py_version": self.py.getstate()[0],
                "py_gauss": self.py.getstate()[2], "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.py.setstate((state["py_version"], tuple(state["py"]), state["py_gauss"]))
        self.gen.set_state(state["gen"])


class Objective(Protocol):
    """A training objective. ``parts`` names the summed losses whose ratio to their counts is added
    (times ``weights``) into the loss the optimizer sees; any other key ``loss`` returns is a
    metric, reported as its sum over its count."""

    name: str
    parts: tuple[str, ...]
    weights: dict[str, float]

    def batch(self, rng: BatchRng) -> Batch:
        """One training micro-batch drawn from ``rng``."""
        ...

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        """How many items each summed loss covers in these (host) tensors."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Summed losses (and metric sums) of ``model`` on ``batch`` (on the model's device)."""
        ...

    def eval_batches(self, final: bool) -> Iterable[Batch]:
        """Held-out batches, the same at every evaluation (``final``: the larger end-of-run set)."""
        ...

    def summarize(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Reported metrics from sums and counts added over batches; includes ``loss``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Progress the objective keeps besides the random streams (an epoch's order), for resume."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def split_batch(objective: Objective, batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut by rows into ``parts`` micro-batches (each recounted), e.g. for gradient
    accumulation or one shard per rank. Rows keep the batch's padded width."""
    n = next(iter(batch.tensors.values())).shape[0]
    if n % parts:
        raise ValueError(f"a batch of {n} rows does not split into {parts} equal parts.")
    size = n // parts
    out = []
    for i in range(parts):
        tensors = {k: v[i * size : (i + 1) * size] for k, v in batch.tensors.items()}
        out.append(Batch(tensors, objective.counts(tensors)))
    return out


def combine(objective: Objective, sums: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
    """The loss the optimizer sees: each part's sum over its count (over the whole step), weighted."""
    total = sums[objective.parts[0]] * 0.0
    for p in objective.parts:
        if counts.get(p, 0) > 0:
            total = total + objective.weights.get(p, 1.0) * sums[p] / counts[p]
    return total


def mean_parts(objective: Objective, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """Every summed quantity divided by its count, and the weighted ``loss``."""
    out = {k: v / counts[k] for k, v in sums.items() if counts.get(k, 0) > 0}
    out["loss"] = sum(objective.weights.get(p, 1.0) * out.get(p, 0.0) for p in objective.parts)
    return out


class EpochOrder:
    """Indices of a finite dataset in shuffled passes (epochs), drawn ``size`` at a time; the order
    left in the current pass is saved with checkpoints."""

    def __init__(self, n: int) -> None:
        self.n, self.order = n, []

    def take(self, size: int, rng: random.Random) -> list[int]:
        if not self.order:
            self.order = list(range(self.n))
            rng.shuffle(self.order)
        idx, self.order = self.order[:size], self.order[size:]
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order = list(state.get("order", []))
