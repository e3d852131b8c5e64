"""Attention masks as small composable predicates over query and key positions.

A mask function takes query positions ``q`` of shape (B|1, Tq) and key positions ``k`` of shape
(B|1, Tk) and returns a boolean tensor (B|1, Tq, Tk) that is True where the query may attend.
Positions are absolute token positions; a key slot holding no token (left padding, an empty cache
slot) has position -1. Working on positions rather than indices is what lets one expression serve
training, left-padded batches, contiguous caches and rolling caches alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MaskFn = Callable[[Tensor, Tensor], Tensor]


def causal() -> MaskFn:
    """A query sees keys at its own position or earlier."""
    return lambda q, k: k[..., None, :] <= q[..., :, None]


def sliding_window(window: int) -> MaskFn:
    """A query at position p sees keys at positions p-window+1 .. p (Mistral, arXiv 2310.06825)."""
    return lambda q, k: (q[..., :, None] - k[..., None, :]) < window


def valid_keys() -> MaskFn:
    """Keys that hold a real token (position >= 0); this is the padding mask."""
    return lambda q, k: (k >= 0)[..., None, :].expand(*k.shape[:-1], q.shape[-1], k.shape[-1])


def and_masks(*fns: MaskFn) -> MaskFn:
    """The conjunction of several mask functions."""

    def combined(q: Tensor, k: Tensor) -> Tensor:
        out = fns[0](q, k)
        for fn in fns[1:]:
            out = out & fn(q, k)
        return out

    return combined


def or_masks(*fns: MaskFn) -> MaskFn:
    """The disjunction of several mask functions."""

    def combined(q: Tensor, k: Tensor) -> Tensor:
        out = fns[0](q, k)
        for fn in fns[1:]:
            out = out | fn(q, k)
        return out

    return combined


def prefix_visible(prefix_lengths: Tensor) -> MaskFn:
    """Keys inside each row's prefix (positions 0 .. P-1, P from ``prefix_lengths`` (B,)) are seen by
    every query of that row: with ``or_masks(decoder_mask(...), prefix_visible(P))`` the prefix is
    attended bidirectionally and the rest causally (prefix-LM, arXiv 1910.10683 §3.2.1)."""
    p = prefix_lengths[:, None]  # (B, 1)
    return lambda q, k: ((k >= 0) & (k < p))[..., None, :].expand(*k.shape[:-1], q.shape[-1], k.shape[-1])


def materialize(fn: MaskFn, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Evaluate ``fn`` into a boolean mask of shape (B|1, 1, Tq, Tk) ready for attention.

    Rows in which no key is allowed (a padding query) are opened fully: their output is ignored
    downstream, and an all-masked softmax row would otherwise produce NaNs.
    """
    mask = fn(q_pos, k_pos)  # (B|1, Tq, Tk)
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None]  # (B|1, 1, Tq, Tk)


def decoder_mask(window: int | None) -> MaskFn:
    """The decoder's mask: causal, padding-aware, optionally limited to a sliding window."""
    fns = [causal(), valid_keys()]
    if window is not None:
        fns.append(sliding_window(window))
    return and_masks(*fns)


def positions_from_padding(attention_mask: Tensor, offset: Tensor | int = 0) -> Tensor:
    """Positions (B, T) for a padded batch: real tokens count up from ``offset``, padding gets -1."""
    attention_mask = attention_mask.bool()
    pos = torch.cumsum(attention_mask.long(), dim=-1) - 1
    if isinstance(offset, Tensor):
        offset = offset[:, None]
    return torch.where(attention_mask, pos + offset, torch.full_like(pos, -1))
