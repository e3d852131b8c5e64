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
    """``down(act(up(x)))``, or for gated kinds ``down(act(gate(x)) * up(x))`` (arXiv 2002.05202)."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None
        self.gated = cfg.ffn in ("swiglu", "geglu")
        self.act = _ACTIVATIONS[cfg.ffn]
        if self.gated:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))  # (B, T, d_ff)
        return self.dropout(self.down(h))
