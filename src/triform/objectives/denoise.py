"""Training examples for the denoising objectives, for either model family.

An objective turns a window of tokens into (inputs, targets):

- ``causal``: no inputs, the window is the target (plain language modelling; decoders only).
- ``span``: T5 span corruption (``noise_density``, ``mean_span``).
- ``prefix-lm``: a random split; the prefix is the input, the rest the target.

Inputs and targets both end with the end-of-sequence token, as in T5: the encoder (or the
bidirectional prefix) then always sees where the input stops.
- ``ul2``: UL2's mixture of denoisers, each example prefixed with its mode token.

A ``Seq2Seq`` model reads the inputs with its encoder and predicts the targets with its decoder
(``seq2seq_batch``). A ``DecoderLM`` reads ``inputs + targets`` as one sequence with a bidirectional
mask over the inputs and is trained on the target positions only (``prefix_lm_batch``), as UL2
trains its decoder-only models.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.errors import DataError
from triform.models.encoder_decoder import Seq2Seq
from triform.objectives.base import Batch, BatchRng
from triform.objectives.span_corruption import corrupt_spans
from triform.objectives.ul2 import MODE_TOKENS, UL2_DENOISERS, UL2Mixture, prefix_lm_split

OBJECTIVES = ("causal", "span", "prefix-lm", "ul2")
IGNORE = -100  # label of positions that carry no loss

Pair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class DenoisingTask:
    """How one objective builds examples. ``mode_ids`` maps R/X/S to mode-token ids (ul2 only)."""

    objective: str
    sentinels: tuple[int, ...] = ()
    eos_id: int | None = None
    mode_ids: tuple[tuple[str, int], ...] = ()
    noise_density: float = 0.15
    mean_span: float = 20.0
    mixture_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}.")
        if self.objective in ("span", "ul2") and not self.sentinels:
            raise ValueError(f"objective {self.objective} needs sentinel tokens.")
        if self.objective == "span" and not (0.0 < self.noise_density < 1.0 and self.mean_span > 0):
            raise ValueError("noise_density must be in (0, 1) and mean_span positive.")
        if self.objective == "ul2":  # validates weights and mode tokens now, not at the first example
            weights = list(self.mixture_weights) if self.mixture_weights is not None else None
            object.__setattr__(self, "_mixture", UL2Mixture(dict(self.mode_ids), list(self.sentinels), weights=weights))

    def max_spans(self, length: int) -> int:
        """The most sentinels an example of ``length`` tokens can need."""
        denoisers = [(self.noise_density, self.mean_span)] if self.objective == "span" else (
            [(d.noise_density, d.mean_span) for d in UL2_DENOISERS if d.kind != "S"] if self.objective == "ul2" else [])
        return max([max(1, round(max(1, round(length * r)) / mu)) for r, mu in denoisers], default=0)

    def max_length(self, length: int) -> int:
        """An upper bound on len(inputs) and on len(targets) for windows of ``length`` tokens: the
        text, a sentinel per span, a mode token and an end-of-sequence token."""
        return length + self.max_spans(length) + 2

    def example(self, tokens: list[int], rng: random.Random) -> Pair:
        """(inputs, targets) for one window."""
        if self.objective == "causal":
            return [], list(tokens)
        if self.objective == "span":
            return corrupt_spans(tokens, list(self.sentinels), noise_density=self.noise_density, mean_span=self.mean_span,
                                 rng=rng, eos=self.eos_id)
        if self.objective == "prefix-lm":
            prefix, rest = prefix_lm_split(tokens, rng)
            end = [self.eos_id] if self.eos_id is not None else []  # inputs end with </s>, as in T5
            return prefix + end, rest + end
        inputs, targets, _ = self._mixture.sample(tokens, rng, eos=self.eos_id)  # type: ignore[attr-defined]
        return inputs, targets


def task_for(tokenizer, objective: str, *, noise_density: float = 0.15, mean_span: float = 20.0,
             mixture_weights: Sequence[float] | None = None) -> DenoisingTask:
    """A DenoisingTask using a byte tokenizer's sentinels, mode tokens and end-of-sequence id."""
    from triform.tokenizers.byte import sentinel_ids

    modes = tuple((k, tokenizer.special_id(v)) for k, v in MODE_TOKENS.items() if v in tokenizer.specials)
    return DenoisingTask(
        objective, tuple(sentinel_ids(tokenizer)), tokenizer.eos_id, modes, noise_density, mean_span,
        tuple(mixture_weights) if mixture_weights is not None else None,
    )


@dataclass
class Seq2SeqBatch:
    """Padded encoder-decoder batch: source (B, S) with its mask, decoder input (B, T) starting with
    the start token, and labels (B, T) with IGNORE on padding."""

    source: Tensor
    source_mask: Tensor
    decoder_input: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> Seq2SeqBatch:
        return Seq2SeqBatch(*(t.to(device) for t in (self.source, self.source_mask, self.decoder_input, self.labels)))


