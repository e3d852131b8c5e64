"""The tensor side of the paged KV cache: page storage, and the cache object of one engine step.

``PagedKVStore`` holds keys/values as (L, num_blocks, Hkv, block_size, Dh): a page is one
contiguous piece, so gathering a row's pages streams whole pages, and within a page each key/value
head's slots are contiguous for the matrix products. ``PagedBatch`` is what the model
receives as its cache for one engine step: the step's new tokens from every sequence packed into one
row (1, N), so every linear layer runs once over all of them, while attention runs per sequence from
its block table:

- single-token rows (decode) together, through ``PagedAttentionPlan`` straight from the pages;
- multi-token rows (a prompt, or a chunk of one) one at a time with the model's kernel, over the
  chunk itself when nothing precedes it, otherwise over its pages gathered back.

With fixed-size decode partitions (the engine's default on CPU) every sequence's computation has
shapes that depend on that sequence alone, and the packed row is padded to at least ``MIN_ROWS``
tokens (small matrix products take other kernels), so a request's greedy tokens do not depend on
what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from triform.inference.blocks import NULL_BLOCK
from triform.layers.kernels import PagedAttentionPlan
from triform.layers.masks import decoder_mask, materialize
from triform.layers.position import alibi_bias

MIN_ROWS = 8


class PagedKVStore:
    """Key/value pages for every layer, addressed by block id."""

    def __init__(
        self, n_layers: int, num_blocks: int, n_kv_heads: int, block_size: int, head_dim: int,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, num_blocks, n_kv_heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # zeros: masked slots must stay finite
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Carry out copy-on-write orders (source block -> destination block) for every layer."""
        if pairs:
            src = torch.tensor([s for s, _ in pairs], device=self.k.device)
            dst = torch.tensor([d for _, d in pairs], device=self.k.device)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]


@dataclass(frozen=True)
class RowSpec:
    """One sequence in a step: its block table, how many tokens the cache already holds (``start``),
    and how many new tokens it brings (``length``), at positions start .. start+length-1."""

    table: list[int]
    start: int
    length: int


