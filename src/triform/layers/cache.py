"""Key/value caches behind one interface, handed to a model's ``forward``.

Each forward pass first calls ``begin(positions)`` once with the positions (B, T) of the new tokens
(-1 for padding) and gets back the positions (B, Tk) of every key the new queries can see; then each
layer calls ``update(layer, k, v)`` with its new keys/values (B, Hkv, T, Dh) and receives all
keys/values (B, Hkv, Tk, Dh) in the same slot order. A model never branches on which cache it has.
Caches are sized by key/value heads, not query heads, so grouped-query attention saves memory here.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from triform.errors import GenerationError


class KVCache(Protocol):
    """The cache interface every cache implements. ``seen`` counts the tokens written so far."""

    seen: int

    def begin(self, positions: Tensor) -> Tensor: ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    @property
    def is_empty(self) -> bool: ...


class _SlotCache:
    """Key/value storage of (L, B, Hkv, slots, Dh) plus the position held in each slot (-1: empty)."""

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, slots: int,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((batch, slots), -1, dtype=torch.long, device=device)
        self.seen = 0

    @property
    def is_empty(self) -> bool:
        return self.seen == 0


class ContiguousKVCache(_SlotCache):
    """A preallocated (L, B, Hkv, max_len, Dh) buffer filled left to right (gpt-fast's static cache)."""

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(n_layers, batch, n_kv_heads, head_dim, max_len, dtype=dtype, device=device)
        self.max_len = max_len
        self._start = 0

    def begin(self, positions: Tensor) -> Tensor:
        t = positions.shape[1]
        if self.seen + t > self.max_len:
            raise GenerationError(f"the KV cache holds {self.max_len} tokens and cannot take {self.seen + t}.")
        self._start = self.seen
        self.seen += t
        self.pos[:, self._start : self.seen] = positions
        return self.pos[:, : self.seen]

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens (a chat turn that diverges from the cache)."""
        self.seen = min(self.seen, length)
        self.pos[:, self.seen :] = -1

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer, :, :, self._start : self.seen] = k
        self.v[layer, :, :, self._start : self.seen] = v
        return self.k[layer, :, :, : self.seen], self.v[layer, :, :, : self.seen]


class RollingKVCache(_SlotCache):
    """A sliding-window cache: position p lives in slot p mod W, so memory stays W tokens per layer.

    A chunk of T new tokens attends to the W slots held before it plus the chunk itself; the mask
    (by position) hides anything outside the window. Afterwards only the last W tokens are kept.
    """

    def __init__(
        self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, window: int,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(n_layers, batch, n_kv_heads, head_dim, window, dtype=dtype, device=device)
        self.window = window
        self._keep = 0
        self._slots: Tensor | None = None

    def begin(self, positions: Tensor) -> Tensor:
        t = positions.shape[1]
        keep = min(t, self.window)
        # Slots by write order (not by position), so left-padded rows stay aligned.
        self._slots = (torch.arange(self.seen + t - keep, self.seen + t, device=positions.device)) % self.window
        self._keep = keep
        k_pos = torch.cat([self.pos, positions], dim=1)  # (B, W + T)
        self.pos[:, self._slots] = positions[:, t - keep :]
        self.seen += t
        return k_pos

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k_all = torch.cat([self.k[layer], k], dim=2)  # (B, Hkv, W + T, Dh)
        v_all = torch.cat([self.v[layer], v], dim=2)
        keep = self._keep
        self.k[layer][:, :, self._slots] = k[:, :, -keep:]
        self.v[layer][:, :, self._slots] = v[:, :, -keep:]
        return k_all, v_all
