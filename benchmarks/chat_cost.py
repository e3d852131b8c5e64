"""What a chat turn costs: an encoder-decoder that re-reads the transcript vs a decoder that keeps it.

A 20-turn conversation with fixed synthetic user turns of 64 bytes and replies of exactly 64 bytes
(generation runs 64 steps with the end token ignored) is run on two byte-level models of (nearly)
equal parameter count, weights random (cost does not depend on them):

  - encoder-decoder (T5 1.1 layout, 3 encoder + 3 decoder layers): every turn the encoder reads
    the whole transcript so far, cross-attention keys/values are computed for it once, and the
    decoder writes the reply with its own KV cache, as `triform chat` does with such a model;
  - decoder-only (Llama layout, 7 layers): one KV cache for the whole conversation; each turn
    runs only the new user message, then decodes the reply, as `triform chat` does;
  - the same decoder-only model dropping its cache every turn (re-reading the transcript like the
    encoder-decoder), which isolates what keeping the cache saves on one and the same model.

Per turn it reports wall time (best of --repeats runs of the whole conversation) and FLOPs counted
by torch.utils.flop_counter (matrix products and attention), the cumulative ratio at turn 20, and
writes a PNG plot of both per-turn costs.

Run:  .venv/bin/python benchmarks/chat_cost.py [--turns 20] [--d-model 256] [--out benchmarks/results/chat_cost.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from triform.config import DecoderConfig, StackConfig, t5_config
from triform.models.decoder import DecoderLM
from triform.models.encoder_decoder import Seq2Seq
from triform.tokenizers.byte import denoising_tokenizer

TOPICS = ["the storm at sea", "the king's letter", "a wedding feast", "the ghost on the wall", "exile and return",
          "the borrowed ring", "a quarrel of lords", "the forest court", "a tailor's bill", "the last battle"]


def user_turn(i: int) -> bytes:
    """A fixed 64-byte user message (including its role prefix) for turn ``i``."""
    text = f"user: turn {i + 1}, tell me more about {TOPICS[i % len(TOPICS)]} please"
    return (text + " " * 64)[:63].encode() + b"\n"


def build(d: int, vocab: int) -> tuple[Seq2Seq, DecoderLM]:
    ff = 2 * round(8 * d / 3 / 2)  # gated FFN width ≈ 8d/3 in both
    s2s = Seq2Seq(t5_config(d, 3, d // 64, 64, ff, vocab, gated=True, decoder_layers=3).replace(max_seq_len=4096)).eval()
    stack = StackConfig(d_model=d, n_layers=7, n_heads=d // 64, ffn="swiglu", d_ff=ff, norm="rmsnorm", position="rope",
                        max_seq_len=4096, bias=False)
    dec = DecoderLM(DecoderConfig(stack=stack, vocab_size=vocab, tie_embeddings=False)).eval()
    return s2s, dec


def sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Q·Kᵀ and P·V: 2 multiply-adds per (query, key, channel) each. (The counter sees shapes.)"""
    *batch, tq, d = query
    tk = key[-2]
    n = 1
    for x in batch:
        n *= x
    return 4 * n * tq * tk * d


def counter() -> FlopCounterMode:
    """FLOPs of matrix products plus attention, which torch's counter leaves out for CPU SDPA kernels."""
    ops = [torch.ops.aten.scaled_dot_product_attention, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
           torch.ops.aten._scaled_dot_product_attention_math]  # the counter keys its table by op packet
    return FlopCounterMode(display=False, custom_mapping={op: sdpa_flops for op in ops})


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :256].argmax(-1, keepdim=True)  # bytes only, so replies are 64 bytes of text


@torch.inference_mode()
def run_seq2seq(model: Seq2Seq, turns: int, reply_len: int, eos: int) -> list[tuple[float, float, int]]:
    """(seconds, flops, source tokens) per turn: re-encode the transcript, then decode the reply."""
    transcript: list[int] = []
    out = []
    for i in range(turns):
        transcript += list(user_turn(i)) + list(b"assistant: ")
        source = torch.tensor([transcript + [eos]])
        with counter() as fc:
            t0 = time.perf_counter()
            memory = model.encode(source)
            cache, cross = model.new_cache(1, reply_len + 1), {}
            token = torch.full((1, 1), model.cfg.decoder_start_id)
            reply = []
            for _ in range(reply_len):
                token = greedy(model.decode(token, memory, cache=cache, memory_cache=cross))
                reply.append(int(token))
            seconds = time.perf_counter() - t0
        out.append((seconds, fc.get_total_flops(), source.shape[1]))
        transcript += reply + [10]
    return out


