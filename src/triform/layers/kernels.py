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

from triform.layers.position import alibi_bias


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


class PagedAttentionPlan:
    """Attention straight from a paged KV store, planned once per forward and run for every layer.

    Keys/values live in pages ``(num_blocks, Hkv, block_size, Dh)``; row b's block table
    ``tables[b]`` lists its pages in order (a negative entry: no page, e.g. freed by a sliding
    window), so position p sits in page ``tables[b, p // block_size]`` at slot ``p % block_size``.
    A query at position q sees keys at positions <= q (and > q - window). Keys are visited in fixed
    partitions of ``partition_blocks`` pages with an online softmax, the PagedAttention kernel's
    scheme (arXiv 2309.06180) written in torch ops; each partition gathers only the rows that can
    see into it (rows are visited longest first, so those rows are one contiguous slice). Pages are
    gathered along their leading dimension, which streams whole pages: on CPU it ran an order of
    magnitude faster than gathering along an inner dimension.

    Every partition a row takes part in has the same shape whatever the other rows hold, and the
    batched products treat rows independently, so a row's output is bit-for-bit the same alone or in
    any batch: this is what makes greedy decoding batch invariant.
    """

    def __init__(
        self, tables: Tensor, q_pos: Tensor, *, block_size: int, groups: int, window: int | None = None,
        alibi_slopes: Tensor | None = None, partition_blocks: int = 8,
    ) -> None:
        b, tq = q_pos.shape
        pb, span = partition_blocks, partition_blocks * block_size
        last = q_pos.max(dim=1).values  # (B,) the furthest position each row's queries reach
        first = q_pos.clamp(min=0).min(dim=1).values
        order = torch.argsort(last, descending=True, stable=True)
        self.order = order
        self.inverse = torch.argsort(order)
        tables, q_pos, last, first = tables[order], q_pos[order], last[order], first[order]
        n_parts = max(1, -(-tables.shape[1] // pb))
        tables = F.pad(tables, (0, n_parts * pb - tables.shape[1]), value=-1)  # (B, parts·pb)
        qp = q_pos[:, None, :].expand(b, groups, tq).reshape(b, 1, groups * tq, 1)  # query row r = g·Tq + t
        last_list, first_list = last.tolist(), first.tolist()
        self.parts: list[tuple[int, int, Tensor, Tensor, Tensor | None]] = []
        for j in range(n_parts):
            lo_pos, hi_pos = j * span, (j + 1) * span
            # Rows whose queries reach this partition: a prefix of the longest-first order ...
            hi = sum(p >= lo_pos for p in last_list)
            # ... minus those whose window has moved past it: a leading run of that prefix.
            lo = 0
            while window is not None and lo < hi and first_list[lo] - window + 1 >= hi_pos:
                lo += 1
            if lo >= hi:
                continue
            pages = tables[lo:hi, j * pb : (j + 1) * pb]  # (Bj, pb)
            k_pos = torch.arange(lo_pos, hi_pos, device=tables.device)  # (P,)
            allowed = (pages >= 0).repeat_interleave(block_size, dim=1)[:, None, None, :]  # (Bj, 1, 1, P)
            allowed = allowed & (k_pos <= qp[lo:hi])  # (Bj, 1, g·Tq, P)
            if window is not None:
                allowed = allowed & (k_pos > qp[lo:hi] - window)
            bias = None
            if alibi_slopes is not None:
                bias = alibi_bias(alibi_slopes, q_pos[lo:hi], k_pos[None])  # (Bj, H, Tq, P)
                bias = bias.reshape(hi - lo, -1, groups * tq, span)  # (Bj, Hkv, g·Tq, P), heads grouped like q
            self.parts.append((lo, hi, pages.clamp(min=0).flatten(), ~allowed, bias))

    def __call__(self, q: Tensor, k_pages: Tensor, v_pages: Tensor, *, scale: float | None = None) -> Tensor:
        """q (B, H, Tq, Dh) -> (B, H, Tq, Dh)."""
        b, h, tq, dh = q.shape
        hkv, bs = k_pages.shape[1], k_pages.shape[2]
        g = h // hkv
        scale = dh**-0.5 if scale is None else scale
        qg = (q[self.order] * scale).reshape(b, hkv, g * tq, dh)  # query head i·g + j uses key/value head i
        m = torch.full((b, hkv, g * tq, 1), float("-inf"), device=q.device)
        denom = torch.zeros((b, hkv, g * tq, 1), device=q.device)
        acc = torch.zeros((b, hkv, g * tq, dh), device=q.device)
        for lo, hi, pages, hidden, bias in self.parts:
            bj, span = hi - lo, pages.numel() // (hi - lo) * bs

            def gather(store: Tensor) -> Tensor:  # (Bj, Hkv, P, Dh)
                pieces = torch.index_select(store, 0, pages).view(bj, -1, hkv, bs, dh)
                return pieces.transpose(1, 2).reshape(bj, hkv, span, dh)

            keys, values = gather(k_pages), gather(v_pages)
            s = torch.matmul(qg[lo:hi], keys.transpose(-2, -1)).float()  # (Bj, Hkv, g·Tq, P)
            if bias is not None:
                s = s + bias
            s.masked_fill_(hidden, float("-inf"))
            m_old = m[lo:hi]
            m_new = torch.maximum(m_old, s.amax(dim=-1, keepdim=True))
            ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # nothing seen yet: any finite reference
            p = s.sub_(ref).exp_()
            carry = torch.exp(m_old - ref)
            denom[lo:hi] = denom[lo:hi] * carry + p.sum(dim=-1, keepdim=True)
            acc[lo:hi] = acc[lo:hi] * carry + torch.matmul(p.to(values.dtype), values).float()
            m[lo:hi] = m_new
        out = acc / denom.clamp(min=torch.finfo(denom.dtype).tiny)  # a query that sees nothing gives 0
        return out.reshape(b, h, tq, dh)[self.inverse].to(q.dtype)


def paged_attention(
    q: Tensor, k_pages: Tensor, v_pages: Tensor, tables: Tensor, q_pos: Tensor, *,
    window: int | None = None, alibi_slopes: Tensor | None = None, scale: float | None = None,
    partition_blocks: int = 8,
) -> Tensor:
    """Attention of q (B, H, Tq, Dh) at positions q_pos (B, Tq) over paged keys/values
    (num_blocks, Hkv, block_size, Dh) through block tables (B, n); see ``PagedAttentionPlan``."""
    plan = PagedAttentionPlan(
        tables, q_pos, block_size=k_pages.shape[2], groups=q.shape[1] // k_pages.shape[1], window=window,
        alibi_slopes=alibi_slopes, partition_blocks=partition_blocks,
    )
    return plan(q, k_pages, v_pages, scale=scale)


BACKENDS: dict[str, Callable[..., Tensor]] = {"reference": reference_attention, "sdpa": sdpa_attention}
