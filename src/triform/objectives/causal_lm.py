"""Causal language modelling: predict every next token of random windows of a token stream
(nanoGPT's objective), scored in nats per token and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from triform.data.batching import eval_windows, random_batch
from triform.objectives.base import Batch, BatchRng

LN2 = math.log(2.0)


def causal_lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in nats: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


FORWARDING_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule")  # call their inner model as is


def takes_targets(model: nn.Module) -> bool:
    """Whether ``model(x, targets=y)`` returns the summed next-token cross-entropy (DecoderLM does),
    also through wrappers that pass calls on unchanged (DistributedDataParallel and DataParallel keep
    the model as ``module``, torch.compile as ``_orig_mod``)."""
    for _ in range(4):
        if getattr(type(model), "fused_loss", False):
            return True
        if type(model).__name__ not in FORWARDING_WRAPPERS:
            return False
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner
    return False


def lm_metrics(nats: float, tokens: int, nbytes: int) -> dict[str, float]:
    """Loss (nats/token), bits per byte and perplexity from summed nats over ``tokens`` covering ``nbytes``.

    Bits per byte = total nats / (bytes covered by the target tokens · ln 2), comparable across
    tokenizers because it is normalised by text, not by tokens."""
    loss = nats / max(tokens, 1)
    return {"loss": loss, "bpb": nats / (max(nbytes, 1) * LN2), "ppl": math.exp(min(loss, 50.0))}


class CausalLM:
    """Random (context+1)-token windows of ``train_ids`` for training; fixed, evenly spaced windows of
    ``val_ids`` for evaluation (``eval_tokens`` periodically, ``final_eval_tokens`` at the end).
    ``token_bytes[i]`` is the byte length of token i, for bits per byte."""

    name = "causal"
    parts = ("loss",)
    weights: dict[str, float] = {}

    def __init__(self, train_ids: Tensor, val_ids: Tensor, *, context: int, batch_size: int, token_bytes: Tensor,
                 eval_tokens: int | None = 65536, final_eval_tokens: int | None = None, eval_batch_size: int = 16) -> None:
        self.train_ids, self.val_ids = train_ids, val_ids
        self.context, self.batch_size, self.token_bytes = context, batch_size, token_bytes
        self.eval_tokens, self.final_eval_tokens, self.eval_batch_size = eval_tokens, final_eval_tokens, eval_batch_size

    def make(self, x: Tensor, y: Tensor) -> Batch:
        """A batch of inputs and targets (B, T), with its token and byte counts."""
        tensors = {"x": x, "y": y}
        return Batch(tensors, self.counts(tensors))

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        y = tensors["y"]
        return {"loss": y.numel(), "bytes": int(self.token_bytes[y].sum())}

    def batch(self, rng: BatchRng) -> Batch:
        return self.make(*random_batch(self.train_ids, self.batch_size, self.context, rng.gen))

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        if takes_targets(model):  # the model computes the same sum itself, fusing head and loss
            return {"loss": model(batch["x"], targets=batch["y"])}
        return {"loss": causal_lm_loss(model(batch["x"]), batch["y"], reduction="sum")}

    def eval_batches(self, final: bool) -> Iterator[Batch]:
        windows = eval_windows(self.val_ids, self.context, self.final_eval_tokens if final else self.eval_tokens)
        for i in range(0, windows.shape[0], self.eval_batch_size):
            w = windows[i : i + self.eval_batch_size]
            yield self.make(w[:, :-1], w[:, 1:])

    def summarize(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        return lm_metrics(sums["loss"], counts["loss"], counts["bytes"])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
