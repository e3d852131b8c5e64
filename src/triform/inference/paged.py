"""The tensor side of the paged KV cache: block storage, and a per-step cache view over block tables.

``PagedKVStore`` holds keys/values as (L, num_blocks, block_size, Hkv, Dh), so all slots of a layer
form one contiguous (slots, Hkv, Dh) array that new tokens are scattered into. For one forward step,
``PagedStep`` implements the model's cache interface: ``begin`` maps each new token's position to its
slot (block table entry, offset), ``update`` scatters the new keys/values there and gathers every
row's keys/values back through its block table. Rows may have different lengths; slots a row does not
own (beyond its length, or freed by a sliding window) carry position -1 and are masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triform.inference.blocks import NULL_BLOCK


class PagedKVStore:
    """Key/value pages for every layer, addressed by block id."""

    def __init__(
        self, n_layers: int, num_blocks: int, n_kv_heads: int, block_size: int, head_dim: int,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Carry out copy-on-write orders (source block -> destination block) for every layer."""
        if pairs:
            src = torch.tensor([s for s, _ in pairs])
            dst = torch.tensor([d for _, d in pairs])
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]


class PagedStep:
    """The cache for one forward pass over a batch of sequences, each with its own block table."""

    def __init__(self, store: PagedKVStore, tables: list[list[int]], lengths: list[int]) -> None:
        """``tables[r]`` is row r's block table and ``lengths[r]`` the tokens it holds after this step."""
        self.store = store
        b = store.block_size
        self.n_blocks = max(len(t) for t in tables)
        padded = [t + [NULL_BLOCK] * (self.n_blocks - len(t)) for t in tables]
        self.tables = torch.tensor(padded, dtype=torch.long)  # (B, n_blocks)
        slot_pos = torch.arange(self.n_blocks * b).expand(len(tables), -1)  # (B, n_blocks·bs)
        owned = (self.tables != NULL_BLOCK).repeat_interleave(b, dim=1) & (slot_pos < torch.tensor(lengths)[:, None])
        self.k_pos = torch.where(owned, slot_pos, torch.full_like(slot_pos, -1))
        self.seen = max(lengths)
        self._slots: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def is_empty(self) -> bool:
        return False

    def begin(self, positions: Tensor) -> Tensor:
        """Record where each new token (position >= 0) is written; return every key's position (B, S)."""
        b = self.store.block_size
        rows, cols = torch.nonzero(positions >= 0, as_tuple=True)
        pos = positions[rows, cols]
        blocks = self.tables[rows, pos // b]
        self._slots = (rows, cols, blocks * b + pos % b)
        return self.k_pos

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows, cols, flat = self._slots  # type: ignore[misc]
        nb, bs, h, d = self.store.k.shape[1:]
        self.store.k[layer].view(nb * bs, h, d)[flat] = k[rows, :, cols]  # (N, Hkv, Dh) into their slots
        self.store.v[layer].view(nb * bs, h, d)[flat] = v[rows, :, cols]
        table = self.tables.clamp(min=0)  # freed entries read block 0; their positions are -1, so masked
        bsz, s = table.shape[0], self.n_blocks * bs
        keys = self.store.k[layer][table].view(bsz, s, h, d).transpose(1, 2)  # (B, Hkv, S, Dh)
        values = self.store.v[layer][table].view(bsz, s, h, d).transpose(1, 2)
        return keys, values
