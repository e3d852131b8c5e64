"""Choosing the training precision by measurement: bfloat16 autocast where this CPU or GPU runs it
faster, float32 where it does not.

CPUs differ by two orders of magnitude here: with AMX (Intel Sapphire Rapids) a bfloat16 matmul runs
~7x faster than float32, while on CPUs without AMX or AVX512-BF16 it runs ~100x slower. So ``auto``
times one matmul of the model's own shape both ways at start-up (a few hundred milliseconds) and
keeps the measurement for the rest of the process.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

SPEEDUP_NEEDED = 1.2  # bf16 must beat float32 by this factor: autocast adds casts that a matmul timing omits


@dataclass(frozen=True)
class PrecisionChoice:
    """The autocast dtype (None: float32) and why it was chosen."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return "bfloat16" if self.dtype is torch.bfloat16 else "float32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, *, seconds: float = 0.15) -> float:
    """Measured GFLOP/s of an (m, k) @ (k, n) matmul in ``dtype`` on ``device`` (best of repeated runs)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, allocation
    _sync(device)
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if dt > seconds:  # one slow run is enough to know
            break
    return 2 * m * k * n / best / 1e9


@functools.lru_cache(maxsize=16)
def _measure(device_type: str, index: int | None, m: int, k: int, n: int) -> tuple[float, float]:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        fp32 = matmul_gflops(device, torch.float32, m, k, n)
        bf16 = matmul_gflops(device, torch.bfloat16, m, k, n)
    return fp32, bf16


def choose_precision(precision: str, device: torch.device, *, d_model: int = 512, rows: int = 2048) -> PrecisionChoice:
    """The autocast dtype for ``precision`` ("auto", "float32", "bfloat16") on ``device``.

    ``auto`` times a (rows, d_model) @ (d_model, 4·d_model) matmul — the shape of a feed-forward
    layer — in float32 and bfloat16 and picks bfloat16 when it is at least ``SPEEDUP_NEEDED`` times
    faster. The global random state is left untouched."""
    if precision == "float32":
        return PrecisionChoice(None, "float32 (asked for)")
    if precision == "bfloat16":
        return PrecisionChoice(torch.bfloat16, "bfloat16 autocast (asked for)")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return PrecisionChoice(None, "float32: this GPU has no bfloat16")
    m, k = min(max(rows, 256), 4096), min(max(d_model, 128), 4096)
    fp32, bf16 = _measure(device.type, device.index, m, k, 4 * k)
    where = "this GPU" if device.type == "cuda" else "this CPU"
    figures = f"matmul {bf16:,.0f} GFLOP/s in bfloat16 vs {fp32:,.0f} in float32 on {where}"
    if bf16 >= SPEEDUP_NEEDED * fp32:
        return PrecisionChoice(torch.bfloat16, f"bfloat16 autocast ({figures})")
    return PrecisionChoice(None, f"float32 ({figures})")
