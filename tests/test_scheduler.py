"""The continuous-batching scheduler with exact block ids: admission under the token budget, chunked
prefill, decode, preemption of the newest sequence, resumption through prefix hits, LRU eviction."""

from __future__ import annotations

import pytest

from triform.errors import ConfigError, GenerationError
from triform.inference.sampling import SamplingParams
from triform.inference.scheduler import Scheduler, SchedulerConfig, Sequence, Status

PARAMS = SamplingParams(temperature=0.0)


def _seq(name: str, tokens: list[int], arrival: float) -> Sequence:
    return Sequence(
        seq_id=name, request_id=name, index=0, tokens=list(tokens), prompt_len=len(tokens), params=PARAMS, arrival=arrival,
    )


def _run(s: Scheduler, samples: dict[str, int]) -> list[tuple[str, int]]:
    """One step: schedule, mark the work computed, append a token to every sequence now fully cached."""
    step = s.schedule()
    s.after_step(step)
    for seq, _ in step.work:
        if seq.num_computed == len(seq.tokens):
            seq.tokens.append(samples[seq.seq_id])
    return [(seq.seq_id, n) for seq, n in step.work]


def test_chunked_prefill_decode_preemption_and_resume_with_exact_blocks() -> None:
    s = Scheduler(SchedulerConfig(block_size=4, num_blocks=6, max_num_seqs=4, max_num_batched_tokens=8, prefill_chunk=8))
    a = _seq("A", [1, 2, 3, 4, 5, 6, 7], 0)
    b = _seq("B", [101, 102, 103, 104, 105, 106], 1)
    s.add(a)
    s.add(b)
    table = lambda name: s.kv.seqs[name].table  # noqa: E731
    # A's 7-token prompt takes 7 of the 8-token budget; B's 6 do not fit in the 1 left.
    assert _run(s, {"A": 8}) == [("A", 7)]
    assert table("A") == [0, 1] and b.status is Status.WAITING
    # A decodes one token, B's prompt joins the same step.
    assert _run(s, {"A": 9, "B": 107}) == [("A", 1), ("B", 6)]
    assert table("B") == [2, 3]
    assert _run(s, {"A": 10, "B": 108}) == [("A", 1), ("B", 1)]
    assert table("A") == [0, 1, 4]
    assert _run(s, {"A": 11, "B": 109}) == [("A", 1), ("B", 1)]
    assert _run(s, {"A": 12, "B": 110}) == [("A", 1), ("B", 1)]
    assert table("B") == [2, 3, 5] and s.pool.num_free == 0
    assert _run(s, {"A": 13, "B": 111}) == [("A", 1), ("B", 1)]
    # A needs a fourth block and none is free: the newest sequence, B, is preempted; its
    # blocks return tail first (5, 3, 2) so its prefix stays cached longest; A takes block 5.
    step = s.schedule()
    assert [(q.seq_id, n) for q, n in step.work] == [("A", 1)] and step.preempted == [b]
    assert b.status is Status.WAITING and b.num_computed == 0 and s.num_preemptions == 1
    assert table("A") == [0, 1, 4, 5] and list(s.pool.free) == [3, 2]
    s.after_step(step)
    a.tokens.append(14)
    # B's two full blocks are still cached, but its third block does not fit: it keeps waiting.
    assert _run(s, {"A": 15}) == [("A", 1)]
    assert "B" not in s.kv.seqs and list(s.pool.free) == [3, 2]
    # A finishes: its blocks return tail first. B resumes: a prefix hit on blocks 2 and 3 (8 tokens),
    # so only its last 3 tokens are recomputed, into the least recently freed block, 5.
    s.finish(a, "length")
    assert list(s.pool.free) == [3, 2, 5, 4, 1, 0]
    assert _run(s, {"B": 112}) == [("B", 3)]
    assert table("B") == [2, 3, 5] and s.prefix_hit_tokens == 8
    assert list(s.pool.free) == [4, 1, 0]
    # LRU eviction: once B finishes, a new 6-token prompt takes the two least recently freed blocks,
    # 4 and 1, evicting A's second block but not its first, so A's prompt still hits one block.
    s.finish(b, "length")
    assert list(s.pool.free) == [4, 1, 0, 5, 3, 2]
    s.add(_seq("C", list(range(200, 206)), 2))
    assert _run(s, {"C": 206}) == [("C", 6)]
    assert table("C") == [4, 1]
    s.add(_seq("D", [1, 2, 3, 4, 5, 6, 7], 3))
    assert _run(s, {"C": 207, "D": 8}) == [("C", 1), ("D", 3)]
    assert table("D") == [0, 5] and s.prefix_hit_tokens == 8 + 4


def test_prefill_chunks_end_at_fixed_offsets() -> None:
    """A long prompt is cut at multiples of prefill_chunk whatever else shares the step."""
    s = Scheduler(SchedulerConfig(block_size=4, num_blocks=64, max_num_batched_tokens=16, prefill_chunk=8))
    short = _seq("S", [9, 9, 9], 0)
    long = _seq("L", list(range(30)), 1)
    s.add(short)
    s.add(long)
    assert _run(s, {"S": 1}) == [("S", 3), ("L", 8)]
    assert _run(s, {"S": 2}) == [("S", 1), ("L", 8)]
    assert _run(s, {"S": 3}) == [("S", 1), ("L", 8)]
    assert _run(s, {"S": 4, "L": 30}) == [("S", 1), ("L", 6)]
    assert _run(s, {"S": 5, "L": 31}) == [("S", 1), ("L", 1)]


def test_a_request_that_can_never_fit_is_rejected() -> None:
    s = Scheduler(SchedulerConfig(block_size=4, num_blocks=6, max_num_batched_tokens=8, prefill_chunk=8))
    s.check_fits(24)
    with pytest.raises(GenerationError, match="pool holds only 6 blocks"):
        s.check_fits(25)
    windowed = Scheduler(SchedulerConfig(block_size=4, num_blocks=6, max_num_batched_tokens=8, prefill_chunk=8), window=8)
    windowed.check_fits(10_000)  # a sliding window bounds the blocks however long the request


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "block_size"),
        ({"num_blocks": -1}, "num_blocks"),
        ({"max_num_batched_tokens": 4, "prefill_chunk": 8, "block_size": 4}, "at least prefill_chunk"),
        ({"prefill_chunk": 12, "block_size": 8}, "multiple of block_size"),
    ],
)
def test_bad_scheduler_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SchedulerConfig(**kwargs)
