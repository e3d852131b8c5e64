"""Paged KV-cache bookkeeping in pure Python over integers (the PagedAttention design, arXiv 2309.06180).

KV memory is a pool of fixed-size blocks. Each sequence owns a block table (logical block i holds
positions i·B .. i·B+B-1). Full blocks are hashed by (parent hash, their tokens), so sequences that
share a prompt prefix share blocks; blocks are reference counted; a sequence that must write into a
shared block gets a private copy first (copy-on-write). Freed blocks go to the back of an LRU free
queue and keep their hash, so a later request can still hit them until they are reused.
Nothing here touches tensors: the tensor side (paged.py) just follows the block ids and copy orders.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from triform.errors import ConfigError, GenerationError

NULL_BLOCK = -1  # a table entry whose block was freed because it fell out of the sliding window


def hash_block(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """Content hash of a full block, chained through its parent so equal blocks after different
    prefixes differ."""
    h = hashlib.sha256(parent or b"root")
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """``num_blocks`` blocks with a free queue (least recently freed first) and a prefix-hash index."""

    def __init__(self, num_blocks: int, *, prefix_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ConfigError(f"the KV pool needs a positive number of blocks, got {num_blocks!r}.")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.prefix_caching = prefix_caching
        self.num_allocations = 0  # blocks handed out over the pool's life (a prefix hit takes none)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks from the front of the free queue (evicting any cached prefix they held)."""
        if n > len(self.free):
            raise GenerationError(f"the KV pool has {len(self.free)} free blocks, {n} were requested.")
        out = []
        for _ in range(n):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            out.append(block_id)
        self.num_allocations += n
        return out

    def share(self, block_ids: list[int]) -> None:
        """Take one more reference on each block (a prefix hit, or a forked sequence)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference on each block; blocks nobody holds return to the back of the free queue.
        Pass a sequence's blocks in reverse order so its tail is evicted before its shared head."""
        for block_id in block_ids:
            if block_id == NULL_BLOCK:
                continue
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released too often"
            if block.ref_count == 0:
                self.free[block_id] = None

    def lookup(self, block_hash: bytes) -> int | None:
        """The cached block holding this content, if any."""
        return self.cached.get(block_hash) if self.prefix_caching else None

    def publish(self, block_id: int, block_hash: bytes) -> None:
        """Record that a now-full block holds the content ``block_hash``."""
        if not self.prefix_caching:
            return
        self.blocks[block_id].block_hash = block_hash
        self.cached.setdefault(block_hash, block_id)


@dataclass
class SequenceBlocks:
    """One sequence's block table and the hashes of its full blocks."""

    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose slots are allocated


