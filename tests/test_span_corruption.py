"""T5 span corruption: noise density and mean span length over many samples, ordered unique sentinels,
and exact reconstruction of the original from inputs + targets."""

from __future__ import annotations

import random
import statistics

import pytest

from triform.objectives.span_corruption import corrupt_spans, noise_spans, reconstruct

SENTINELS = list(range(1000, 1100))


@pytest.mark.parametrize("density, mean_span, length", [(0.15, 3.0, 512), (0.15, 20.0, 1024), (0.5, 8.0, 256)])
def test_noise_density_and_mean_span(density: float, mean_span: float, length: int) -> None:
    rng = random.Random(0)
    hidden, lengths = [], []
    for _ in range(400):
        spans = noise_spans(length, noise_density=density, mean_span=mean_span, rng=rng)
        assert all(a < b for a, b in spans) and all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # ordered, apart
        assert spans[0][0] > 0  # kept tokens come first
        hidden.append(sum(b - a for a, b in spans) / length)
        lengths += [b - a for a, b in spans]
    assert abs(statistics.mean(hidden) - density) < 0.5 / length + 1e-9  # exactly round(L·density) each time
    assert abs(statistics.mean(lengths) - mean_span) < 0.1 * mean_span


def test_sentinels_unique_ordered_and_reconstruction_exact() -> None:
    rng = random.Random(1)
    for n in (2, 3, 10, 100, 777):
        tokens = [rng.randrange(256) for _ in range(n)]
        inputs, targets = corrupt_spans(tokens, SENTINELS, rng=rng, eos=257)
        used = [t for t in inputs if t in SENTINELS]
        assert used == SENTINELS[: len(used)]  # unique, in order
        assert [t for t in targets if t in SENTINELS] == used
        assert inputs[-1] == targets[-1] == 257
        assert reconstruct(inputs[:-1], targets[:-1], SENTINELS) == tokens


def test_bad_span_settings() -> None:
    rng = random.Random(2)
    with pytest.raises(ValueError, match="noise_density"):
        noise_spans(100, noise_density=1.5, mean_span=3, rng=rng)
    with pytest.raises(ValueError, match="sentinel"):
        corrupt_spans(list(range(1000)), SENTINELS[:2], noise_density=0.5, mean_span=2, rng=rng)
