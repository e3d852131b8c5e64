"""Inference weight layouts and weight-only low precision: functions applied to a model, not flags
inside layers.

``quantize_weights(model, "float32")`` keeps float32 but stores each linear weight transposed,
(in, out) row-major: a single-row matmul then streams the weight in its memory order, which measured
~1.4x faster than torch's (out, in) layout for batch-1 decoding on the development CPU.
``quantize_weights(model, "int8")`` stores every linear layer's weight as int8 with one float32
scale per output row (symmetric, absmax) and runs the packed int8 kernels with activations quantized
per call; ``"int8-weight-only"`` keeps activations float32 and uses torch's int8 weight-packed
matmul; ``"bf16"`` stores weights in bfloat16. Activations stay float32 at layer boundaries. Batch-1
decoding reads every weight once per token, so it is bound by memory traffic, which smaller weights
cut; benchmarks/decode_smollm2.py measures which mode pays off on the machine at hand.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WeightMode = Literal["float32", "int8", "int8-weight-only", "bf16"]  # float32: the decode-friendly transposed layout


class DecodeLinear(nn.Module):
    """y = x W_t (+ b) with W_t = Wᵀ stored contiguous as (in, out)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().float().t().contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def _int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization with one float32 scale per output row."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


@functools.cache
def _cpu_has_vnni() -> bool:
    """Whether the CPU multiplies int8 with VNNI, so the packed kernels need no reduced range."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class Int8Linear(nn.Module):
    """Int8 weights (per output row) with activations quantized to int8 on the fly for each call,
    multiplied by fbgemm/oneDNN's packed int8 kernels (VNNI where the CPU has it)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = _int8_rows(linear.weight.detach().float())
        self.out_features = q.shape[0]
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():  # torch flags its eager quantization API as moving to torchao
            warnings.simplefilter("ignore")
            zeros = torch.zeros_like(scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        self.reduce_range = not _cpu_has_vnni()

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        # Without VNNI, reduce_range keeps products inside int16 (fbgemm's advice) at some accuracy cost.
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), self._packed, self.reduce_range)
        return y.reshape(*shape[:-1], self.out_features)


class Int8WeightOnlyLinear(nn.Module):
    """y = x Wᵀ·s (+ b) with W int8 (out, in) and s float32 (out,): torch's int8 weight-packed matmul,
    activations stay float32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = _int8_rows(linear.weight.detach().float())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).float().contiguous(), self.weight, self.scale)
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class BF16Linear(nn.Module):
    """A linear layer whose weight is stored in bfloat16; inputs are cast and outputs returned in float32.
    Many-row inputs (prefill) use a float32 copy of the weight, where bfloat16 matmuls can be slow."""

    def __init__(self, linear: nn.Linear, max_bf16_rows: int = 8) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.max_bf16_rows = max_bf16_rows

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= self.max_bf16_rows:
            y = F.linear(x.to(torch.bfloat16), self.weight).float()
        else:
            y = F.linear(x, self.weight.float())
        return y if self.bias is None else y + self.bias


def quantize_weights(model: nn.Module, mode: WeightMode) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by its ``mode`` counterpart; returns the model.

    Tied output weights stay tied in effect: the output layer gets its own low-precision copy, and
    the embedding lookup keeps float32.
    """
    kinds = {"float32": DecodeLinear, "int8": Int8Linear, "int8-weight-only": Int8WeightOnlyLinear, "bf16": BF16Linear}
    if mode not in kinds:
        raise ValueError(f"unknown weight mode {mode!r}")
    kind = kinds[mode]
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, kind(child))
    return model.eval()
