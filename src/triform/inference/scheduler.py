"""Continuous batching under a token budget (the Orca / vLLM scheduler, small).

Every sequence has a list of known token ids and a count of them already in the KV cache
(``num_computed``). A step gives each scheduled sequence some new tokens to compute: a whole or
partial prompt (chunked prefill), or the one token sampled last step (decode). These are the same
thing to the scheduler, which only ever asks "how many of your known tokens are not yet cached?".
Running sequences go first, oldest first; waiting ones join while the budget, the sequence limit
and the free blocks allow. When blocks run out, the newest running sequence is preempted: its blocks
are freed and it waits at the front of the queue to be recomputed later (prefix caching often finds
most of its blocks still there). The scheduler speaks to the cache manager in block ids and token
counts only; it never touches tensors.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from triform.errors import ConfigError, GenerationError
from triform.inference.blocks import BlockPool, KVCacheManager
from triform.inference.sampling import SamplingParams


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of the continuous-batching scheduler.

    Args:
        block_size: tokens per KV block.
        num_blocks: blocks in the KV pool.
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: token budget of one step (decode tokens plus prefill chunks).
        prefill_chunk: a prompt is computed in chunks of at most this many tokens, at fixed offsets
            (multiples of the chunk), so a request's arithmetic does not depend on its neighbours.
        prefix_caching: share full blocks between sequences with the same prefix.
    """

    block_size: int = 16
    num_blocks: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    prefill_chunk: int = 256
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.prefill_chunk % self.block_size:
            raise ConfigError(
                f"prefill_chunk ({self.prefill_chunk}) must be a multiple of block_size ({self.block_size})."
            )
        if self.max_num_batched_tokens < self.prefill_chunk:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least prefill_chunk "
                f"({self.prefill_chunk}), or long prompts could never be scheduled."
            )


def blocks_held(config: SchedulerConfig, window: int | None, num_tokens: int, chunk: int) -> int:
    """Blocks one sequence of ``num_tokens`` tokens may hold at once when its prompt is computed in
    pieces of ``chunk`` tokens (a sliding window of ``window`` tokens bounds it). Pure: it reads only
    the fixed limits, so a front end on another thread may call it."""
    b = config.block_size
    needed = -(-num_tokens // b)
    if window is None:
        return needed
    return min(needed, -(-(window - 1 + chunk) // b) + 1)


def check_fits(config: SchedulerConfig, window: int | None, num_tokens: int) -> None:
    """Raise ``GenerationError`` if a sequence of ``num_tokens`` tokens could never fit in the pool,
    even alone (pure, like :func:`blocks_held`)."""
    need = blocks_held(config, window, num_tokens, config.prefill_chunk)
    if need > config.num_blocks:
        raise GenerationError(
            f"the request needs up to {num_tokens} tokens of KV cache ({need} blocks of "
            f"{config.block_size}) but the pool holds only {config.num_blocks} blocks; "
            f"shorten the prompt or max_new_tokens, or give the engine more KV memory."
        )


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion being generated: the prompt plus what has been sampled so far."""

    seq_id: str
    request_id: str
    index: int  # which of the request's n completions
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    arrival: float  # scheduling order; the largest is the newest, preempted first
    generator: torch.Generator | None = None
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    forked: bool = False  # whether the request's other completions have been split off
    num_preemptions: int = 0

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed


@dataclass
class ScheduledStep:
    """What one step computes: (sequence, number of new tokens) in packing order."""

    work: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    """Waiting queue, running list and the KV cache manager; ``schedule()`` plans one step."""

    def __init__(self, config: SchedulerConfig, *, window: int | None = None) -> None:
        self.config = config
        self.pool = BlockPool(config.num_blocks, prefix_caching=config.prefix_caching)
        self.kv = KVCacheManager(self.pool, config.block_size, window=window)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0

    def blocks_for(self, num_tokens: int, chunk: int) -> int:
        """Blocks one sequence of ``num_tokens`` tokens may hold at once (bounded by a sliding window)."""
        return blocks_held(self.config, self.kv.window, num_tokens, chunk)

    def check_fits(self, num_tokens: int) -> None:
        """Reject a sequence that could never fit in the pool, even alone."""
        check_fits(self.config, self.kv.window, num_tokens)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """New tokens ``seq`` computes this step, or 0 if its next piece does not fit the budget.
        Prefill chunks end at multiples of ``prefill_chunk`` so chunking never depends on the batch."""
        c = self.config.prefill_chunk
        n = min(seq.num_uncomputed, c - seq.num_computed % c)
        return n if n <= budget else 0

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it will be recomputed from its known tokens."""
        self.kv.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.kv.free(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running):  # running sequences first, oldest first
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            while not self.kv.can_allocate(seq.seq_id, seq.num_computed + n):
                victim = self.running[-1]  # the newest sequence gives way
                self.preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.kv.allocate(seq.seq_id, seq.tokens, seq.num_computed + n)
            step.work.append((seq, n))
            budget -= n
            i += 1
        if step.preempted:  # memory is short: admit nobody new this step
            return step
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hit = self.kv.match_prefix(seq.seq_id, seq.tokens)
            seq.num_computed = hit
            n = self._chunk(seq, budget)
            if n == 0 or not self.kv.can_allocate(seq.seq_id, seq.num_computed + n):
                self.kv.free(seq.seq_id)  # undo the prefix match; try again next step
                seq.num_computed = 0
                break
            self.prefix_hit_tokens += hit
            self.waiting.popleft()
            self.kv.allocate(seq.seq_id, seq.tokens, seq.num_computed + n)
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)  # kept oldest first
            step.work.append((seq, n))
            budget -= n
        return step

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start ``child`` as a running sequence sharing every block of ``parent`` (parallel sampling)."""
        self.kv.fork(parent.seq_id, child.seq_id)
        child.status = Status.RUNNING
        bisect.insort(self.running, child, key=lambda s: s.arrival)

    def after_step(self, step: ScheduledStep) -> None:
        """Advance computed counts and free blocks that fell out of a sliding window."""
        for seq, n in step.work:
            seq.num_computed += n
        if self.kv.window is not None:
            for seq in self.running:
                self.kv.release_outside_window(seq.seq_id, seq.num_computed)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
