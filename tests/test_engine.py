"""The serving engine: paged + continuously batched greedy output equals contiguous-cache and uncached
decoding; batch invariance; parallel sampling; prefix sharing; preemption; sliding-window memory bound;
bad requests rejected while the engine keeps serving."""

from __future__ import annotations

import pytest
import torch

from triform.config import get_preset
from triform.errors import ConfigError, GenerationError
from triform.inference.engine import Engine, EngineConfig
from triform.inference.generate import generate
from triform.inference.sampling import SamplingParams
from triform.models.decoder import DecoderLM
from triform.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer()
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def _model(name: str, seed: int = 0, **changes) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = get_preset(name)
    if changes:
        cfg = cfg.replace(**changes)
    return DecoderLM(cfg).eval()


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _uncached_greedy(model: DecoderLM, prompt: list[int], steps: int) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([seq]))[0, -1, : TOK.vocab_size].argmax()))
            seq.append(out[-1])
    return out


def _small(**kw) -> EngineConfig:
    base = dict(num_blocks=96, block_size=4, prefill_chunk=16, max_num_batched_tokens=40, max_num_seqs=16)
    base.update(kw)
    return EngineConfig(**base)


@pytest.mark.parametrize("name", ["llama3-8b-tiny", "gpt2-tiny", "mistral-7b-tiny"])
def test_engine_equals_contiguous_and_uncached(name: str) -> None:
    model = _model(name)
    prompts = _prompts([5, 23, 12, 1, 30, 70, 3, 40])
    results = Engine(model, TOK, _small()).generate(prompts, GREEDY)
    contiguous = generate(model, TOK, [TOK.decode_bytes(p) for p in prompts], GREEDY)
    for p, r, c in zip(prompts, results, contiguous):
        got = r.completions[0].token_ids
        assert got == c.token_ids == _uncached_greedy(model, p, 12)


def test_engine_with_alibi_matches_uncached() -> None:
    model = _model("llama3-8b-tiny", position="alibi")
    prompts = _prompts([9, 33, 2], seed=3)
    results = Engine(model, TOK, _small()).generate(prompts, GREEDY)
    for p, r in zip(prompts, results):
        assert r.completions[0].token_ids == _uncached_greedy(model, p, 12)


def test_batch_invariance_greedy_alone_vs_batch_of_8() -> None:
    model = _model("llama3-8b-tiny", seed=4)
    target = _prompts([37], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    alone = Engine(model, TOK, _small()).generate([target], params)[0].completions[0].token_ids
    others = _prompts([3, 61, 17, 1, 44, 9, 25], seed=6)
    for position in (0, 4, 7):  # the request arrives first, in the middle, last
        batch = others[:position] + [target] + others[position:]
        results = Engine(model, TOK, _small()).generate(batch, params)
        assert results[position].completions[0].token_ids == alone


def test_batch_invariance_of_logits_is_exact() -> None:
    """Stronger than equal tokens: the logits a request sees are bit-for-bit the same in any batch."""
    model = _model("llama3-8b-tiny", seed=7)
    target = _prompts([29], seed=8)[0]

    def logits_of_target(batch: list[list[int]], index: int) -> list[torch.Tensor]:
        engine = Engine(model, TOK, _small())
        ids = [engine.submit(p, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)) for p in batch]
        seen = []
        while engine.has_unfinished():
            engine.step()
            if f"{ids[index]}/0" in engine.last_logits:
                seen.append(engine.last_logits[f"{ids[index]}/0"].clone())
        return seen

    alone = logits_of_target([target], 0)
    batch = _prompts([5, 50, 1, 18], seed=9)
    mixed = logits_of_target(batch[:2] + [target] + batch[2:], 2)
    assert len(alone) == len(mixed) == 6
    for a, b in zip(alone, mixed):
        assert torch.equal(a, b)