class PagedBatch:
    """The cache interface for one packed engine step (see the module docstring).

    ``tokens(ids)`` lays the rows' new token ids out as the packed (1, N) input and ``positions`` is
    the matching (1, N) position row (-1 on padding); ``last_index`` holds, per row, the packed
    index of its last new token (where its next-token logits come from). ``partition_blocks`` sets
    the paged kernel's partition (None: the whole table at once, fewest kernel launches).
    """

    def __init__(
        self, store: PagedKVStore, rows: list[RowSpec], *, window: int | None = None,
        alibi_slopes: Tensor | None = None, groups: int = 1, partition_blocks: int | None = None,
    ) -> None:
        self.store, self.rows, self.window, self.alibi_slopes = store, rows, window, alibi_slopes
        dev, b = store.k.device, store.block_size
        offsets, pos, slots = [], [], []
        for r in rows:
            offsets.append(len(pos))
            pos += range(r.start, r.start + r.length)
            slots += [(r.table[p // b], p % b) for p in range(r.start, r.start + r.length)]
        n_real = len(pos)
        pos += [-1] * (max(MIN_ROWS, n_real) - n_real)
        self.offsets = offsets
        self.positions = torch.tensor([pos], device=dev)  # (1, N)
        self.last_index = [o + r.length - 1 for o, r in zip(offsets, rows)]
        self._n_real = n_real
        where = torch.tensor(slots, device=dev).reshape(-1, 2)
        self._blocks, self._offsets = where[:, 0], where[:, 1]  # (n_real,) page and slot of each new token
        self.seen = max(r.start + r.length for r in rows)
        self._decode = [i for i, r in enumerate(rows) if r.length == 1]
        self._decode_plan: PagedAttentionPlan | None = None
        if self._decode:
            width = max(len(rows[i].table) for i in self._decode)
            tables = torch.tensor(
                [rows[i].table + [NULL_BLOCK] * (width - len(rows[i].table)) for i in self._decode], device=dev,
            )
            q_pos = torch.tensor([[rows[i].start] for i in self._decode], device=dev)
            self._decode_plan = PagedAttentionPlan(
                tables, q_pos, block_size=b, groups=groups, window=window, alibi_slopes=alibi_slopes,
                partition_blocks=partition_blocks or width,
            )
            self._decode_idx = torch.tensor([offsets[i] for i in self._decode], device=dev)
        self._mask_fn = decoder_mask(window)
        self._prefill = [self._prefill_inputs(i) for i, r in enumerate(rows) if r.length > 1]

    def _prefill_inputs(self, i: int) -> tuple[int, int, Tensor | None, Tensor | None, Tensor | None]:
        """(offset, length, pages to gather or None, mask or None, bias or None) for multi-token row i."""
        r, dev, b = self.rows[i], self.store.k.device, self.store.block_size
        q_pos = torch.arange(r.start, r.start + r.length, device=dev)[None]  # (1, T)
        pages = None
        if r.start == 0:
            k_pos = q_pos
        else:
            n_pages = -(-(r.start + r.length) // b)
            table = torch.tensor(r.table[:n_pages], device=dev)
            k_pos = torch.arange(n_pages * b, device=dev)
            k_pos = torch.where((table >= 0).repeat_interleave(b) & (k_pos < r.start + r.length), k_pos, -1)[None]
            pages = table.clamp(min=0)
        plain_causal = pages is None and self.alibi_slopes is None and (self.window is None or self.window >= r.length)
        mask = None if plain_causal else materialize(self._mask_fn, q_pos, k_pos)
        bias = None
        if self.alibi_slopes is not None:
            bias = alibi_bias(self.alibi_slopes, q_pos, k_pos)  # (1, H, T, Tk)
        return self.offsets[i], r.length, pages, mask, bias

    def tokens(self, ids: list[list[int]]) -> Tensor:
        """The packed (1, N) input from each row's new token ids."""
        flat = [t for row in ids for t in row]
        flat += [0] * (self.positions.shape[1] - len(flat))
        return torch.tensor([flat], device=self.positions.device)

    @property
    def is_empty(self) -> bool:
        return False

    def begin(self, positions: Tensor) -> Tensor:
        return positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise TypeError("PagedBatch runs attention itself; call attend().")

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, kernel: Callable[..., Tensor]) -> Tensor:
        """Store the step's new keys/values (1, Hkv, N, Dh) in their slots, then attend: q (1, H, N, Dh)
        -> (1, H, N, Dh)."""
        n = self._n_real
        k_pages, v_pages = self.store.k[layer], self.store.v[layer]  # (blocks, Hkv, block_size, Dh)
        k_pages[self._blocks, :, self._offsets] = k[0, :, :n].transpose(0, 1).to(k_pages.dtype)  # (n, Hkv, Dh)
        v_pages[self._blocks, :, self._offsets] = v[0, :, :n].transpose(0, 1).to(v_pages.dtype)
        out = torch.zeros_like(q)
        if self._decode_plan is not None:
            qd = q[0, :, self._decode_idx].transpose(0, 1)[:, :, None]  # (Bd, H, 1, Dh)
            yd = self._decode_plan(qd, k_pages, v_pages)  # (Bd, H, 1, Dh)
            out[0, :, self._decode_idx] = yd[:, :, 0].transpose(0, 1)
        for off, length, pages, mask, bias in self._prefill:
            qr = q[:, :, off : off + length]  # (1, H, T, Dh)
            if pages is None:
                kr, vr = k[:, :, off : off + length], v[:, :, off : off + length]
            else:
                kr = torch.index_select(k_pages, 0, pages).transpose(0, 1).flatten(1, 2)[None].to(q.dtype)  # (1, Hkv, S, Dh)
                vr = torch.index_select(v_pages, 0, pages).transpose(0, 1).flatten(1, 2)[None].to(q.dtype)
            out[:, :, off : off + length] = kernel(
                qr, kr, vr, mask=mask, bias=bias, is_causal=mask is None, dropout_p=0.0, scale=None,
            )
        return out
