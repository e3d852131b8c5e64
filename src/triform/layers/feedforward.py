"""Position-wise feed-forward networks: a plain two-layer MLP or a gated one (SwiGLU, GeGLU)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from triform.config import StackConfig

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


class FeedForward(nn.Module):
    """``down(act(up(x)))``, or for gated kinds ``down(act(x W_gate) * x W_up)`` (arXiv 2002.05202)."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None
        self.gated = cfg.ffn in ("swiglu", "geglu")
        self.act = _ACTIVATIONS[cfg.ffn]
        # Gated kinds fuse gate and up projections into one matmul: rows [0, d_ff) gate, [d_ff, 2·d_ff) up.
        self.up = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up  # (B, T, d_ff)
        else:
            h = self.act(h)
        return self.dropout(self.down(h))