def test_seeded_sampling_is_reproducible_per_request() -> None:
    model = _model("llama3-8b-tiny", seed=10)
    target = _prompts([20], seed=11)[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=30, seed=123, ignore_eos=True)
    alone = Engine(model, TOK, _small()).generate([target], params)[0].completions[0].token_ids
    engine = Engine(model, TOK, _small())
    others = _prompts([7, 40, 13], seed=12)
    for i, p in enumerate(others):
        engine.submit(p, SamplingParams(temperature=0.7, max_new_tokens=25, seed=i, ignore_eos=True))
    rid = engine.submit(target, params)
    list(engine.stream())
    assert engine.result(rid).completions[0].token_ids == alone
    # the same seed through the static-batch generate() gives the same tokens too
    static = generate(model, TOK, [TOK.decode_bytes(target)], params)[0].token_ids
    assert static == alone


def test_parallel_sampling_shares_prompt_blocks_and_copies_on_write() -> None:
    model = _model("llama3-8b-tiny", seed=13)
    prompt = _prompts([26], seed=14)[0]  # 26 tokens: 6 full blocks of 4 and a shared partial one
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5, n=4, ignore_eos=True)
    engine = Engine(model, TOK, _small())
    rid = engine.submit(prompt, params)
    list(engine.stream())
    result = engine.result(rid)
    assert len(result.completions) == 4
    assert len({tuple(c.token_ids) for c in result.completions}) > 1  # different seeds per completion
    # completion 0 draws from the request's own seed: identical to an n=1 request
    single = Engine(model, TOK, _small()).generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=10, seed=5, ignore_eos=True))
    assert result.completions[0].token_ids == single[0].completions[0].token_ids
    # blocks: the prompt's 7 blocks once, then each completion's own growth (the shared partial
    # block is copied by the 3 forks that write into it); four separate requests take far more
    separate = Engine(model, TOK, _small(prefix_caching=False))
    for i in range(4):
        separate.submit(prompt, SamplingParams(temperature=1.0, max_new_tokens=10, seed=i, ignore_eos=True))
    list(separate.stream())
    assert engine.stats.blocks_allocated == 7 + 3 + 4 * 2
    assert separate.stats.blocks_allocated == 4 * 9


def test_parallel_greedy_completions_match_single_greedy() -> None:
    model = _model("gpt2-tiny", seed=15)
    prompt = _prompts([11], seed=16)[0]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, n=3, ignore_eos=True)
    result = Engine(model, TOK, _small()).generate([prompt], params)[0]
    assert [c.token_ids for c in result.completions] == [_uncached_greedy(model, prompt, 12)] * 3


def test_prefix_caching_shares_blocks_and_keeps_outputs() -> None:
    model = _model("llama3-8b-tiny", seed=17)
    prefix = _prompts([32], seed=18)[0]
    prompts = [prefix + tail for tail in _prompts([3, 9, 5, 14], seed=19)]
    on = Engine(model, TOK, _small())
    off = Engine(model, TOK, _small(prefix_caching=False))
    got_on, got_off = on.generate(prompts, GREEDY), off.generate(prompts, GREEDY)
    assert [r.completions[0].token_ids for r in got_on] == [r.completions[0].token_ids for r in got_off]
    # The second request is admitted while the first has cached only its first chunk (16 tokens);
    # the third and fourth find all 8 prefix blocks.
    assert on.scheduler.prefix_hit_tokens == 16 + 2 * 32
    assert off.scheduler.prefix_hit_tokens == 0
    assert on.stats.blocks_allocated == off.stats.blocks_allocated - (16 + 2 * 32) // 4
    for p, r in zip(prompts, got_on):
        assert r.completions[0].token_ids == _uncached_greedy(model, p, 12)


def test_preemption_under_a_tiny_pool_completes_every_request_correctly() -> None:
    model = _model("llama3-8b-tiny", seed=20)
    prompts = _prompts([30, 18, 25, 9, 33, 14], seed=21)
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    engine = Engine(model, TOK, _small(num_blocks=16))  # 64 token slots for six ~50-token sequences
    results = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    for p, r in zip(prompts, results):
        assert r.completions[0].token_ids == _uncached_greedy(model, p, 24)
    assert engine.scheduler.pool.num_free == 16  # everything returned to the pool