@torch.inference_mode()
def run_decoder(model: DecoderLM, turns: int, reply_len: int, *, reuse: bool = True) -> list[tuple[float, float, int]]:
    """(seconds, flops, tokens computed before decoding) per turn. With ``reuse`` one cache holds the
    conversation and each turn runs only the new message; without, each turn starts a fresh cache
    and re-reads the whole transcript (what an encoder-decoder must do), isolating the cache's effect."""
    cache = model.new_cache(1, 4096)
    transcript: list[int] = []
    pending: list[int] = []  # tokens of the conversation not yet in the cache
    out = []
    for i in range(turns):
        message = list(user_turn(i)) + list(b"assistant: ")
        transcript += message
        if reuse:
            new = pending + message
        else:
            cache, new = model.new_cache(1, 4096), list(transcript)
        with counter() as fc:
            t0 = time.perf_counter()
            token = greedy(model(torch.tensor([new]), cache=cache, last_only=True))
            reply = [int(token)]
            for _ in range(reply_len - 1):
                token = greedy(model(token, cache=cache))
                reply.append(int(token))
            seconds = time.perf_counter() - t0
        out.append((seconds, fc.get_total_flops(), len(new)))
        transcript += reply + [10]
        pending = [reply[-1], 10]  # the reply's last token and its newline were never fed
    return out


def plot(path: Path, s2s: list, dec: list, fresh: list, ratio_t: float, ratio_f: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = range(1, len(s2s) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    a.plot(turns, [r[0] * 1e3 for r in s2s], "o-", label="encoder-decoder (re-encodes transcript)")
    a.plot(turns, [r[0] * 1e3 for r in dec], "s-", label="decoder-only (KV cache kept)")
    a.plot(turns, [r[0] * 1e3 for r in fresh], "^--", label="decoder-only, cache dropped each turn")
    a.set_xlabel("turn")
    a.set_ylabel("ms per turn")
    a.set_title(f"wall time (cumulative ratio at turn {len(s2s)}: {ratio_t:.2f}×)")
    b.plot(turns, [r[1] / 1e9 for r in s2s], "o-", label="encoder-decoder")
    b.plot(turns, [r[1] / 1e9 for r in dec], "s-", label="decoder-only")
    b.plot(turns, [r[1] / 1e9 for r in fresh], "^--", label="decoder-only, cache dropped")
    b.set_xlabel("turn")
    b.set_ylabel("GFLOP per turn")
    b.set_title(f"FLOPs (cumulative ratio: {ratio_f:.2f}×)")
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--reply", type=int, default=64, help="reply length in bytes")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the conversation; the fastest time per turn is kept")
    ap.add_argument("--out", default="benchmarks/results/chat_cost.png")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = denoising_tokenizer()
    vocab = -(-tok.vocab_size // 8) * 8
    s2s_model, dec_model = build(args.d_model, vocab)
    n_s2s, n_dec = s2s_model.num_parameters(), dec_model.num_parameters()
    best: list[list | None] = [None, None, None]
    for _ in range(args.repeats):
        runs = [run_seq2seq(s2s_model, args.turns, args.reply, tok.eos_id), run_decoder(dec_model, args.turns, args.reply),
                run_decoder(dec_model, args.turns, args.reply, reuse=False)]
        best = [r if b is None else [min(x, y, key=lambda q: q[0]) for x, y in zip(b, r)] for b, r in zip(best, runs)]
    s2s, dec, fresh = best  # type: ignore[misc]
    print(f"encoder-decoder {n_s2s / 1e6:.2f}M parameters (3+3 layers), decoder-only {n_dec / 1e6:.2f}M (7 layers), "
          f"d_model {args.d_model}, float32, {torch.get_num_threads()} threads; {args.turns} turns of 64-byte messages "
          f"and {args.reply}-byte replies; best of {args.repeats} runs per turn")
    print()
    print("| turn | enc-dec: tokens encoded | ms | GFLOP | decoder, cache kept: new tokens | ms | GFLOP | "
          "decoder, cache dropped: tokens | ms | GFLOP | enc-dec ÷ kept: time | FLOPs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, (x, y, z) in enumerate(zip(s2s, dec, fresh), start=1):
        print(f"| {i} | {x[2]} | {x[0] * 1e3:.1f} | {x[1] / 1e9:.3f} | {y[2]} | {y[0] * 1e3:.1f} | {y[1] / 1e9:.3f} | "
              f"{z[2]} | {z[0] * 1e3:.1f} | {z[1] / 1e9:.3f} | {x[0] / y[0]:.2f}× | {x[1] / y[1]:.2f}× |")
    total = [(sum(r[0] for r in run), sum(r[1] for r in run)) for run in (s2s, dec, fresh)]
    print()
    for name, (t, f) in zip(("encoder-decoder", "decoder-only, cache kept", "decoder-only, cache dropped"), total):
        print(f"cumulative over {args.turns} turns, {name}: {t:.2f} s, {f / 1e9:.2f} GFLOP")
    (ts, fs), (td, fd), (tf, ff) = total
    print(f"cumulative ratio at turn {args.turns}, encoder-decoder ÷ decoder with cache: time {ts / td:.2f}×, FLOPs {fs / fd:.2f}×")
    print(f"cumulative ratio at turn {args.turns}, decoder without ÷ with its cache: time {tf / td:.2f}×, FLOPs {ff / fd:.2f}×")
    last = (s2s[-1][1] / dec[-1][1], s2s[-1][0] / dec[-1][0])
    print(f"turn {args.turns} alone, encoder-decoder ÷ decoder with cache: FLOPs {last[0]:.2f}×, time {last[1]:.2f}×")
    plot(Path(args.out), s2s, dec, fresh, ts / td, fs / fd)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
