"""A bounded load test of the HTTP server on the trained fixture: 128 streaming clients at once, with
seeded prompts of 4..40 bytes and 8..24 new tokens each, greedy, against a KV pool small enough
that requests wait and get preempted. Every client that reads to the end gets the offline engine's
text for its prompt; a few clients hang up early and get a prefix of it; no response is a 5xx; and
once all are done the server holds no request and no KV block. Throughput and latency are printed,
never asserted (timeouts are hang guards only)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from conftest import synthetic_text
from serve_utils import HANG, metrics, serve_in_thread, small_app, wait_for_metrics

from triform.inference.core import EngineConfig
from triform.inference.engine import Engine
from triform.inference.sampling import SamplingParams
from triform.interop import load_pretrained

CLIENTS = 128
HANG_UP_EVERY = 16  # every 16th client closes its stream after a few chunks
HANG_UP_AFTER = 3
ENGINE = dict(num_blocks=48, block_size=16, max_num_seqs=24, max_num_batched_tokens=256, prefill_chunk=64)


@dataclass
class Client:
    """One streaming request and what came back."""

    prompt: str
    max_tokens: int
    hang_up: bool
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    error: str | None = None


def workload(seed: int) -> list[Client]:
    """Seeded prompts cut from the synthetic corpus (some repeat, so prefixes are shared) with
    mixed output lengths; prompt plus output always fits the model's 64-token context."""
    rng = random.Random(seed)
    text = synthetic_text(200, seed=11)
    clients = []
    for i in range(CLIENTS):
        n = rng.randint(4, 40)
        start = rng.randrange(len(text) - n)
        clients.append(Client(text[start : start + n], rng.randint(8, 24), hang_up=i % HANG_UP_EVERY == 5))
    return clients


async def run_client(http: httpx.AsyncClient, c: Client, start: asyncio.Event) -> None:
    body = {"prompt": c.prompt, "max_tokens": c.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    await start.wait()
    c.sent = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        c.status = resp.status_code
        if resp.status_code != 200:
            c.error = (await resp.aread()).decode("utf-8", errors="replace")
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                c.error = chunk["error"]["message"]
                continue
            if chunk.get("usage"):
                c.usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["text"]:
                    c.token_times.append(time.perf_counter())
                    c.text += choice["text"]
                c.finish_reason = choice["finish_reason"] or c.finish_reason
            if c.hang_up and len(c.token_times) >= HANG_UP_AFTER:
                return  # leaving the block closes the connection mid-stream


async def run_all(url: str, clients: list[Client]) -> float:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=HANG) as http:
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(run_client(http, c, start)) for c in clients]
        await asyncio.sleep(0)  # every client is waiting at the start line
        began = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return time.perf_counter() - began


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def test_128_streaming_clients_get_the_offline_engine_s_answers_and_nothing_leaks(trained_run: Path) -> None:
    clients = workload(seed=5)
    model, tok, _ = load_pretrained(trained_run)
    offline = Engine(model, tok, EngineConfig(**ENGINE))
    params = [SamplingParams(temperature=0.0, max_new_tokens=c.max_tokens) for c in clients]
    expected = [r.completions[0] for r in offline.generate([c.prompt for c in clients], params)]
    assert offline.stats.preemptions > 0  # the pool is small enough that the load test preempts too

    with serve_in_thread(small_app(trained_run, engine=ENGINE, model_name="tiny")) as url:
        idle = metrics(url)
        assert idle["triform_requests_running"] == idle["triform_requests_waiting"] == 0
        elapsed = asyncio.run(asyncio.wait_for(run_all(url, clients), HANG))
        after = wait_for_metrics(
            url, lambda m: m["triform_requests_running"] == 0 and m["triform_requests_waiting"] == 0
            and m["triform_kv_blocks_used"] == idle["triform_kv_blocks_used"],
            "every request to end and free its KV blocks",
        )

    assert [c.status for c in clients] == [200] * CLIENTS, [c.error for c in clients if c.status != 200][:3]
    assert [c.error for c in clients] == [None] * CLIENTS
    assert all(c.text for c in clients)
    finished = [(c, e) for c, e in zip(clients, expected) if not c.hang_up]
    for c, e in finished:
        assert c.text == e.text, (c.prompt, c.max_tokens)
        assert c.finish_reason == {"eos": "stop"}.get(e.finish_reason, e.finish_reason)
        assert c.usage == {"prompt_tokens": len(tok.encode(c.prompt)), "completion_tokens": len(e.token_ids),
                           "total_tokens": len(tok.encode(c.prompt)) + len(e.token_ids)}
    for c, e in zip(clients, expected):
        if c.hang_up:
            assert c.text and e.text.startswith(c.text), (c.prompt, c.text, e.text)

    def delta(series: str) -> float:
        return after.get(series, 0.0) - idle.get(series, 0.0)

    statuses = {k: delta(k) for k in after if k.startswith("triform_requests_total{")}
    assert all(v == 0 for k, v in statuses.items() if '"5' in k), statuses
    ok, gone = delta('triform_requests_total{status="200"}'), delta('triform_requests_total{status="499"}')
    assert ok + gone == CLIENTS and ok >= len(finished), statuses
    assert delta("triform_prompt_tokens_total") == sum(len(tok.encode(c.prompt)) for c in clients)
    assert delta("triform_time_to_first_token_seconds_count") == CLIENTS
    assert delta("triform_generation_tokens_total") >= sum(len(e.token_ids) for _, e in finished)

    ttft = [c.token_times[0] - c.sent for c in clients if c.token_times]
    itl = [b - a for c in clients for a, b in zip(c.token_times, c.token_times[1:])]
    tokens = sum(len(c.token_times) for c in clients)
    print(
        f"\n{CLIENTS} streaming clients ({len(finished)} to the end): {elapsed:.2f} s, "
        f"{CLIENTS / elapsed:.1f} requests/s, {tokens / elapsed:.0f} streamed tokens/s; "
        f"TTFT p50 {quantile(ttft, 0.5) * 1e3:.0f} ms, p99 {quantile(ttft, 0.99) * 1e3:.0f} ms; "
        f"inter-token p50 {quantile(itl, 0.5) * 1e3:.1f} ms, p99 {quantile(itl, 0.99) * 1e3:.1f} ms; "
        f"server-side: {delta('triform_generation_tokens_total'):.0f} tokens generated, "
        f"{ok:.0f} responses 200, {gone:.0f} 499 (client left)"
    )
