"""Sampling parameters and next-token selection: greedy, temperature, top-k, top-p (nucleus), and the
log-probabilities of the chosen tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from triform.errors import GenerationError


MAX_LOGPROBS = 20  # most alternatives reported per token (OpenAI's top_logprobs limit)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; ``top_k``/``top_p`` restrict the candidates
    (nucleus sampling, arXiv 1904.09751; see ``filter_logits``); ``n`` completions of one prompt
    share its KV blocks (engine only); ``ignore_eos`` keeps generating to ``max_new_tokens``
    (benchmarks). ``seed`` makes sampling reproducible per request, whatever else is in the batch:
    completion ``j`` samples from a generator on the model's device seeded with
    ``(seed + j * 0x9E3779B97F4A7C15) % 2**64``, so completion 0 uses ``seed`` itself and
    ``generate()``, the engine and chat give the same tokens for the same prompt and seed; with
    ``seed=None`` sampling uses torch's default generator and is not reproducible per request
    (``triform.inference.decode.make_generator``). ``logprobs`` (engine only) asks for the
    log-probability of every chosen token and of the ``logprobs`` most likely alternatives at its
    position, under the model's own distribution (``token_logprobs``); None asks for nothing."""

    n: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None

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
        k = self.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
            raise GenerationError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}.")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


MASS_TOLERANCE = 1e-6  # a candidate set whose mass is within this of top_p counts as reaching it


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature-scaled logits (B, V) with everything outside top-k / top-p set to -inf.

    Tokens are ranked by logit, ties by lower id first. Top-k keeps the first ``top_k`` of that
    ranking; top-p then keeps the shortest prefix of what is left whose probability, renormalised
    over the top-k tokens, reaches ``top_p`` (a prefix within ``MASS_TOLERANCE`` of it counts, so
    float rounding cannot add a token when the mass equals ``top_p`` exactly). Masses are summed in
    float64."""
    logits = logits.float() / params.temperature
    top_k = params.top_k if params.top_k is not None and params.top_k < logits.shape[-1] else None
    if top_k is None and params.top_p >= 1.0:
        return logits
    ranked, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V), ties: lower id first
    drop = torch.zeros_like(ranked, dtype=torch.bool)
    if top_k is not None:
        drop[..., top_k:] = True
    if params.top_p < 1.0:
        probs = torch.softmax(ranked.masked_fill(drop, float("-inf")).double(), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the better-ranked tokens
        drop[..., 1:] |= before[..., 1:] >= params.top_p - MASS_TOLERANCE  # the best token always stays
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ranked.masked_fill(drop, float("-inf")))


def sample_next(logits: Tensor, params: SamplingParams, generators: list[torch.Generator | None]) -> Tensor:
    """Pick one token per row of ``logits`` (B, V); row i draws from ``generators[i]`` so a request's
    samples do not depend on what else is in the batch."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    rows = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(rows)


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the most likely tokens at its position, best first, as
    (token id, log-probability) pairs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: Tensor, rows: Sequence[int], tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """Log-probabilities for pick ``i``: token ``tokens[i]`` chosen from row ``rows[i]`` of ``logits``
    (R, V), with the ``ks[i]`` most likely alternatives. The distribution is the model's own
    (log-softmax of the raw logits), not the temperature / top-k / top-p one it was sampled from, so
    the numbers do not depend on how the token was picked. All picks are copied to the host at once."""
    if not rows:
        return []
    logp = torch.log_softmax(logits[list(rows)].float(), dim=-1)  # (P, V)
    picked = torch.tensor(list(tokens), device=logp.device)
    top_v, top_i = logp.topk(min(max(ks), logp.shape[-1]), dim=-1)  # (P, k)
    values = torch.cat([logp.gather(1, picked[:, None]), top_v], dim=1).tolist()  # (P, 1 + k)
    ids = top_i.tolist()
    return [
        TokenLogprob(t, v[0], tuple(zip(i[:n], v[1 : 1 + n]))) for t, v, i, n in zip(tokens, values, ids, ks)
    ]
