"""Attention backends behind one signature.

``attend(q, k, v, mask=..., bias=..., is_causal=..., dropout_p=..., scale=...)`` with
q (B, Hq, Tq, Dh), k and v (B, Hkv, Tk, Dh), ``mask`` boolean (B|1, 1, Tq, Tk) with True where
attention is allowed, ``bias`` additive (B|1, H, Tq, Tk). ``is_causal`` may only be set when
Tq == Tk, positions are aligned and there is no other mask: it lets SDPA pick its fused causal kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class AttentionKernel(Protocol):
    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, bias: Tensor | None,
        is_causal: bool, dropout_p: float, scale: float | None,
    ) -> Tensor: ...


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Expand key/value heads (B, Hkv, T, Dh) to (B, Hkv·groups, T, Dh) for grouped-query attention."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None,
    is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
) -> Tensor:
    """Eager softmax(q kᵀ · scale + bias, masked) v, written out step by step: the test oracle."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias
    if is_causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)  # (B, H, Tq, Dh)


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None,
    is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None,
) -> Tensor:
    """torch ``scaled_dot_product_attention``; boolean mask and additive bias folded into one mask."""
    attn_mask: Tensor | None = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
        elif is_causal:
            tq, tk = q.shape[-2], k.shape[-2]
            causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    # enable_gqa lets SDPA broadcast key/value heads itself instead of materialising copies.
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


BACKENDS: dict[str, Callable[..., Tensor]] = {"reference": reference_attention, "sdpa": sdpa_attention}
