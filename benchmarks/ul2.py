"""Causal LM vs span corruption vs UL2's mixture of denoisers, at an equal CPU budget.

Byte-level models of one size are trained on Shakespeare's works (four plays held out: hamlet,
twelfth_night, richard_ii, winters_tale) for the same wall-clock budget each, one after another:

  (a) causal: a DecoderLM trained as a plain left-to-right language model;
  (b) span: the same DecoderLM trained on T5 span corruption (ByT5's 15% noise, mean span 20 bytes),
      as a prefix-LM (bidirectional over the corrupted input, causal over the targets);
  (c) ul2: the same DecoderLM trained on UL2's mixture (R, X and S denoisers with mode tokens);
  with --seq2seq, also (d) span and (e) ul2 on an encoder-decoder (ByT5 layout, 3:1 depth) of about
  the same parameter count.

Each is scored on the same held-out windows of 768 bytes:
  - continuation: bits per byte of the last 256 bytes given the first 512 (causal: plain
    left-to-right; span: the 256 bytes as one span at the end; ul2: the [S2S] mode, prefix-LM);
  - infilling: bits per byte of the hidden bytes when 15% of the window is hidden in spans of mean
    length 8 and 20 (span: as trained; ul2: the [NLU] mode; the causal model, which cannot see
    right context, scores each hidden byte given everything to its left in the original text).

UL2's claim (arXiv 2205.05131) is that the mixture does well on both kinds of task.

Run:  .venv/bin/python benchmarks/ul2.py [--budget 6m] [--seq2seq] [--windows 64]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from triform.checkpoint import load_checkpoint
from triform.data.shakespeare import shakespeare_corpus
from triform.models.encoder_decoder import Seq2Seq
from triform.objectives.denoise import IGNORE, prefix_lm_batch, seq2seq_batch
from triform.objectives.span_corruption import corrupt_spans
from triform.tokenizers.byte import denoising_tokenizer, sentinel_ids
from triform.training.denoise import ByteWindows, DenoiseConfig, pretrain_denoiser
from triform.training.trainer import LN2

PREFIX, CONT = 512, 256
DECODER = ("shakespeare", {"d_model": 192, "n_layers": 4, "n_heads": 4})  # Llama-style: RoPE, SwiGLU, RMSNorm
SEQ2SEQ = ("byt5-mini", {})  # d 192, 3 encoder + 1 decoder layers, gated GELU


def score(model, pairs, *, causal: bool = False, batch: int = 8) -> tuple[float, int]:
    """Total nats and scored bytes over (inputs, targets) pairs: only byte targets count. With
    ``causal`` the pairs are (window, positions) and a causal model is scored at those positions."""
    tok = denoising_tokenizer()
    nats, nbytes = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            if causal:
                x = torch.tensor([w[:-1] for w, _ in chunk])
                y = torch.full_like(x, IGNORE)
                for r, (w, pos) in enumerate(chunk):
                    idx = torch.tensor(pos) - 1  # the logit at p-1 predicts byte p
                    y[r, idx] = torch.tensor(w)[idx + 1]
                logits = model(x)
            elif isinstance(model, Seq2Seq):
                b = seq2seq_batch(chunk, pad_id=tok.pad_id, start_id=tok.pad_id)
                logits, y = model(b.source, b.decoder_input, source_mask=b.source_mask), b.labels
            else:
                x, y, prefix = prefix_lm_batch(chunk, pad_id=tok.pad_id)
                logits = model(x, prefix_lengths=prefix)
            y = torch.where((y >= 0) & (y < 256), y, IGNORE)  # sentinels and </s> are format, not text
            nats += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum").item()
            nbytes += int((y != IGNORE).sum())
    return nats, nbytes


def evaluate(model, objective: str, windows: list[list[int]], spans: dict[int, list]) -> dict[str, float]:
    tok = denoising_tokenizer()
    s0, eos = sentinel_ids(tok)[0], tok.eos_id
    out = {}
    if objective == "causal":
        nats, n = score(model, [(w, list(range(PREFIX, PREFIX + CONT))) for w in windows], causal=True)
    elif objective == "span":
        nats, n = score(model, [(w[:PREFIX] + [s0, eos], [s0, *w[PREFIX:], eos]) for w in windows])
    else:
        mode = tok.special_id("[S2S]")
        nats, n = score(model, [([mode, *w[:PREFIX], eos], [*w[PREFIX:], eos]) for w in windows])
    out["continuation"] = nats / (n * LN2)
    for mu, cases in spans.items():
        if objective == "causal":
            pairs = [(w, [p for a, b in sp for p in range(a, b) if p > 0]) for w, sp, _ in cases]
            nats, n = score(model, pairs, causal=True)
        else:
            mode = [tok.special_id("[NLU]")] if objective == "ul2" else []
            nats, n = score(model, [(mode + i, o) for _, _, (i, o) in cases])
        out[f"infill{mu}"] = nats / (n * LN2)
    return out


def infill_cases(windows: list[list[int]], mu: int) -> list:
    """Each window corrupted once (fixed seed): (window, hidden spans, (inputs, targets))."""
    from triform.objectives.span_corruption import noise_spans

    tok = denoising_tokenizer()
    rng = random.Random(mu)
    cases = []
    for w in windows:
        state = rng.getstate()
        spans = noise_spans(len(w), noise_density=0.15, mean_span=mu, rng=rng)
        rng.setstate(state)
        pair = corrupt_spans(w, sentinel_ids(tok), noise_density=0.15, mean_span=mu, rng=rng, eos=tok.eos_id)
        cases.append((w, spans, pair))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="6m", help="wall-clock training budget per model")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 768 bytes to score")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq2seq", action="store_true", help="also train encoder-decoders with span and ul2")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = shakespeare_corpus()
    held = ByteWindows([d.text for d in corpus.val], PREFIX + CONT)
    windows = held.sample(args.windows, random.Random(2026))
    spans = {mu: infill_cases(windows, mu) for mu in (8, 20)}
    systems = [("causal", *DECODER), ("span", *DECODER), ("ul2", *DECODER)]
    if args.seq2seq:
        systems += [("span", *SEQ2SEQ), ("ul2", *SEQ2SEQ)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (objective, preset, overrides) in enumerate(systems):
            cfg = DenoiseConfig(objective=objective, context=PREFIX + CONT, batch_size=args.batch_size, max_steps=100000,
                                time_budget=args.budget, lr=2e-3, warmup_steps=30, seed=0)
            t0 = time.perf_counter()
            r = pretrain_denoiser(cfg, preset=preset, out_dir=Path(tmp) / str(i), overrides=overrides)
            model = load_checkpoint(r.checkpoint, kind=r.family)[0]
            m = evaluate(model, objective, windows, spans)
            rows.append((objective, r.family, r.parameters, r.steps, r.target_tokens, m))
            print(f"{objective:>7} {r.family:<8} {r.parameters / 1e6:.2f}M  {r.steps} steps in {r.seconds:.0f}s, {r.target_tokens / 1e6:.2f}M target tokens  "
                  f"continuation {m['continuation']:.3f}  infill(8) {m['infill8']:.3f}  infill(20) {m['infill20']:.3f}  "
                  f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    print()
    print(f"Held-out plays, {args.windows} windows of {PREFIX + CONT} bytes; bits per byte (lower is better); "
          f"budget {args.budget} per model, batch {args.batch_size} windows of {PREFIX + CONT} bytes.")
    print()
    print("| objective | family | params | steps | target tokens trained on | continuation (256 given 512) | infill μ=8 | infill μ=20 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for objective, family, n, steps, targets, m in rows:
        print(f"| {objective} | {family} | {n / 1e6:.2f}M | {steps} | {targets / 1e6:.2f}M | {m['continuation']:.3f} | "
              f"{m['infill8']:.3f} | {m['infill20']:.3f} |")
    print()
    best = {k: min(r[5][k] for r in rows) for k in ("continuation", "infill8", "infill20")}
    for objective, family, *_, m in rows:
        ratios = "  ".join(f"{k} {m[k] / best[k]:.3f}×best" for k in best)
        print(f"{objective:>7} {family:<8} {ratios}")
    print("(the causal model's infilling sees left context only)")


if __name__ == "__main__":
    main()
