"""Semantic search over passages: split texts into passages, embed them once, rank by cosine.

An index is two files in a folder: ``vectors.npy`` (N, d) float32 unit vectors and
``passages.jsonl`` (one {"source", "text"} object per line, same order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from triform.data.passages import split_passages
from triform.errors import DataError
from triform.inference.embed import SentenceEncoder


@dataclass
class Hit:
    score: float
    source: str
    text: str


class PassageIndex:
    """Unit vectors of passages and their texts; ``search`` ranks them against a query."""

    def __init__(self, vectors: torch.Tensor, passages: list[tuple[str, str]]) -> None:
        if vectors.shape[0] != len(passages):
            raise DataError(f"the index holds {vectors.shape[0]} vectors but {len(passages)} passages.")
        self.vectors, self.passages = vectors.float(), passages

    @classmethod
    def build(
        cls, encoder: SentenceEncoder, documents: list[tuple[str, str]], *, max_chars: int = 600, batch_size: int = 32,
    ) -> PassageIndex:
        """Split each (source, text) document into passages and embed them all."""
        passages = [(src, p) for src, text in documents for p in split_passages(text, max_chars=max_chars)]
        if not passages:
            raise DataError("the corpus yields no passages to index.")
        return cls(encoder.embed([p for _, p in passages], batch_size=batch_size), passages)

    def search(self, encoder: SentenceEncoder, query: str, *, k: int = 5) -> list[Hit]:
        """The ``k`` passages most similar to ``query`` (cosine of unit vectors), best first."""
        if not query.strip():
            raise DataError("the query is empty.")
        q = encoder.embed([query])[0]
        scores = self.vectors @ q  # (N,)
        top = torch.topk(scores, min(k, len(self.passages)))
        return [Hit(float(s), *self.passages[int(i)]) for s, i in zip(top.values, top.indices)]

    def save(self, folder: Path | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "vectors.npy", self.vectors.numpy())
        with open(folder / "passages.jsonl", "w", encoding="utf-8") as f:
            for src, text in self.passages:
                f.write(json.dumps({"source": src, "text": text}, ensure_ascii=False) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> PassageIndex:
        folder = Path(folder)
        try:
            vectors = torch.from_numpy(np.load(folder / "vectors.npy"))
            lines = (folder / "passages.jsonl").read_text(encoding="utf-8").splitlines()
            passages = [(d["source"], d["text"]) for d in map(json.loads, lines)]
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{folder} is not a readable search index ({type(exc).__name__}).") from None
        return cls(vectors, passages)
