"""Token streams for language-model training: random windows for training, fixed windows for eval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from triform.data.corpus import Document
from triform.tokenizers.base import Tokenizer

DOC_SEPARATOR = b"\n\n"


def tokenize_documents(tokenizer: Tokenizer, docs: Sequence[Document]) -> Tensor:
    """One long id stream (1-D int64) of the documents joined by a blank line."""
    arrays = [tokenizer.encode_array(d.text if i == len(docs) - 1 else d.text + DOC_SEPARATOR) for i, d in enumerate(docs)]
    return torch.from_numpy(np.concatenate(arrays).astype(np.int64))


def random_batch(ids: Tensor, batch: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random windows: inputs (B, T) and next-token targets (B, T) (nanoGPT's sampler)."""
    starts = torch.randint(0, ids.numel() - context - 1, (batch,), generator=generator)
    offsets = torch.arange(context + 1)
    windows = ids[starts[:, None] + offsets]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(ids: Tensor, context: int, max_tokens: int | None) -> Tensor:
    """Non-overlapping (context+1)-token windows covering the stream, or an evenly spaced subset of
    them scoring about ``max_tokens`` targets; deterministic, so every evaluation sees the same text."""
    n = (ids.numel() - 1) // context
    starts = torch.arange(n) * context
    if max_tokens is not None and n * context > max_tokens:
        keep = max(1, max_tokens // context)
        starts = starts[torch.linspace(0, n - 1, keep).round().long()]
    return ids[starts[:, None] + torch.arange(context + 1)]  # (N, T+1)
