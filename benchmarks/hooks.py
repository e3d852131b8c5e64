"""The cost of hook points: a decoder's forward pass and a one-token decode step with no hooks
installed (the ordinary path), with the hooked path taken but nothing kept, caching a filtered set
of names (the residual stream after each block), and caching everything; time and cache memory.

With no scope installed each block, attention and FFN call tests one attribute before taking the
ordinary path; the first row of the micro-benchmark is that test's cost.

    .venv/bin/python benchmarks/hooks.py            # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from triform.config import get_preset
from triform.inspect.hooks import hooks_installed, run_with_cache
from triform.layers.hooks import hook
from triform.models.decoder import DecoderLM


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    ns = p.parse_args()
    torch.manual_seed(0)
    cfg = get_preset("llama3-8b-tiny").replace(d_model=ns.d_model, n_layers=ns.layers, n_heads=6, n_kv_heads=2,
                                               head_dim=ns.d_model // 6, d_ff=4 * ns.d_model, vocab_size=8192,
                                               max_seq_len=ns.context + 8)
    model = DecoderLM(cfg).eval()
    x = torch.randint(0, 8192, (ns.batch, ns.context))
    print(f"## Cost of hooks: Llama-shaped decoder d={ns.d_model} L={ns.layers} (GQA 6/2, RoPE, SwiGLU), "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")
    print()

    class Scopeless:
        _hook_scope = None

    s = Scopeless()
    t = torch.zeros(1)
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        hook(s, "hook_resid_pre", t)
    per_call = (time.perf_counter() - t0) / n
    print(f"one hook point with nothing installed: {per_call * 1e9:.0f} ns "
          f"(a forward pass of this model passes {1 + 4 * ns.layers} such tests)")
    print()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    cache = model.new_cache(1, ns.context + 8)
    with torch.no_grad():
        model(x[:1], cache=cache)
    one = x[:1, :1]

    def decode() -> None:
        with torch.no_grad():
            model(one, cache=cache)
            cache.truncate(cache.seen - 1)  # the same step again: the cache neither grows nor overflows

    rows = []
    base_f, base_d = timed(forward, ns.repeats), timed(decode, ns.repeats * 4)
    rows.append(("no hooks installed (the ordinary path)", base_f, base_d, 0))
    with hooks_installed(model, {}):
        rows.append(("hooked path, no function, nothing kept", timed(forward, ns.repeats), timed(decode, ns.repeats * 4), 0))
    for label, names in (("cache blocks.*.hook_resid_post", "blocks.*.hook_resid_post"), ("cache everything", None)):
        _, c = run_with_cache(model, x, names=names)
        rows.append((label, timed(lambda: run_with_cache(model, x, names=names), ns.repeats), float("nan"), c.nbytes))
    print(f"| run | forward (B={ns.batch}, T={ns.context}) ms | vs ordinary | decode step ms | vs ordinary | cache MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, f, d, nbytes in rows:
        dec = "-" if d != d else f"{d * 1e3:.2f}"
        dr = "-" if d != d else f"{d / base_d:.2f}x"
        print(f"| {label} | {f * 1e3:.1f} | {f / base_f:.2f}x | {dec} | {dr} | {nbytes / 2**20:.1f} |")
    print()
    print("Caching everything also materialises the attention scores and probabilities (the kernel otherwise never "
          "forms them); a filtered cache forms them only when a pattern or score name is asked for.")


if __name__ == "__main__":
    main()
