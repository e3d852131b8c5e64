"""Sampling parameters and next-token selection: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from triform.errors import GenerationError


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; ``top_k``/``top_p`` restrict the candidates
    (nucleus sampling, arXiv 1904.09751); ``seed`` makes sampling reproducible per request; ``n``
    completions of one prompt share its KV blocks (engine only); ``ignore_eos`` keeps generating
    to ``max_new_tokens`` (benchmarks)."""

    n: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise GenerationError(f"n (completions per prompt) must be a positive integer, got {self.n!r}.")
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive integer, got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}.")
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty.")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature-scaled logits (B, V) with everything outside top-k / top-p set to -inf."""
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens: keep the smallest set reaching p
        sorted_logits = sorted_logits.masked_fill(before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: Tensor, params: SamplingParams, generators: list[torch.Generator | None]) -> Tensor:
    """Pick one token per row of ``logits`` (B, V); row i draws from ``generators[i]`` so a request's
    samples do not depend on what else is in the batch."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    rows = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(rows)