class KVCacheManager:
    """Block tables per sequence on top of a BlockPool: prefix hits, growth, copy-on-write, forking,
    sliding-window release, freeing. Copies the tensor side must perform are queued in ``pending_copies``."""

    def __init__(self, pool: BlockPool, block_size: int, *, window: int | None = None) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}.")
        self.pool, self.block_size, self.window = pool, block_size, window
        self.seqs: dict[str, SequenceBlocks] = {}
        self.pending_copies: list[tuple[int, int]] = []  # (source block, destination block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_blocks_per_sequence(self) -> int | None:
        """The most blocks a sequence can hold at once with a sliding window: ceil(W/B) + 1."""
        return None if self.window is None else -(-self.window // self.block_size) + 1

    def match_prefix(self, seq_id: str, tokens: list[int]) -> int:
        """Attach cached full blocks that match the start of ``tokens``; returns how many tokens they
        cover (never all of them: the last token is always computed, to produce logits)."""
        seq = self.seqs.setdefault(seq_id, SequenceBlocks())
        assert not seq.table, "prefix matching is for a new sequence"
        parent: bytes | None = None
        hits: list[int] = []
        hashes: list[bytes] = []
        for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % self.block_size, self.block_size):
            h = hash_block(parent, tuple(tokens[start : start + self.block_size]))
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            hits.append(block_id)
            hashes.append(h)
            parent = h
        self.pool.share(hits)
        seq.table, seq.hashes = hits, hashes
        seq.num_tokens = len(hits) * self.block_size
        return seq.num_tokens

    def can_allocate(self, seq_id: str, total_tokens: int) -> bool:
        """Whether ``allocate(seq_id, ..., total_tokens)`` would find enough free blocks, counting the
        copy-on-write of a shared last block and the blocks a sliding window frees first."""
        seq = self.seqs.get(seq_id, SequenceBlocks())
        freed = 0
        outside = self._outside_window(seq, seq.num_tokens)
        for i in outside:
            freed += self.pool.blocks[seq.table[i]].ref_count == 1
        need = max(0, self.blocks_needed(total_tokens) - len(seq.table))
        last = seq.num_tokens // self.block_size
        if seq.num_tokens % self.block_size and last not in outside and self.pool.blocks[seq.table[last]].ref_count > 1:
            need += 1
        return need <= self.pool.num_free + freed

    def allocate(self, seq_id: str, tokens: list[int], total_tokens: int) -> list[int]:
        """Make room for slots up to ``total_tokens`` (``tokens`` are the sequence's known ids, used to
        hash blocks that become full). Writing into a shared last block first copies it. Returns the
        block table."""
        seq = self.seqs.setdefault(seq_id, SequenceBlocks())
        self._release_outside_window(seq, first_new=seq.num_tokens)
        last = seq.num_tokens // self.block_size
        if seq.num_tokens % self.block_size and self.pool.blocks[seq.table[last]].ref_count > 1:
            (fresh,) = self.pool.allocate(1)
            self.pending_copies.append((seq.table[last], fresh))
            self.pool.release([seq.table[last]])
            seq.table[last] = fresh
        grow = self.blocks_needed(total_tokens) - len(seq.table)
        if grow > 0:
            seq.table += self.pool.allocate(grow)
        seq.num_tokens = max(seq.num_tokens, total_tokens)
        self._publish_full_blocks(seq, tokens)
        return seq.table

    def _publish_full_blocks(self, seq: SequenceBlocks, tokens: list[int]) -> None:
        full = min(len(tokens), seq.num_tokens) // self.block_size
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            h = hash_block(parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size]))
            seq.hashes.append(h)
            if seq.table[i] != NULL_BLOCK:
                self.pool.publish(seq.table[i], h)

    def _outside_window(self, seq: SequenceBlocks, first_new: int) -> list[int]:
        """Table indices of held blocks no query from position ``first_new`` on can see: that query
        sees positions first_new-W+1 onwards, and later ones see even less of the past."""
        if self.window is None:
            return []
        oldest_visible = first_new - self.window + 1
        return [
            i for i in range(len(seq.table))
            if (i + 1) * self.block_size <= oldest_visible and seq.table[i] != NULL_BLOCK
        ]

    def _release_outside_window(self, seq: SequenceBlocks, first_new: int) -> None:
        for i in self._outside_window(seq, first_new):
            self.pool.release([seq.table[i]])
            seq.table[i] = NULL_BLOCK

    def release_outside_window(self, seq_id: str, next_position: int) -> None:
        """After a step: free the blocks the sequence's next token (at ``next_position``) cannot see,
        so between steps a sequence holds at most ceil(W/B)+1 blocks however long it runs."""
        self._release_outside_window(self.seqs[seq_id], next_position)

    def fork(self, parent_id: str, child_id: str) -> None:
        """A new sequence sharing every block of ``parent_id`` (parallel sampling of one prompt)."""
        parent = self.seqs[parent_id]
        self.pool.share([b for b in parent.table if b != NULL_BLOCK])
        self.seqs[child_id] = SequenceBlocks(list(parent.table), list(parent.hashes), parent.num_tokens)

    def free(self, seq_id: str) -> None:
        """Release a finished or preempted sequence's blocks, tail first."""
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.release(list(reversed(seq.table)))

    def live_blocks(self, seq_id: str) -> int:
        return sum(b != NULL_BLOCK for b in self.seqs[seq_id].table)
