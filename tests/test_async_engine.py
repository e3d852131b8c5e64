"""The engine core and its asyncio front end: outputs equal the offline engine's under concurrency,
seeded parallel sampling reproducible, aborts (aclose, cancellation, a dropped stream) free blocks,
nothing leaks, admission control, graceful shutdown, a core failure reaching every client, and only
the core thread touching core state. Also the core's own contract: requests forgotten when they end,
usage counts and times in the outputs, logprobs of the chosen tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import torch
from test_engine import _model as engine_model, _prompts  # the same tiny models and prompts

from triform.errors import ConfigError, GenerationError
from triform.inference.async_engine import AsyncEngine, EngineDead, EngineOverloaded, EngineStopped, RequestStream
from triform.inference.core import EngineCore, RequestOutput
from triform.inference.decode import DecodeStream
from triform.inference.engine import Engine, EngineConfig
from triform.inference.sampling import SamplingParams
from triform.models.decoder import DecoderLM
from triform.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer()
HANG = 120.0  # seconds: a hang guard only, never a timing assertion


def _model(name: str = "llama3-8b-tiny", seed: int = 0, **changes) -> DecoderLM:
    return engine_model(name, seed, **changes)


def _small(**kw) -> EngineConfig:
    base = dict(num_blocks=96, block_size=4, prefill_chunk=16, max_num_batched_tokens=40, max_num_seqs=16)
    base.update(kw)
    return EngineConfig(**base)


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, HANG))


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (polling; a hang guard fails the test if it never holds)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), 30.0)


Consumed = tuple[dict[int, list[int]], dict[int, str], dict[int, str], list[RequestOutput]]


async def _consume(stream: RequestStream) -> Consumed:
    """Token ids, text and finish reason per completion index, and every output, in order."""
    ids: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    reasons: dict[int, str] = {}
    outs: list[RequestOutput] = []
    async for out in stream:
        outs.append(out)
        ids.setdefault(out.index, []).extend(out.token_ids)
        text[out.index] = text.get(out.index, "") + out.text
        if out.finished:
            assert out.index not in reasons  # each completion finishes exactly once
            reasons[out.index] = out.finish_reason
    return ids, text, reasons, outs


def _assert_empty(engine: AsyncEngine) -> None:
    """After the core thread has exited: no request state anywhere, every block free."""
    core = engine.core
    assert not engine.is_running and engine.num_open == 0 and engine.num_queued == 0
    assert not core._requests and not core.scheduler.running and not core.scheduler.waiting
    assert not core.scheduler.kv.seqs
    assert core.scheduler.pool.num_free == core.scheduler.config.num_blocks  # cached-but-free blocks count as free
    st = engine.stats()
    assert st.requests == st.running == st.waiting == st.kv_blocks_used == 0


# ----------------------------------------------------------------------------------- front end


def test_32_concurrent_greedy_requests_equal_the_offline_engine_and_leave_nothing() -> None:
    model = _model(seed=2)
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 70, (32,), generator=g).tolist()
    news = torch.randint(1, 16, (32,), generator=g).tolist()
    prompts = _prompts(lengths, seed=4)
    params = [SamplingParams(temperature=0.0, max_new_tokens=k, ignore_eos=True) for k in news]
    offline = Engine(model, TOK, _small()).generate(prompts, params)

    async def main() -> list:
        async with AsyncEngine(model, TOK, _small()) as engine:
            streams = [engine.generate(p, sp) for p, sp in zip(prompts, params)]
            got = await asyncio.gather(*(_consume(s) for s in streams))
            st = engine.stats()
            assert st.requests == st.running == st.waiting == st.kv_blocks_used == 0 and engine.num_open == 0
            assert st.prompt_tokens == sum(lengths) and st.generated_tokens == sum(news)
        _assert_empty(engine)
        return got

    got = _run(main())
    for p, k, ref, (ids, text, reasons, outs) in zip(prompts, news, offline, got):
        c = ref.completions[0]
        assert ids == {0: c.token_ids} and text == {0: c.text} and reasons == {0: "length"}
        last = outs[-1]
        assert last.request_finished and last.completion_tokens == k and last.prompt_tokens == len(p)
        assert not any(o.request_finished for o in outs[:-1])


def test_parallel_sampling_with_a_seed_is_reproducible_and_equals_the_offline_engine() -> None:
    model = _model(seed=5)
    target = _prompts([19], seed=6)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=14, seed=7, n=2, ignore_eos=True)
    others = _prompts([3, 40, 11], seed=8)
    other_params = [SamplingParams(temperature=0.8, max_new_tokens=9, seed=i, ignore_eos=True) for i in range(3)]
    offline = Engine(model, TOK, _small()).generate([target], params)[0]

    async def once(position: int) -> dict[int, list[int]]:
        async with AsyncEngine(model, TOK, _small()) as engine:
            streams = [engine.generate(p, sp) for p, sp in zip(others, other_params)]
            streams.insert(position, engine.generate(target, params, request_id="target"))
            got = await asyncio.gather(*(_consume(s) for s in streams))
        _assert_empty(engine)
        assert got[position][2] == {0: "length", 1: "length"}
        return got[position][0]

    first, second = _run(once(0)), _run(once(3))
    assert first == second == {i: c.token_ids for i, c in enumerate(offline.completions)}
    assert first[0] != first[1]


def test_stopping_a_stream_early_aborts_the_request_and_frees_its_blocks() -> None:
    # a sliding window and relative positions: no context limit, so only an abort ends these requests
    model = _model("mistral-7b-tiny", seed=9)
    prompt = _prompts([30], seed=10)[0]
    long = SamplingParams(temperature=0.0, max_new_tokens=100_000, ignore_eos=True)

    async def main() -> None:
        async with AsyncEngine(model, TOK, _small()) as engine:
            before = engine.stats().kv_blocks_used

            def freed() -> None:
                st = engine.stats()
                assert st.requests == 0 and st.kv_blocks_used == before and engine.num_open == 0

            # aclose() after three outputs: returns once the core has freed the blocks
            stream = engine.generate(prompt, long)
            outs = [await stream.__anext__() for _ in range(3)]
            assert not any(o.finished for o in outs) and engine.stats().kv_blocks_used > before
            await stream.aclose()
            freed()
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()

            # the consuming task is cancelled (a client disconnect)
            seen = asyncio.Event()

            async def reader(s: RequestStream) -> None:
                count = 0
                async for _ in s:
                    count += 1
                    if count == 3:
                        seen.set()

            stream = engine.generate(prompt, long, request_id="cancelled")
            task = asyncio.create_task(reader(stream))
            await seen.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _until(lambda: engine.num_open == 0)  # the cancellation sent the abort
            freed()

            # the consumer breaks out and drops the stream: its finaliser sends the abort
            stream = engine.generate(prompt, long)
            count = 0
            async for _ in stream:
                count += 1
                if count == 3:
                    break
            del stream
            await _until(lambda: engine.num_open == 0)
            freed()

            # another party aborts: the consumer sees "abort" on the last output
            stream = engine.generate(prompt, dataclasses.replace(long, n=2), request_id="other")
            first = await stream.__anext__()
            await engine.abort("other")
            rest = [o async for o in stream]
            assert not first.finished and [o.finish_reason for o in rest if o.finished] == ["abort", "abort"]
            assert rest[-1].request_finished
            freed()
        _assert_empty(engine)

    _run(main())


def test_admission_control_and_validation_before_the_core() -> None:
    model = _model(seed=11)
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    with pytest.raises(ConfigError, match="max_waiting"):
        AsyncEngine(model, TOK, _small(), max_waiting=-1)

    async def main() -> None:
        engine = AsyncEngine(model, TOK, _small(num_blocks=12), max_waiting=2)
        with pytest.raises(EngineStopped, match="not accepting"):
            engine.generate([1, 2, 3], params)
        await engine.start()
        added: list[str] = []
        real_add = engine.core.add_request

        def add(rid: str, *args: Any, **kwargs: Any) -> None:
            added.append(rid)
            if rid == "refused-by-core":  # the core re-checks what the front end checked
                raise GenerationError("refused by the core")
            real_add(rid, *args, **kwargs)

        engine.core.add_request = add  # type: ignore[method-assign]
        # outputs reach the front end only while the event loop runs, so with no await in between
        # the first two requests are still waiting when the third arrives
        a, b = engine.generate([1, 2, 3], params), engine.generate([4, 5], params)
        with pytest.raises(EngineOverloaded, match="max_waiting=2"):
            engine.generate([6, 7], params)
        assert engine.num_queued == 2 and engine.num_open == 2
        for bad, match in [
            (([1] * 128, params), "context window"),
            (([], params), "empty"),
            (([1, 99999], params), "token ids"),
            (([1, 2], SamplingParams(n=20)), "max_num_seqs"),
            (([1] * 40, SamplingParams(max_new_tokens=20)), "pool holds only 12 blocks"),
            (([1, 2], "greedy"), "SamplingParams"),
        ]:
            with pytest.raises(GenerationError, match=match):
                engine.generate(*bad)
        with pytest.raises(GenerationError, match="already in use"):
            engine.generate([1], params, request_id=a.request_id)
        await asyncio.gather(_consume(a), _consume(b))
        assert engine.num_queued == 0
        with pytest.raises(GenerationError, match="refused by the core"):  # that request only
            await _consume(engine.generate([6], params, request_id="refused-by-core"))
        assert engine.num_queued == 0 and engine.num_open == 0 and engine.is_running
        c = engine.generate([6, 7], params)  # room again
        ids, _, reasons, _ = await _consume(c)
        assert reasons == {0: "length"} and len(ids[0]) == 6
        await engine.shutdown(grace_s=5.0)
        # the requests the front end refused never reached the core
        assert added == [a.request_id, b.request_id, "refused-by-core", c.request_id]
        with pytest.raises(EngineStopped):
            engine.generate([1], params)
        _assert_empty(engine)

    _run(main())


def test_shutdown_lets_short_requests_finish_within_the_grace_and_aborts_the_rest() -> None:
    # relative positions with a sliding window have no context limit, so the long requests could
    # run on for 100k tokens; the grace period runs on a clock the test moves by hand
    model = _model("mistral-7b-tiny", seed=12)
    now = [0.0]
    short = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_new_tokens=100_000, ignore_eos=True)
    prompts = _prompts([9, 20, 5, 33, 14], seed=13)

    async def main() -> None:
        engine = AsyncEngine(model, TOK, _small(), clock=lambda: now[0])
        await engine.start()
        shorts = [asyncio.create_task(_consume(engine.generate(p, short))) for p in prompts[:3]]
        longs = [asyncio.create_task(_consume(engine.generate(p, long))) for p in prompts[3:]]
        stopping = asyncio.create_task(engine.shutdown(grace_s=10.0))
        await asyncio.sleep(0)
        with pytest.raises(EngineStopped):
            engine.generate([1, 2], short)
        for ids, _, reasons, _ in await asyncio.gather(*shorts):
            assert reasons == {0: "length"} and len(ids[0]) == 4
        assert not stopping.done() and not any(t.done() for t in longs) and engine.is_running
        now[0] = 11.0  # the grace period is over
        await stopping
        for ids, _, reasons, outs in await asyncio.gather(*longs):
            assert reasons == {0: "abort"} and outs[-1].request_finished and len(ids[0]) < 100_000
        _assert_empty(engine)
        await engine.shutdown()  # again: nothing left to do

    _run(main())


def test_a_failure_in_the_core_reaches_every_consumer_and_refuses_new_requests() -> None:
    model = _model(seed=14)
    calls = itertools.count()

    class Injected(RuntimeError):
        pass

    def boom(module: torch.nn.Module, args: tuple) -> None:
        if next(calls) == 2:
            raise Injected("injected failure in the forward pass")

    model.blocks[0].register_forward_pre_hook(boom)
    params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)

    async def main() -> None:
        engine = AsyncEngine(model, TOK, _small())
        await engine.start()

        async def client(p: list[int]) -> BaseException | None:
            try:
                await _consume(engine.generate(p, params))
            except EngineDead as e:
                return e
            return None

        errors = await asyncio.gather(*(client(p) for p in _prompts([5, 12, 30, 2, 17, 8, 40, 3], seed=15)))
        assert all(isinstance(e, EngineDead) and isinstance(e.__cause__, Injected) for e in errors)
        with pytest.raises(EngineDead) as info:
            engine.generate([1, 2], params)
        assert isinstance(info.value.__cause__, Injected)
        await engine.shutdown(grace_s=1.0)
        assert not engine.is_running and engine.num_open == 0 and engine.num_queued == 0

    _run(main())


def test_only_the_core_thread_touches_core_state() -> None:
    model = _model(seed=16)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)

    async def main() -> None:
        engine = AsyncEngine(model, TOK, _small())
        callers: list[tuple[str, int]] = []
        core = engine.core
        for name in ("add_request", "abort_request", "step", "has_unfinished", "abort_all"):
            real = getattr(core, name)

            def spy(*args: Any, _real: Callable[..., Any] = real, _name: str = name, **kwargs: Any) -> Any:
                callers.append((_name, threading.get_ident()))
                return _real(*args, **kwargs)

            setattr(core, name, spy)
        await engine.start()
        streams = [engine.generate(p, params) for p in _prompts([4, 25, 9], seed=17)]
        await streams[0].__anext__()
        with pytest.raises(RuntimeError, match="belongs to thread"):
            core.step()  # the guard refuses the event-loop thread while the core runs
        with pytest.raises(RuntimeError, match="belongs to thread"):
            core.add_request("x", [1, 2], params)
        await streams[0].aclose()
        await asyncio.gather(*(_consume(s) for s in streams[1:]))
        await engine.shutdown()
        main_thread = threading.get_ident()
        core_thread = engine._thread.ident  # type: ignore[union-attr]
        assert core.owner_thread == core_thread != main_thread
        assert {n for n, _ in callers} >= {"add_request", "abort_request", "step", "has_unfinished"}
        assert {t for _, t in callers} == {core_thread, main_thread}
        assert [n for n, t in callers if t == main_thread] == ["step", "add_request"]  # only the two refused
        _assert_empty(engine)

    _run(main())


# ---------------------------------------------------------------------------------------- core


def test_core_forgets_requests_as_they_end_and_outputs_carry_usage_and_times() -> None:
    model = _model(seed=18)
    ticks = itertools.count()
    core = EngineCore(model, TOK, _small(), clock=lambda: float(next(ticks)))
    prompts = _prompts([7, 22], seed=19)
    core.add_request("a", prompts[0], SamplingParams(temperature=1.0, max_new_tokens=5, n=2, seed=3, ignore_eos=True))
    core.add_request("b", prompts[1], SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    core.add_request("c", prompts[1], SamplingParams(temperature=0.0, max_new_tokens=3, n=3, ignore_eos=True))
    assert core.stats().requests == 3 and core.stats().waiting == 3
    aborted = core.abort_request("c")  # before any step: no completion has begun
    assert [(o.index, o.finish_reason, o.token_ids, o.completion_tokens) for o in aborted] == [
        (0, "abort", [], 0), (1, "abort", [], 0), (2, "abort", [], 0)]
    assert [o.request_finished for o in aborted] == [False, False, True] and core.abort_request("c") == []
    outs: list[RequestOutput] = []
    while core.has_unfinished():
        step = core.step()
        for o in step:
            if o.request_finished:
                with pytest.raises(KeyError):
                    core.sequences(o.request_id)  # forgotten in the same step
        outs += step
    assert core.stats().requests == 0 and not core._requests and core.stats().kv_blocks_used == 0
    for rid, n, prompt, k in [("a", 2, prompts[0], 5), ("b", 1, prompts[1], 3)]:
        mine = [o for o in outs if o.request_id == rid]
        assert [o.request_finished for o in mine] == [False] * (len(mine) - 1) + [True]
        for j in range(n):
            comp = [o for o in mine if o.index == j]
            assert [o.completion_tokens for o in comp] == list(range(1, k + 1))
            assert [o.finished for o in comp] == [False] * (k - 1) + [True] and comp[-1].finish_reason == "length"
            assert all(o.prompt_tokens == len(prompt) and o.logprobs is None for o in comp)
            times = [o.time for o in comp]
            assert times == sorted(set(times)) and comp[0].arrival_time < times[0]  # one clock tick per step
            assert all(o.first_token_time == times[0] for o in comp)
    # the offline driver keeps results of its own requests; its core forgets them
    engine = Engine(model, TOK, _small())
    rid = engine.submit(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=4, n=2, ignore_eos=True))
    list(engine.stream())
    assert engine.core.stats().requests == 0 and rid in engine.requests
    assert len(engine.result(rid).completions) == 2 and not engine.requests


def test_logprobs_of_the_chosen_tokens_follow_the_model() -> None:
    model = _model(seed=20)
    prompt = _prompts([11], seed=21)[0]
    core = EngineCore(model, TOK, _small())
    core.add_request("greedy", prompt, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, logprobs=3))
    sampled = SamplingParams(temperature=1.5, max_new_tokens=6, ignore_eos=True, seed=1, logprobs=0)
    core.add_request("sampled", prompt, sampled)
    outs: dict[str, list[RequestOutput]] = {"greedy": [], "sampled": []}
    while core.has_unfinished():
        for o in core.step():
            outs[o.request_id].append(o)
    vocab = core.vocab
    for rid, k in [("greedy", 3), ("sampled", 0)]:
        seq = list(prompt)
        for o in outs[rid]:
            (token,) = o.token_ids
            assert o.logprobs is not None and len(o.logprobs) == 1 and o.logprobs[0].token_id == token
            with torch.no_grad():
                want = torch.log_softmax(model(torch.tensor([seq]))[0, -1, :vocab].float(), dim=-1)  # (V,)
            lp = o.logprobs[0]
            torch.testing.assert_close(lp.logprob, float(want[token]), atol=1e-4, rtol=0)
            assert len(lp.top) == k
            if k:
                top_v, top_i = want.topk(k)
                assert [t for t, _ in lp.top] == top_i.tolist() and lp.top[0][0] == token  # greedy picks the best
                torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top_v, atol=1e-4, rtol=0)
            seq.append(token)
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(GenerationError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_an_aborted_stream_shows_its_held_back_text() -> None:
    stream = DecodeStream(SamplingParams(stop=("xyz",)), TOK.token_bytes(), TOK.eos_id)
    assert stream.accept(ord("a")) == ("a", None)
    assert stream.accept(ord("x")) == ("", None)  # could be the start of "xyz"
    assert stream.abort() == "x" and stream.text == "ax" and stream.finish_reason == "abort"
    with pytest.raises(GenerationError, match="already finished"):
        stream.abort()
