"""Normalisation layers: LayerNorm (with optional bias) and RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.config import NormKind


class _RMSNorm(torch.autograd.Function):
    """y = x · rstd · w with rstd = 1 / sqrt(mean(x²) + eps), in three passes forward (one norm
    reduction, two products) and a hand-written backward:
        dx = rstd · (g·w - x̂ · mean(g·w · x̂)),  dw = Σ_rows g · x̂,  x̂ = x · rstd,
    where ``F.rms_norm`` runs its decomposition (pow, mean, add, rsqrt, mul, mul) and autograd's
    backward through each of them. Same function up to float rounding."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        d = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()
        xhat = x * rstd
        ctx.save_for_backward(xhat, weight, rstd)
        return xhat * weight

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xhat, weight, rstd = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gw = g * weight
            dot = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).div_(-xhat.shape[-1])
            dx = torch.addcmul(gw, xhat, dot).mul_(rstd)
        if ctx.needs_input_grad[1]:
            dw = (g * xhat).flatten(0, -2).sum(0)
        return dx, dw, None


class RMSNorm(nn.Module):
    """Root-mean-square norm (arXiv 1910.07467): x / rms(x) · g, no centring and no bias.

    In float32 without autocast it runs a fused autograd function (``_RMSNorm``); otherwise
    ``F.rms_norm``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return _RMSNorm.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: NormKind, dim: int, eps: float, bias: bool) -> nn.Module:
    """A LayerNorm (bias optional) or an RMSNorm of width ``dim``."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)
