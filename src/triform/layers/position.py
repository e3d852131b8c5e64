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
        """Rotate x (B, H, T, Dh) by the angles in cos/sin (B, 1, T, Dh/2)."""
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


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