def test_sliding_window_blocks_stay_bounded_and_output_matches() -> None:
    window, block = 16, 4
    model = _model("mistral-7b-tiny", seed=22, sliding_window=window, max_seq_len=512)
    engine = Engine(model, TOK, _small(block_size=block))
    prompt = _prompts([21], seed=23)[0]
    rid = engine.submit(prompt, SamplingParams(temperature=0.0, max_new_tokens=150, ignore_eos=True))
    seq = engine.requests[rid].seqs[0]
    bound = -(-window // block) + 1
    held = []
    while engine.has_unfinished():
        engine.step()
        if seq.status.value == "running":
            held.append(engine.live_blocks(rid))
    assert max(held) <= bound
    assert held[-1] == bound or held[-1] == bound - 1  # flat, not growing with length
    assert engine.result(rid).completions[0].token_ids == _uncached_greedy(model, prompt, 150)


def test_streamed_text_adds_up_and_stop_strings_cut() -> None:
    model = _model("llama3-8b-tiny", seed=24)
    # Keep the untrained model to printable ASCII, so every byte it writes is one character and a
    # piece of its greedy output is a stop string it is certain to meet.
    penalty = torch.full((model.cfg.vocab_size,), -1e4)
    penalty[32:127] = 0.0
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + penalty)
    prompts = [b"abc", b"hello there", b"x"]
    reference = generate(model, TOK, prompts, SamplingParams(temperature=0.0, max_new_tokens=30))
    assert all(r.finish_reason == "length" and len(r.text) == 30 for r in reference)
    stops = tuple(sorted({r.text[4:6] for r in reference}))  # each request meets one by its 6th token
    params = SamplingParams(temperature=0.0, max_new_tokens=30, stop=stops)
    engine = Engine(model, TOK, _small())
    ids = [engine.submit(p, params) for p in prompts]
    pieces: dict[str, str] = {i: "" for i in ids}
    for out in engine.stream():
        pieces[out.request_id] += out.text
    expected = generate(model, TOK, prompts, params)
    for rid, ref, exp in zip(ids, reference, expected):
        res = engine.result(rid).completions[0]
        cut = min(i for s in stops if (i := ref.text.find(s)) >= 0)  # the earliest stop string
        assert res.finish_reason == exp.finish_reason == "stop"
        assert res.text == pieces[rid] == exp.text == ref.text[:cut]
        assert res.token_ids == exp.token_ids and len(res.token_ids) <= 6


def test_abort_frees_blocks() -> None:
    engine = Engine(_model("llama3-8b-tiny"), TOK, _small())
    rid = engine.submit(_prompts([30])[0], GREEDY)
    engine.step()
    assert engine.scheduler.pool.num_free < 96
    engine.abort(rid)
    assert not engine.has_unfinished() and engine.scheduler.pool.num_free == 96
    assert engine.result(rid).completions[0].finish_reason == "abort"


def test_bad_requests_are_rejected_and_the_engine_keeps_serving() -> None:
    model = _model("llama3-8b-tiny", seed=25)
    engine = Engine(model, TOK, _small(num_blocks=12))  # 48 token slots
    good = _prompts([10, 6], seed=26)
    ids = [engine.submit(good[0], GREEDY)]
    with pytest.raises(GenerationError, match="pool holds only 12 blocks"):
        engine.submit(_prompts([40])[0], SamplingParams(temperature=0.0, max_new_tokens=20))
    with pytest.raises(GenerationError, match="context window"):
        engine.submit([1] * 128, GREEDY)
    with pytest.raises(GenerationError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(GenerationError, match="token ids"):
        engine.submit([1, 99999], GREEDY)
    engine.step()
    ids.append(engine.submit(good[1], GREEDY))
    list(engine.stream())
    results = [engine.result(i) for i in ids]
    for p, r in zip(good, results):
        assert r.completions[0].token_ids == _uncached_greedy(model, p, 12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n \\(completions"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_invalid_sampling_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**kwargs)


def test_bad_engine_and_model_configs() -> None:
    model = _model("llama3-8b-tiny")
    with pytest.raises(ConfigError, match="block_size"):
        Engine(model, TOK, EngineConfig(block_size=0))
    with pytest.raises(ConfigError, match="block_size"):
        EngineConfig(block_size=-4)
    with pytest.raises(ConfigError, match="prefill_chunk"):
        Engine(model, TOK, EngineConfig(block_size=16, prefill_chunk=24))
    with pytest.raises(ConfigError, match="must divide n_heads"):
        get_preset("llama3-8b-tiny").replace(n_kv_heads=3)
