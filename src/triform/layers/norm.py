"""Normalisation layers: LayerNorm (with optional bias) and RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.config import NormKind


class RMSNorm(nn.Module):
    """Root-mean-square norm (arXiv 1910.07467): x / rms(x) · g, no centring and no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: NormKind, dim: int, eps: float, bias: bool) -> nn.Module:
    """A LayerNorm (bias optional) or an RMSNorm of width ``dim``."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)