def seq2seq_batch(pairs: Sequence[Pair], *, pad_id: int, start_id: int) -> Seq2SeqBatch:
    """Teacher-forced encoder-decoder batch from (inputs, targets) pairs."""
    if any(not i for i, _ in pairs):
        raise ValueError("an encoder-decoder example needs a non-empty input (the causal objective is for decoders).")
    s, t, b = max(len(i) for i, _ in pairs), max(len(o) for _, o in pairs), len(pairs)
    source = torch.full((b, s), pad_id, dtype=torch.long)
    dec = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    for r, (i, o) in enumerate(pairs):
        source[r, : len(i)] = torch.tensor(i)
        dec[r, : len(o)] = torch.tensor([start_id, *o[:-1]])
        labels[r, : len(o)] = torch.tensor(o)
    mask = torch.arange(s)[None] < torch.tensor([len(i) for i, _ in pairs])[:, None]
    return Seq2SeqBatch(source, mask, dec, labels)


def prefix_lm_batch(pairs: Sequence[Pair], *, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens (B, T), labels (B, T), prefix_lengths (B,)) for a decoder: each row is ``inputs + targets``
    shifted by one, right-padded; only positions that predict a target token carry a label."""
    rows = [i + o for i, o in pairs]
    t, b = max(len(r) for r in rows) - 1, len(rows)
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    for r, ((i, _), row) in enumerate(zip(pairs, rows)):
        tokens[r, : len(row) - 1] = torch.tensor(row[:-1])
        first = max(len(i) - 1, 0)  # the position whose next token is the first target
        labels[r, first : len(row) - 1] = torch.tensor(row[first + 1 :])
    return tokens, labels, torch.tensor([len(i) for i, _ in pairs])


class ByteWindows:
    """Random windows of ``length`` bytes from documents, weighted by document length."""

    def __init__(self, docs: Sequence[bytes], length: int) -> None:
        self.docs = [d for d in docs if len(d) > length]
        if not self.docs:
            raise DataError(f"no document is longer than the context ({length} bytes).")
        self.length, self.weights = length, [len(d) for d in self.docs]

    def sample(self, n: int, rng: random.Random) -> list[list[int]]:
        out = []
        for d in rng.choices(self.docs, weights=self.weights, k=n):
            s = rng.randrange(len(d) - self.length + 1)
            out.append(list(d[s : s + self.length]))
        return out


def example_batch(task: DenoisingTask, windows: list[list[int]], rng: random.Random, pad_id: int, family: str) -> dict[str, Tensor]:
    """Tensors of one batch: seq2seq (source, source_mask, decoder_input, labels) or decoder
    (tokens, labels, prefix_lengths). The decoder start token is the pad token, as in T5."""
    pairs = [task.example(w, rng) for w in windows]
    if family == "seq2seq":
        return vars(seq2seq_batch(pairs, pad_id=pad_id, start_id=pad_id))
    tokens, labels, prefix = prefix_lm_batch(pairs, pad_id=pad_id)
    return {"tokens": tokens, "labels": labels, "prefix_lengths": prefix}


def batch_logits(model: nn.Module, batch: dict[str, Tensor] | Batch, *, causal: bool = False) -> Tensor:
    """Logits (B, T, V) for a batch built by ``example_batch``: an encoder-decoder reads the source
    with its encoder; a decoder reads inputs + targets with a bidirectional prefix (unless ``causal``)."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # a DDP wrapper
    if isinstance(net, Seq2Seq):
        return model(batch["source"], batch["decoder_input"], source_mask=batch["source_mask"])
    return model(batch["tokens"], prefix_lengths=None if causal else batch["prefix_lengths"])


class Denoising:
    """Span corruption, prefix-LM, UL2 or causal LM on random byte windows, for an encoder-decoder
    (``family="seq2seq"``) or a decoder (``"decoder"``, a prefix-LM). Loss: cross-entropy per target
    token; bits per target byte are reported too. Held-out examples are fixed (seed 1234)."""

    parts = ("loss",)
    weights: dict[str, float] = {}

    def __init__(self, task: DenoisingTask, train: ByteWindows, val: ByteWindows, *, family: str, pad_id: int,
                 batch_size: int, eval_batches: int = 4) -> None:
        self.name = task.objective
        self.task, self.train, self.val, self.family, self.pad_id = task, train, val, family, pad_id
        self.batch_size, self.n_eval = batch_size, eval_batches

    def _make(self, windows: ByteWindows, rng: random.Random) -> Batch:
        tensors = example_batch(self.task, windows.sample(self.batch_size, rng), rng, self.pad_id, self.family)
        return Batch(tensors, self.counts(tensors))

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        labels = tensors["labels"]
        return {"loss": int((labels != IGNORE).sum()), "bytes": int(((labels >= 0) & (labels < 256)).sum())}

    def batch(self, rng: BatchRng) -> Batch:
        return self._make(self.train, rng.py)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = batch_logits(model, batch, causal=self.task.objective == "causal")
        return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                                        reduction="sum")}

    def eval_batches(self, final: bool) -> Iterator[Batch]:
        rng = random.Random(1234)
        for _ in range(self.n_eval):
            yield self._make(self.val, rng)

    def summarize(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        nats = sums["loss"]
        return {"loss": nats / max(counts["loss"], 1), "bpb": nats / (max(counts["bytes"], 1) * math.log(2))}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
