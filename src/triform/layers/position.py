"""Positional information: learned and sinusoidal absolute embeddings, RoPE, ALiBi.

Absolute embeddings are added to the token embeddings; RoPE rotates queries and keys inside
attention; ALiBi adds a per-head linear distance penalty to the attention scores. All of them are
driven by explicit token positions (B, T), so caches and left padding need no special cases.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LearnedPositions(nn.Module):
    """A trainable (max_seq_len, d) table looked up by position (GPT-2, BERT)."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: Tensor) -> Tensor:
        return self.weight[positions.clamp(min=0)]  # (B, T, d)


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine embeddings of "Attention Is All You Need" (arXiv 1706.03762, §3.5)."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        pos = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
        inv = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
        table = torch.zeros(max_seq_len, d_model, dtype=torch.float64)
        table[:, 0::2] = torch.sin(pos * inv)
        table[:, 1::2] = torch.cos(pos * inv)[:, : d_model // 2]
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions.clamp(min=0)]  # (B, T, d)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, arXiv 2104.09864) in the half-split layout of GPT-NeoX/Llama.

    The dot product of a rotated query at position m and key at position n depends only on m - n,
    which is what makes RoPE relative.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._build(max_seq_len)

    def _build(self, length: int) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (L, Dh/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin for ``positions`` (B, T), each (B, 1, T, Dh/2), computed once per forward."""
        positions = positions.clamp(min=0)
        needed = int(positions.max()) + 1  # one host sync per forward, shared by every layer
        if needed > self.cos.shape[0]:
            self._build(needed)
            self.to(positions.device)
        return self.cos[positions][:, None], self.sin[positions][:, None]

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate x (B, H, T, Dh) by the angles in cos/sin (B, 1, T, Dh/2): with x = [x1, x2] split in
        halves, [x1·cos - x2·sin, x2·cos + x1·sin] (HF's ``q·cos + rotate_half(q)·sin``)."""
        return _Rotate.apply(x, cos.to(x.dtype), sin.to(x.dtype))

    @staticmethod
    def rotate_qk(qk: Tensor, cos: Tensor, sin: Tensor, n_q: int) -> tuple[Tensor, Tensor]:
        """Rotate the query and key heads of one projection in a single pass: qk (B, T, n_q + n_k, Dh)
        (any strides, e.g. a slice of a fused q/k/v projection), cos/sin (B, 1, T, Dh/2) as from
        ``tables``. Returns q (B, n_q, T, Dh) and k (B, n_k, T, Dh), transposed views of one buffer."""
        cos, sin = cos.to(qk.dtype).transpose(1, 2), sin.to(qk.dtype).transpose(1, 2)  # (B, T, 1, Dh/2)
        q, k = _RotateSplit.apply(qk, cos, sin, n_q)
        return q.transpose(1, 2), k.transpose(1, 2)


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> None:
    """out = R x (or Rᵀ x with ``inverse``), R rotating the pairs (x1[i], x2[i]) of the two halves of
    the last dimension by the angles of cos/sin (broadcast): four elementwise kernels writing straight
    into ``out``'s halves, no concatenation and no temporaries."""
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    s = 1.0 if inverse else -1.0
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=s)  # forward: x1·cos - x2·sin; inverse: x1·cos + x2·sin
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=-s)  # forward: x2·cos + x1·sin; inverse: x2·cos - x1·sin


class _Rotate(torch.autograd.Function):
    """x -> R x; the gradient is Rᵀ g (a rotation by the opposite angles)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # type: ignore[override]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rotate_into(out, x, cos, sin)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        gx = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        _rotate_into(gx, g, cos, sin, inverse=True)
        return gx, None, None


class _RotateSplit(torch.autograd.Function):
    """qk (B, T, n, Dh) -> (R qk[:, :, :n_q], R qk[:, :, n_q:]); the backward writes both gradients
    into one (B, T, n, Dh) buffer, so no concatenation either way."""

    @staticmethod
    def forward(ctx, qk: Tensor, cos: Tensor, sin: Tensor, n_q: int):  # type: ignore[override]
        out = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
        _rotate_into(out, qk, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.n_q = n_q
        return out[:, :, :n_q], out[:, :, n_q:]

    @staticmethod
    def backward(ctx, gq: Tensor, gk: Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        n_q = ctx.n_q
        b, t, _, dh = gq.shape
        g = torch.empty((b, t, n_q + gk.shape[2], dh), dtype=gq.dtype, device=gq.device)
        _rotate_into(g[:, :, :n_q], gq, cos, sin, inverse=True)
        _rotate_into(g[:, :, n_q:], gk, cos, sin, inverse=True)
        return g, None, None, None


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head slopes of ALiBi (arXiv 2108.12409): a geometric sequence starting at 2^(-8/n)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))  # the paper's recipe for other head counts
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


class ALiBi(nn.Module):
    """Attention with Linear Biases: score(q, k) -= slope_h · |pos_q - pos_k|."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return alibi_bias(self.slopes, q_pos, k_pos)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """-slope_h · |q - k| for query positions (B|1, Tq) and key positions (B|1, Tk): (B|1, H, Tq, Tk)."""
    dist = (q_pos[..., :, None] - k_pos[..., None, :]).abs().float()  # (B|1, Tq, Tk)
    return -slopes[:, None, None] * dist[:, None]


def t5_bucket(relative: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position (key - query): exact buckets for small distances,
    logarithmically wider ones up to ``max_distance``; bidirectional buckets split by direction,
    causal ones see only the past (arXiv 1910.10683, §2.1)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    log_scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    large = (exact + log_scaled.long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class T5RelativeBias(nn.Module):
    """A learned scalar per (bucket, head) added to attention scores; computed once per forward and
    shared by every layer of a stack (T5's first layer owns the table)."""

    def __init__(self, n_heads: int, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> None:
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.weight = nn.Parameter(torch.zeros(num_buckets, n_heads))

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bias (B|1, H, Tq, Tk) for query positions (B|1, Tq) and key positions (B|1, Tk)."""
        relative = k_pos[..., None, :] - q_pos[..., :, None]  # (B|1, Tq, Tk)
        bucket = t5_bucket(relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                           max_distance=self.max_distance)
        return self.weight[bucket].permute(0, 3, 1, 2)  # (B|1, H, Tq, Tk)
