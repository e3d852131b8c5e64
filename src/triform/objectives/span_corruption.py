"""T5's span corruption (arXiv 1910.10683, §3.1.4): replace random spans of the input by sentinel
tokens and train the model to output each sentinel followed by the span it hides.

``noise_density`` is the share of tokens hidden and ``mean_span`` the mean span length (T5: 0.15 and
3; ByT5, arXiv 2105.13626: 0.15 and 20 bytes). The number of hidden tokens is round(L · density)
and the number of spans round(hidden / mean_span), both at least 1; hidden and kept tokens are each
cut into that many non-empty runs at random, and the runs alternate, kept first, as in T5's
``random_spans_noise_mask``.
"""

from __future__ import annotations

import random


def _segments(total: int, parts: int, rng: random.Random) -> list[int]:
    """``total`` items cut into ``parts`` non-empty runs at uniformly random places."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def noise_spans(length: int, *, noise_density: float, mean_span: float, rng: random.Random) -> list[tuple[int, int]]:
    """(start, end) of the hidden spans of a sequence of ``length`` tokens, in order."""
    if length < 2:
        raise ValueError("span corruption needs at least two tokens.")
    if not 0.0 < noise_density < 1.0 or mean_span <= 0:
        raise ValueError("noise_density must be in (0, 1) and mean_span positive.")
    hidden = min(max(1, round(length * noise_density)), length - 1)
    spans = min(max(1, round(hidden / mean_span)), hidden, length - hidden)
    noise, kept = _segments(hidden, spans, rng), _segments(length - hidden, spans, rng)
    out, at = [], 0
    for k, n in zip(kept, noise):
        at += k
        out.append((at, at + n))
        at += n
    return out


def corrupt_spans(
    tokens: list[int], sentinels: list[int], *, noise_density: float = 0.15, mean_span: float = 3.0,
    rng: random.Random, eos: int | None = None,
) -> tuple[list[int], list[int]]:
    """(inputs, targets): inputs keep the text with each hidden span replaced by the next sentinel;
    targets list each sentinel followed by the tokens it replaced (then ``eos`` if given)."""
    spans = noise_spans(len(tokens), noise_density=noise_density, mean_span=mean_span, rng=rng)
    if len(spans) > len(sentinels):
        raise ValueError(f"{len(spans)} spans need as many sentinel tokens; only {len(sentinels)} were given.")
    inputs: list[int] = []
    targets: list[int] = []
    prev = 0
    for sentinel, (a, b) in zip(sentinels, spans):
        inputs += tokens[prev:a] + [sentinel]
        targets += [sentinel] + tokens[a:b]
        prev = b
    inputs += tokens[prev:]
    if eos is not None:
        inputs.append(eos)
        targets.append(eos)
    return inputs, targets


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """Undo ``corrupt_spans``: put each sentinel's span back in place (the inverse, for checks)."""
    where = {s: i for i, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets:
        if t in where:
            current = t
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs:
        out += spans.get(t, []) if t in where else [t]
    return out
