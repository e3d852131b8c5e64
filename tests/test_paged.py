"""Paged KV cache tensor side: paged decoding equals contiguous-cache and uncached decoding."""

from __future__ import annotations

import pytest
import torch

from triform.config import get_preset
from triform.inference.blocks import BlockPool, KVCacheManager
from triform.inference.paged import PagedKVStore, PagedStep
from triform.models.decoder import DecoderLM


def _greedy_paged(model: DecoderLM, prompts: list[list[int]], steps: int, block_size: int, blocks: int) -> list[list[int]]:
    """Greedy decoding of a mixed-length batch through block tables: prefill each prompt, then one
    token per row per step, all rows in one forward pass."""
    s = model.cfg.stack
    mgr = KVCacheManager(BlockPool(blocks), block_size, window=s.sliding_window)
    store = PagedKVStore(s.n_layers, blocks, s.n_kv_heads, block_size, s.head_dim)
    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for r, p in enumerate(prompts):  # prefill, one request at a time
            mgr.allocate(str(r), p, len(p))
            step = PagedStep(store, [mgr.seqs[str(r)].table], [len(p)])
            logits = model(torch.tensor([p]), positions=torch.arange(len(p))[None], cache=step)
            outs[r].append(int(logits[0, -1].argmax()))
        for _ in range(steps - 1):  # decode: every row in one batch
            for r in range(len(seqs)):
                seqs[r].append(outs[r][-1])
                mgr.allocate(str(r), seqs[r], len(seqs[r]))
            tables = [mgr.seqs[str(r)].table for r in range(len(seqs))]
            step = PagedStep(store, tables, [len(x) for x in seqs])
            x = torch.tensor([[x[-1]] for x in seqs])
            pos = torch.tensor([[len(x) - 1] for x in seqs])
            logits = model(x, positions=pos, cache=step)
            for r in range(len(seqs)):
                outs[r].append(int(logits[r, -1].argmax()))
    return outs


def _greedy_reference(model: DecoderLM, prompt: list[int], steps: int, cached: bool) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        cache = model.new_cache(1, len(prompt) + steps) if cached else None
        logits = model(torch.tensor([seq]), cache=cache)
        for _ in range(steps):
            out.append(int(logits[0, -1].argmax()))
            seq.append(out[-1])
            logits = model(torch.tensor([[seq[-1]]]), cache=cache) if cached else model(torch.tensor([seq]))
    return out


@pytest.mark.parametrize("name, block_size", [("llama3-8b-tiny", 4), ("gpt2-tiny", 16), ("mistral-7b-tiny", 4)])
def test_paged_equals_contiguous_equals_uncached(name: str, block_size: int) -> None:
    torch.manual_seed(0)
    model = DecoderLM(get_preset(name)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23, 12, 1, 30)]
    paged = _greedy_paged(model, prompts, steps=20, block_size=block_size, blocks=64)
    for p, got in zip(prompts, paged):
        assert got == _greedy_reference(model, p, 20, cached=True) == _greedy_reference(model, p, 20, cached=False)


def test_paged_logits_match_contiguous_exactly_enough() -> None:
    torch.manual_seed(0)
    model = DecoderLM(get_preset("llama3-8b-tiny")).eval()
    x = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(2))
    mgr = KVCacheManager(BlockPool(16), 8)
    store = PagedKVStore(2, 16, 2, 8, 16)
    with torch.no_grad():
        mgr.allocate("a", x[0].tolist(), 37)
        paged = model(x, positions=torch.arange(37)[None], cache=PagedStep(store, [mgr.seqs["a"].table], [37]))
        torch.testing.assert_close(paged, model(x), atol=1e-5, rtol=1e-5)


def test_copy_on_write_copies_pages() -> None:
    store = PagedKVStore(2, 4, 1, 2, 3)
    store.k[:, 1] = 7.0
    store.copy_blocks([(1, 3)])
    assert torch.equal(store.k[:, 3], store.k[:, 1]) and store.k[:, 2].abs().sum() == 0
