"""Position-wise feed-forward networks: a plain two-layer MLP or a gated one (SwiGLU, GeGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.config import StackConfig
from triform.layers.hooks import HookScope, hook

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's approximation (arXiv 2103.00020)
    "relu": F.relu,
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


class _GatedActivation(torch.autograd.Function):
    """h = [gate, up] (..., 2·d_ff) -> act(gate) · up, the two halves of one fused projection.

    The same operations as ``act(gate) * up`` in both directions; the backward writes the gradients
    of both halves straight into one (..., 2·d_ff) buffer instead of concatenating two of them.
    ``approximate`` is None for SiLU, else GELU's approximation ("tanh")."""

    @staticmethod
    def forward(ctx, h: Tensor, approximate: str | None) -> Tensor:  # type: ignore[override]
        ff = h.shape[-1] // 2
        gate, up = h[..., :ff], h[..., ff:]
        a = F.silu(gate) if approximate is None else F.gelu(gate, approximate=approximate)
        ctx.save_for_backward(h, a)
        ctx.approximate = approximate
        return a * up

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        h, a = ctx.saved_tensors
        ff = h.shape[-1] // 2
        gate, up = h[..., :ff], h[..., ff:]
        grad = torch.empty_like(h)
        torch.mul(g, a, out=grad[..., ff:])  # d up
        if ctx.approximate is None:  # d gate = act'(gate) · g · up
            torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=grad[..., :ff])
        else:
            torch.ops.aten.gelu_backward.grad_input(g * up, gate, approximate=ctx.approximate, grad_input=grad[..., :ff])
        return grad, None


_GATED = {"swiglu": None, "geglu": "tanh"}  # activation of the gate: SiLU, or GELU (tanh approximation)


class FeedForward(nn.Module):
    """``down(act(up(x)))``, or for gated kinds ``down(act(x W_gate) * x W_up)`` (arXiv 2002.05202)."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None
        self.gated = cfg.ffn in _GATED
        self.approximate = _GATED.get(cfg.ffn)
        self.act = _ACTIVATIONS[cfg.ffn]
        # Gated kinds fuse gate and up projections into one matmul: rows [0, d_ff) gate, [d_ff, 2·d_ff) up.
        self.up = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def _forward_hooked(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.gated:
            ff = h.shape[-1] // 2
            gate = hook(self, "mlp.hook_pre", h[..., :ff])
            up = hook(self, "mlp.hook_pre_linear", h[..., ff:])
            a = F.silu(gate) if self.approximate is None else F.gelu(gate, approximate=self.approximate)
            h = a * up
        else:
            h = self.act(hook(self, "mlp.hook_pre", h))
        return self.dropout(self.down(hook(self, "mlp.hook_post", h)))

    def forward(self, x: Tensor) -> Tensor:
        if self._hook_scope is not None:
            return self._forward_hooked(x)
        h = self.up(x)
        if self.gated:
            h = _GatedActivation.apply(h, self.approximate)  # act(gate) * up, (B, T, d_ff)
        else:
            h = self.act(h)
        return self.dropout(self.down(h))
