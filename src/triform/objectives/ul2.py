"""UL2's mixture of denoisers (arXiv 2205.05131) and prefix-LM.

- R-denoisers: regular span corruption, short spans, 15% noise (μ=3 and μ=8).
- X-denoisers: extreme corruption, long spans or much noise (μ=3, r=0.5; μ=8, r=0.5; μ=64, r=0.15;
  μ=64, r=0.5).
- S-denoiser: sequential, i.e. prefix-LM: continue a text from a random split point.
Each example starts with its mode token ([NLU] for R, [NLG] for X, [S2S] for S), which at inference
selects the behaviour. The same (inputs, targets) pairs train a Seq2Seq model directly, or a
DecoderLM as one sequence ``inputs + targets`` with a bidirectional mask over the inputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from triform.objectives.span_corruption import corrupt_spans

MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@dataclass(frozen=True)
class Denoiser:
    """One denoising task: kind R, X or S; mean span length μ and noise density r (R and X)."""

    kind: str
    mean_span: float = 0.0
    noise_density: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in MODE_TOKENS:
            raise ValueError(f"unknown UL2 mode {self.kind!r}; choose R, X or S.")


UL2_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("R", 3, 0.15), Denoiser("R", 8, 0.15),
    Denoiser("X", 3, 0.5), Denoiser("X", 8, 0.5), Denoiser("X", 64, 0.15), Denoiser("X", 64, 0.5),
    Denoiser("S"),
)


def prefix_lm_split(tokens: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
    """(prefix, continuation) at a uniformly random point, both non-empty."""
    if len(tokens) < 2:
        raise ValueError("prefix-LM needs at least two tokens.")
    cut = rng.randrange(1, len(tokens))
    return tokens[:cut], tokens[cut:]


class UL2Mixture:
    """Samples a denoiser per example (by ``weights``) and builds (inputs, targets) with its mode token."""

    def __init__(
        self, mode_ids: dict[str, int], sentinels: list[int], *, denoisers: tuple[Denoiser, ...] = UL2_DENOISERS,
        weights: list[float] | None = None,
    ) -> None:
        weights = [1.0] * len(denoisers) if weights is None else list(weights)
        if len(weights) != len(denoisers):
            raise ValueError(f"{len(denoisers)} denoisers but {len(weights)} mixture weights.")
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError("mixture weights must be non-negative and sum to a positive number.")
        missing = {d.kind for d in denoisers} - set(mode_ids)
        if missing:
            raise ValueError(f"no mode token id for UL2 mode(s) {', '.join(sorted(missing))}.")
        self.mode_ids, self.sentinels, self.denoisers, self.weights = mode_ids, sentinels, denoisers, weights

    def sample(self, tokens: list[int], rng: random.Random, *, eos: int | None = None) -> tuple[list[int], list[int], Denoiser]:
        d = rng.choices(self.denoisers, weights=self.weights)[0]
        mode = self.mode_ids[d.kind]
        if d.kind == "S":
            prefix, rest = prefix_lm_split(tokens, rng)
            end = [eos] if eos is not None else []  # like every T5 input, the prefix ends with </s>
            return [mode, *prefix, *end], rest + end, d
        inputs, targets = corrupt_spans(tokens, self.sentinels, noise_density=d.noise_density, mean_span=d.mean_span,
                                        rng=rng, eos=eos)
        return [mode, *inputs], targets, d
