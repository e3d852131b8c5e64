"""UL2's mixture of denoisers: each denoiser's statistics, mode tokens, exact reconstruction, mixture
sampling by weight, and bad settings."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from triform.objectives.span_corruption import reconstruct
from triform.objectives.ul2 import UL2_DENOISERS, Denoiser, UL2Mixture, prefix_lm_split

MODES = {"R": 300, "X": 301, "S": 302}
SENTINELS = list(range(400, 1400))


@pytest.mark.parametrize("denoiser", [d for d in UL2_DENOISERS if d.kind != "S"], ids=lambda d: f"{d.kind}-{d.mean_span}-{d.noise_density}")
def test_each_span_denoiser(denoiser: Denoiser) -> None:
    mix = UL2Mixture(MODES, SENTINELS, denoisers=(denoiser,))
    rng = random.Random(0)
    hidden, spans = [], []
    for _ in range(100):
        # 2048 tokens: the number of spans is rounded per sequence, which would skew μ=64 on short ones
        tokens = [rng.randrange(256) for _ in range(2048)]
        inputs, targets, d = mix.sample(tokens, rng)
        assert inputs[0] == MODES[d.kind] and d == denoiser
        assert reconstruct(inputs[1:], targets, SENTINELS) == tokens
        hidden.append(sum(t < 256 for t in targets) / len(tokens))
        pieces = [0]
        for t in targets:
            if t in SENTINELS:
                pieces.append(0)
            else:
                pieces[-1] += 1
        spans += pieces[1:]
    assert abs(statistics.mean(hidden) - denoiser.noise_density) < 0.01
    assert abs(statistics.mean(spans) - denoiser.mean_span) < 0.15 * denoiser.mean_span


def test_s_denoiser_is_prefix_lm() -> None:
    rng = random.Random(1)
    mix = UL2Mixture(MODES, SENTINELS, denoisers=(Denoiser("S"),))
    for _ in range(100):
        tokens = [rng.randrange(256) for _ in range(rng.randrange(2, 300))]
        inputs, targets, _ = mix.sample(tokens, rng, eos=257)
        assert inputs[0] == MODES["S"] and inputs[-1] == targets[-1] == 257
        assert inputs[1:-1] + targets[:-1] == tokens and len(inputs) > 2 and len(targets) > 1
    with pytest.raises(ValueError):
        prefix_lm_split([1], rng)


def test_mixture_follows_its_weights() -> None:
    weights = [1, 1, 0, 0, 0, 2, 4]
    mix = UL2Mixture(MODES, SENTINELS, weights=weights)
    rng = random.Random(2)
    counts = Counter(mix.sample([rng.randrange(256) for _ in range(200)], rng)[2] for _ in range(4000))
    for d, w in zip(UL2_DENOISERS, weights):
        share = counts[d] / 4000
        assert abs(share - w / sum(weights)) < 0.03


def test_bad_mixture_settings() -> None:
    with pytest.raises(ValueError, match="unknown UL2 mode"):
        Denoiser("Q", 3, 0.15)
    with pytest.raises(ValueError, match="sum to a positive"):
        UL2Mixture(MODES, SENTINELS, weights=[0] * 7)
    with pytest.raises(ValueError, match="non-negative"):
        UL2Mixture(MODES, SENTINELS, weights=[1, -1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="no mode token"):
        UL2Mixture({"R": 1}, SENTINELS)
