"""Paged KV cache tensor side: the paged attention kernel equals the reference kernel, is exactly batch
invariant, and a packed engine step gives the model's own logits."""

from __future__ import annotations

import pytest
import torch

from triform.config import get_preset
from triform.inference.blocks import BlockPool, KVCacheManager
from triform.inference.paged import PagedBatch, PagedKVStore, RowSpec
from triform.layers.kernels import paged_attention, reference_attention
from triform.layers.masks import decoder_mask, materialize
from triform.layers.position import alibi_slopes
from triform.models.decoder import DecoderLM


def _random_pages(lengths: list[int], bs: int, hkv: int, dh: int, seed: int):
    """Pages holding random keys/values for rows of the given lengths, with shuffled block ids."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lengths]
    ids = torch.randperm(sum(need) + 5, generator=g).tolist()
    k_pages = torch.randn(len(ids), hkv, bs, dh, generator=g)
    v_pages = torch.randn(len(ids), hkv, bs, dh, generator=g)
    tables, at = [], 0
    for n in need:
        tables.append(ids[at : at + n])
        at += n
    return k_pages, v_pages, tables


def _contiguous(pages: torch.Tensor, table: list[int], n: int) -> torch.Tensor:
    return pages[table].transpose(0, 1).flatten(1, 2)[:, :n]  # (Hkv, n, Dh)


@pytest.mark.parametrize("window, alibi", [(None, False), (7, False), (None, True)])
@pytest.mark.parametrize("tq", [1, 5])
def test_paged_attention_matches_reference(window: int | None, alibi: bool, tq: int) -> None:
    bs, h, hkv, dh = 4, 6, 2, 8
    lengths = [5, 37, 12, 1 + tq, 64]
    k_pages, v_pages, tables = _random_pages(lengths, bs, hkv, dh, seed=0)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lengths), h, tq, dh, generator=g)
    q_pos = torch.tensor([[max(0, n - tq + i) for i in range(tq)] for n in lengths])  # the last tq positions
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    slopes = alibi_slopes(h) if alibi else None
    got = paged_attention(q, k_pages, v_pages, padded, q_pos, window=window, alibi_slopes=slopes, partition_blocks=3)
    for b, n in enumerate(lengths):
        k = _contiguous(k_pages, tables[b], n)[None]
        v = _contiguous(v_pages, tables[b], n)[None]
        k_pos = torch.arange(n)[None]
        mask = materialize(decoder_mask(window), q_pos[b : b + 1], k_pos)
        bias = None
        if alibi:
            bias = -slopes[:, None, None] * (q_pos[b][:, None] - k_pos[0][None, :]).abs().float()[None]
        want = reference_attention(q[b : b + 1], k, v, mask=mask, bias=bias)
        torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)


def test_paged_attention_skips_freed_blocks() -> None:
    """Entries freed by a sliding window (-1) are never read; the window mask alone decides."""
    bs, h, hkv, dh, window = 4, 4, 2, 8, 6
    k_pages, v_pages, tables = _random_pages([30], bs, hkv, dh, seed=2)
    q = torch.randn(1, h, 1, dh, generator=torch.Generator().manual_seed(3))
    q_pos = torch.tensor([[29]])
    full = torch.tensor(tables)
    freed = full.clone()
    freed[0, :5] = -1  # positions 0..19 are outside the window of position 29
    a = paged_attention(q, k_pages, v_pages, full, q_pos, window=window)
    b = paged_attention(q, k_pages, v_pages, freed, q_pos, window=window)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_paged_attention_row_is_bit_identical_alone_and_in_any_batch() -> None:
    bs, h, hkv, dh = 16, 9, 3, 64
    lengths = [300, 17, 700, 1, 129, 256, 64, 511]
    k_pages, v_pages, tables = _random_pages(lengths, bs, hkv, dh, seed=4)
    q = torch.randn(len(lengths), h, 1, dh, generator=torch.Generator().manual_seed(5))
    q_pos = torch.tensor([[n - 1] for n in lengths])
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    batch = paged_attention(q, k_pages, v_pages, padded, q_pos)
    for b in range(len(lengths)):
        alone = paged_attention(q[b : b + 1], k_pages, v_pages, torch.tensor([tables[b]]), q_pos[b : b + 1])
        assert torch.equal(alone, batch[b : b + 1])
    pair = paged_attention(q[[2, 0]], k_pages, v_pages, padded[[2, 0]], q_pos[[2, 0]])
    assert torch.equal(pair, batch[[2, 0]])


def test_copy_on_write_copies_pages() -> None:
    store = PagedKVStore(2, 4, 1, 2, 3)
    store.k[:, 1] = 7.0
    store.copy_blocks([(1, 3)])
    assert torch.equal(store.k[:, 3], store.k[:, 1]) and store.k[:, 2].abs().sum() == 0


@pytest.mark.parametrize("name", ["llama3-8b-tiny", "gpt2-tiny", "mistral-7b-tiny"])
def test_packed_step_gives_the_models_logits(name: str) -> None:
    """One packed forward holding a fresh prompt, a prompt chunk after cached tokens and two decode
    rows gives each row the logits of an uncached forward over its whole sequence."""
    torch.manual_seed(0)
    model = DecoderLM(get_preset(name)).eval()
    s = model.cfg.stack
    bs = 4
    mgr = KVCacheManager(BlockPool(64), bs)
    store = PagedKVStore(s.n_layers, 64, s.n_kv_heads, bs, s.head_dim)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (13, 40, 22, 9)]
    cached = [0, 24, 21, 8]  # tokens already in the cache before the step

    def step(rows: list[tuple[int, int, int]]) -> torch.Tensor:
        specs = []
        for r, start, n in rows:
            mgr.allocate(str(r), seqs[r], start + n)
            specs.append(RowSpec(list(mgr.seqs[str(r)].table), start, n))
        batch = PagedBatch(store, specs, window=s.sliding_window, groups=s.n_heads // s.n_kv_heads)
        tokens = batch.tokens([seqs[r][start : start + n] for r, start, n in rows])
        with torch.no_grad():
            return model(tokens, positions=batch.positions, cache=batch)[0], batch

    step([(r, 0, c) for r, c in enumerate(cached) if c])  # fill the caches
    rows = [(r, c, len(seqs[r]) - c) for r, c in enumerate(cached)]
    logits, batch = step(rows)
    with torch.no_grad():
        for (r, start, n), last in zip(rows, batch.last_index):
            want = model(torch.tensor([seqs[r]]))[0, start:]
            torch.testing.assert_close(logits[last - n + 1 : last + 1], want, atol=1e-4, rtol=1e-4)
