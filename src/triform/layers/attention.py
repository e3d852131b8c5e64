"""Multi-head attention with separate query and key/value head counts (MHA, GQA, MQA), self or cross."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from triform.config import StackConfig
from triform.layers.hooks import HookScope, hook
from triform.layers.kernels import BACKENDS, repeat_kv
from triform.layers.position import RotaryEmbedding


@dataclass
class AttentionInputs:
    """What every attention layer of one forward pass shares, computed once by the model.

    ``rope`` holds (cos, sin) tables for the query positions, ``mask`` is boolean
    (B|1, 1, Tq, Tk) or None, ``bias`` additive (B|1, H, Tq, Tk) or None, ``cache`` an object
    with ``update(layer, k, v) -> (k_all, v_all)`` (see triform.layers.cache), or for cross-attention
    a dict that keeps each layer's memory keys/values after their first use. ``attend``, when
    set, replaces cache update + kernel: ``attend(layer, q, k, v, kernel) -> output`` (a cache that
    runs attention itself, such as the paged engine's packed step).
    """

    mask: Tensor | None = None
    is_causal: bool = False
    bias: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    cache: object | None = None
    attend: Callable[..., Tensor] | None = None


class Attention(nn.Module):
    """Scaled dot-product attention over ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads.

    Self-attention uses one fused q/k/v projection (a single matmul); cross-attention projects
    queries from ``x`` and keys/values from ``memory``.
    """

    def __init__(self, cfg: StackConfig, layer_idx: int, *, cross: bool = False) -> None:
        super().__init__()
        assert cfg.head_dim is not None and cfg.n_kv_heads is not None
        self.layer_idx = layer_idx
        self.cross = cross
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if cross:
            self.q = nn.Linear(cfg.d_model, q_out, bias=cfg.bias)
            self.kv = nn.Linear(cfg.d_model, 2 * kv_out, bias=cfg.bias)
        else:
            self.qkv = nn.Linear(cfg.d_model, q_out + 2 * kv_out, bias=cfg.bias)
        self.o = nn.Linear(q_out, cfg.d_model, bias=cfg.bias)
        self.dropout_p = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kernel = BACKENDS[cfg.attention]
        self.scale: float | None = None if cfg.scale_attention else 1.0

    def _heads(self, x: Tensor, n: int) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, Dh)

    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def _forward_hooked(self, x: Tensor, inputs: AttentionInputs, memory: Tensor | None) -> Tensor:
        """``forward`` passing the hook points: q, k, v per head (before and after rotary positions),
        the scores and pattern (computed explicitly only when a hook asks for them), each head's
        output z before W_O."""
        if inputs.attend is not None:
            raise ValueError("hooks do not run through the paged engine's packed attention; run the model itself.")
        name = "cross_attn." if self.cross else "attn."
        b, t, _ = x.shape
        as_heads = lambda y: y.transpose(1, 2)  # noqa: E731  (B, n, T, Dh) <-> (B, T, n, Dh)
        if self.cross:
            assert memory is not None, "cross-attention needs encoder memory"
            q = self.q(x).view(b, t, self.n_heads, self.head_dim)
            k, v = (z.view(memory.shape[0], memory.shape[1], self.n_kv_heads, self.head_dim)
                    for z in self.kv(memory).chunk(2, dim=-1))
        else:
            q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv(x).split((q_out, kv_out, kv_out), dim=-1)
            q = q.view(b, t, self.n_heads, self.head_dim)
            k, v = (z.view(b, t, self.n_kv_heads, self.head_dim) for z in (k, v))
        q, k, v = (hook(self, f"{name}hook_{n}", y) for n, y in (("q", q), ("k", k), ("v", v)))
        q, k, v = as_heads(q), as_heads(k), as_heads(v)
        if not self.cross and inputs.rope is not None:
            cos, sin = inputs.rope
            q = as_heads(hook(self, f"{name}hook_rot_q", as_heads(RotaryEmbedding.rotate(q, cos, sin))))
            k = as_heads(hook(self, f"{name}hook_rot_k", as_heads(RotaryEmbedding.rotate(k, cos, sin))))
        if not self.cross and inputs.cache is not None:
            k, v = inputs.cache.update(self.layer_idx, k, v)
        scope = self._hook_scope
        assert scope is not None
        if scope.wants(f"{name}hook_attn_scores") or scope.wants(f"{name}hook_pattern"):
            groups = self.n_heads // self.n_kv_heads
            kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
            scale = 1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale
            scores = torch.matmul(q, kk.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
            if inputs.bias is not None:
                scores = scores + inputs.bias
            mask = inputs.mask
            if inputs.is_causal:
                mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            scores = hook(self, f"{name}hook_attn_scores", scores)
            pattern = hook(self, f"{name}hook_pattern", torch.softmax(scores.float(), dim=-1).to(q.dtype))
            y = torch.matmul(pattern, vv)
        else:
            y = self.kernel(q, k, v, mask=inputs.mask, bias=inputs.bias, is_causal=inputs.is_causal,
                            dropout_p=self.dropout_p if self.training else 0.0, scale=self.scale)
        z = hook(self, f"{name}hook_z", as_heads(y))  # (B, T, H, Dh)
        return self.resid_dropout(self.o(z.reshape(b, t, self.n_heads * self.head_dim)))

    def forward(self, x: Tensor, inputs: AttentionInputs, memory: Tensor | None = None) -> Tensor:
        if self._hook_scope is not None:
            return self._forward_hooked(x, inputs, memory)
        b, t, _ = x.shape
        if self.cross:
            assert memory is not None, "cross-attention needs encoder memory"
            q = self._heads(self.q(x), self.n_heads)
            cached = inputs.cache.get(self.layer_idx) if isinstance(inputs.cache, dict) else None
            if cached is None:  # memory keys/values: computed once per request when a dict cache is given
                k, v = (self._heads(z, self.n_kv_heads) for z in self.kv(memory).chunk(2, dim=-1))
                if isinstance(inputs.cache, dict):
                    inputs.cache[self.layer_idx] = (k, v)
            else:
                k, v = cached
        else:
            q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            if inputs.rope is not None:  # q and k rotated together, straight from the projection
                qk, v = self.qkv(x).split((q_out + kv_out, kv_out), dim=-1)
                cos, sin = inputs.rope
                q, k = RotaryEmbedding.rotate_qk(qk.unflatten(-1, (-1, self.head_dim)), cos, sin, self.n_heads)
                v = self._heads(v, self.n_kv_heads)
            else:
                q, k, v = self.qkv(x).split((q_out, kv_out, kv_out), dim=-1)
                q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
            if inputs.attend is not None:
                y = inputs.attend(self.layer_idx, q, k, v, self.kernel)  # (B, Hq, Tq, Dh)
                return self.resid_dropout(self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)))
            if inputs.cache is not None:
                k, v = inputs.cache.update(self.layer_idx, k, v)  # (B, Hkv, Tk, Dh)
        y = self.kernel(
            q, k, v, mask=inputs.mask, bias=inputs.bias, is_causal=inputs.is_causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.scale,
        )  # (B, Hq, Tq, Dh)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.resid_dropout(self.o(y))
