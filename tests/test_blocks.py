"""Paged KV bookkeeping, checked with exact block ids."""

from __future__ import annotations

import pytest

from triform.errors import ConfigError, GenerationError
from triform.inference.blocks import NULL_BLOCK, BlockPool, KVCacheManager, hash_block


def _mgr(blocks: int = 8, size: int = 4, **kw) -> KVCacheManager:
    return KVCacheManager(BlockPool(blocks), size, **kw)


def test_allocation_in_free_queue_order_and_growth() -> None:
    m = _mgr()
    assert m.allocate("a", list(range(6)), 6) == [0, 1]
    assert m.allocate("b", list(range(3)), 3) == [2]
    assert m.allocate("a", list(range(9)), 9) == [0, 1, 3]  # a 9th token needs a third block
    assert m.pool.num_free == 4
    assert [m.pool.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 1]


def test_free_returns_tail_first_and_lru_reuse() -> None:
    m = _mgr()
    m.allocate("a", list(range(12)), 12)  # blocks 0, 1, 2
    m.allocate("b", [9] * 4, 4)  # block 3
    m.free("a")
    assert list(m.pool.free) == [4, 5, 6, 7, 2, 1, 0]  # a's tail goes back before its head
    assert m.allocate("c", [5] * 20, 20) == [4, 5, 6, 7, 2]


def test_prefix_hits_share_blocks_and_survive_free_until_evicted() -> None:
    m = _mgr()
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    m.allocate("a", prompt, 10)  # blocks 0, 1, 2; blocks 0 and 1 are full and published
    assert m.match_prefix("b", prompt + [99]) == 8
    assert m.seqs["b"].table == [0, 1]
    assert [m.pool.blocks[i].ref_count for i in (0, 1, 2)] == [2, 2, 1]
    m.free("a")
    m.free("b")
    assert m.match_prefix("c", prompt) == 8  # cached blocks are still found after everyone freed them
    assert m.seqs["c"].table == [0, 1]
    m.free("c")
    assert m.allocate("d", [7] * 32, 32) == [3, 4, 5, 6, 7, 2, 1, 0]  # every block, cached ones last
    assert hash_block(None, (0, 1, 2, 3)) not in m.pool.cached  # the old prefix was evicted
    assert m.pool.cached[hash_block(None, (7, 7, 7, 7))] == 3 and len(m.pool.cached) == 8
    m.free("d")
    assert m.match_prefix("e", prompt) == 0


def test_last_token_is_always_computed() -> None:
    m = _mgr()
    m.allocate("a", list(range(8)), 8)
    assert m.match_prefix("b", list(range(8))) == 4  # 8 tokens = 2 full blocks, but the last must be run


def test_hash_chains_through_parents() -> None:
    a = hash_block(None, (1, 2, 3, 4))
    assert hash_block(a, (5, 6, 7, 8)) != hash_block(None, (5, 6, 7, 8))


def test_fork_and_copy_on_write() -> None:
    m = _mgr()
    m.allocate("p", list(range(6)), 6)  # blocks 0, 1 (block 1 half full)
    m.fork("p", "c")
    assert m.seqs["c"].table == [0, 1] and m.pool.blocks[1].ref_count == 2
    table = m.allocate("c", list(range(6)) + [42], 7)  # c writes into shared block 1: it gets a copy
    assert table == [0, 2] and m.pending_copies == [(1, 2)]
    assert [m.pool.blocks[i].ref_count for i in (0, 1, 2)] == [2, 1, 1]
    assert m.allocate("p", list(range(6)) + [7], 7) == [0, 1]  # p owns block 1 alone now: no copy
    assert m.pending_copies == [(1, 2)]


def test_sliding_window_bounds_blocks_per_sequence() -> None:
    m = _mgr(blocks=16, size=4, window=10)
    bound = m.max_blocks_per_sequence()
    assert bound == 4  # ceil(10 / 4) + 1
    tokens: list[int] = []
    for t in range(200):
        tokens.append(t % 50)
        m.allocate("s", tokens, len(tokens))
        assert m.live_blocks("s") <= bound
    table = m.seqs["s"].table
    assert table[:45] == [NULL_BLOCK] * 45 and all(b != NULL_BLOCK for b in table[-3:])
    assert m.pool.num_free == 16 - m.live_blocks("s")


def test_running_out_and_preemption_frees_for_others() -> None:
    m = _mgr(blocks=4)
    m.allocate("a", [1] * 8, 8)
    m.allocate("b", [2] * 8, 8)
    assert not m.can_allocate("b", 9)
    with pytest.raises(GenerationError, match="0 free blocks"):
        m.allocate("b", [2] * 9, 9)
    m.free("a")  # preempt the newest other request ...
    assert m.allocate("b", [2] * 9, 9) == [2, 3, 1]  # ... and b continues with a's tail block
    assert m.match_prefix("a", [1] * 8) == 4  # a resumes later: its first block is still cached


def test_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="block_size"):
        KVCacheManager(BlockPool(4), 0)
    with pytest.raises(ConfigError, match="positive number of blocks"):
        BlockPool(0)
