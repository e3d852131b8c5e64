"""Training throughput: triform vs Hugging Face ``transformers`` at equal config, on CPU, in float32
and under bfloat16 autocast.

What it measures
----------------
For a GPT-2-shaped and a Llama-shaped config (reduced to fit a small CPU), one full training step
(forward, next-token cross-entropy, backward, grad-norm clip 1.0, AdamW step, zero_grad) of

* triform's ``DecoderLM`` and
* HF ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` built from an equivalent config (random weights),

on the same random token batches, with the same optimizer (``triform.training.optim.build_optimizer``:
AdamW, identical hyperparameters and decay/no-decay grouping) and the same step function
(``triform.training.loop.train_step`` with the causal-LM objective). Both sides compute the same
loss, the summed next-token cross-entropy over the batch, but each the way its library does:

* triform: ``CausalLM.loss`` calls ``DecoderLM(x, targets=y)``, which in float32 (no autocast) fuses
  the output projection with the cross-entropy (``triform.layers.fused_ce``: rows in chunks, the
  (N, V) logits never materialised; the same products, so the same FLOPs); under bf16 autocast it
  computes ``F.cross_entropy`` on its logits instead;
* HF: the model is wrapped so that it returns ``model(input_ids=x, labels=None, use_cache=False).logits``
  and the objective applies ``F.cross_entropy(logits.float(), y, reduction="sum")`` to them, what
  HF's own ``labels=`` loss computes (transformers has no fused loss of its own in eager mode).

Both models must have exactly the same parameter count; the script stops if they do not.

Precisions: ``float32``, and ``bfloat16`` autocast for both implementations (weights, gradients and
AdamW state stay float32; matmuls run in bf16). A bf16 row is skipped, and says why, when this
CPU's bf16 matmul is slower than its float32 one (CPUs without AMX or AVX512-BF16 run bf16 ~100x
slower), since ``--precision auto`` would train in float32 there.

Timing: after a few warm-up steps per model, ``--rounds`` rounds of ``--steps`` steps are timed per
model, INTERLEAVED (triform, HF, HF, triform, ...), so that noise from a shared machine hits both
alike. Per implementation the median (and best) ms/step over rounds is reported; the headline
ratio triform tokens/s ÷ HF tokens/s (target ≥ 1.0) is the median over rounds of the ratio of the
two back-to-back runs of that round, which stays meaningful when machine load changes between rounds
(the ratios of the medians and of the best rounds are printed too).

Achieved GFLOP/s uses the standard training estimate
    FLOPs/token = 6·N_matmul + 12·n_layers·d_attn·T
where N_matmul counts the weights of every matrix multiply (attention and FFN projections of all
layers plus the output head, tied or not; embedding/position lookups and norms excluded),
d_attn = n_heads·head_dim and T is the context (the attention term ignores causal masking, as the
estimate conventionally does). It is compared with the matmul ceiling of the row's precision measured in
the same run: ``torch.mm`` of square float32 (or bfloat16) matrices, before, after and between the
timing rounds; the table gives median achieved GFLOP/s as % of the median of those measurements
(best as % of best).

How to run
----------
    .venv/bin/python benchmarks/train_throughput.py                 # defaults: ~80 s on 2 idle CPU cores
                                                                    # (several times longer on a busy machine)
    .venv/bin/python benchmarks/train_throughput.py --shapes llama --steps 5 --rounds 7 --json out.json
    .venv/bin/python benchmarks/train_throughput.py --profile 3      # also print a per-op profile

Flags change d_model / layers / heads / context / batch / vocab / steps; see ``--help``.
This is a benchmark, never part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from triform.config import DecoderConfig, count_parameters, get_preset
from triform.models.decoder import DecoderLM
from triform.objectives.base import Batch
from triform.objectives.causal_lm import CausalLM
from triform.training.loop import train_step
from triform.training.optim import build_optimizer

LR = 3e-4
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0


# --------------------------------------------------------------------------------------------------
# machine and ceiling


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads (interop {torch.get_num_interop_threads()}), "
        f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}"
    )


def matmul_ceiling(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 4, dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """Best torch.mm GFLOP/s in ``dtype`` over square sizes and repeats: (gflops, size that achieved it)."""
    best, best_n = 0.0, sizes[0]
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            dt = time.perf_counter() - t0
            g = 2 * n**3 / dt / 1e9
            if g > best:
                best, best_n = g, n
    return best, best_n


# --------------------------------------------------------------------------------------------------
# configs


@dataclass
class Shape:
    name: str
    cfg: DecoderConfig
    hf_kind: str  # "gpt2" | "llama"


def build_shapes(args: argparse.Namespace) -> list[Shape]:
    shapes = []
    common = dict(d_model=args.d_model, n_layers=args.layers, max_seq_len=args.context, vocab_size=args.vocab, dropout=0.0)
    for name in args.shapes:
        if name == "gpt2":
            cfg = get_preset("gpt2").replace(n_heads=args.gpt2_heads, **common)
            shapes.append(Shape("GPT-2", cfg, "gpt2"))
        elif name == "llama":
            cfg = get_preset("llama3-8b").replace(
                n_heads=args.llama_heads, n_kv_heads=args.llama_kv_heads, d_ff=args.llama_d_ff, **common
            )
            shapes.append(Shape("Llama", cfg, "llama"))
        else:
            raise SystemExit(f"unknown shape {name!r}; choose gpt2 and/or llama")
    return shapes


def hf_model(shape: Shape) -> nn.Module:
    """The HF model equivalent to ``shape.cfg`` (random weights, float32, SDPA attention)."""
    import transformers  # imported here: slow (~12 s) and only a benchmark dependency

    s = shape.cfg.stack
    if shape.hf_kind == "gpt2":
        assert s.d_ff == 4 * s.d_model and s.ffn == "gelu_tanh" and s.norm == "layernorm" and s.position == "learned"
        hf_cfg = transformers.GPT2Config(
            vocab_size=shape.cfg.vocab_size, n_positions=s.max_seq_len, n_embd=s.d_model, n_layer=s.n_layers,
            n_head=s.n_heads, n_inner=s.d_ff, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, layer_norm_epsilon=s.norm_eps, tie_word_embeddings=shape.cfg.tie_embeddings,
            use_cache=False, bos_token_id=None, eos_token_id=None,
        )
        hf_cfg._attn_implementation = "sdpa"
        model = transformers.GPT2LMHeadModel(hf_cfg)
    else:
        assert s.ffn == "swiglu" and s.norm == "rmsnorm" and s.position == "rope" and not s.bias
        kw: dict[str, Any] = dict(
            vocab_size=shape.cfg.vocab_size, hidden_size=s.d_model, intermediate_size=s.d_ff,
            num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads,
            head_dim=s.head_dim, max_position_embeddings=s.max_seq_len, rms_norm_eps=s.norm_eps,
            tie_word_embeddings=shape.cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
            attention_dropout=0.0, use_cache=False, bos_token_id=None, eos_token_id=None,
        )
        try:  # transformers >= 5: RoPE settings live in rope_parameters
            hf_cfg = transformers.LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta})
        except TypeError:  # transformers 4.x
            hf_cfg = transformers.LlamaConfig(**kw, rope_theta=s.rope_theta)
        hf_cfg._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(hf_cfg)
    return model.float()


class HFLogits(nn.Module):
    """Wraps an HF causal LM so that ``model(x)`` returns logits, like DecoderLM; no loss inside."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x, labels=None, use_cache=False).logits


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def flops_per_token(cfg: DecoderConfig, context: int) -> tuple[float, int]:
    """(training FLOPs per token, N_matmul) by 6·N_matmul + 12·n_layers·d_attn·T."""
    s = cfg.stack
    d, hd = s.d_model, s.head_dim
    q_out, kv_out = s.n_heads * hd, s.n_kv_heads * hd
    attn = d * (q_out + 2 * kv_out) + q_out * d
    ffn = (3 if s.ffn in ("swiglu", "geglu") else 2) * d * s.d_ff
    n_matmul = s.n_layers * (attn + ffn) + cfg.vocab_size * d
    return 6.0 * n_matmul + 12.0 * s.n_layers * q_out * context, n_matmul


# --------------------------------------------------------------------------------------------------
# timing


@dataclass
class Runner:
    impl: str
    model: nn.Module
    opt: torch.optim.Optimizer
    objective: CausalLM
    batches: list[Batch]
    amp: torch.dtype | None = None
    cursor: int = 0
    round_ms: list[float] = field(default_factory=list)
    last_loss: float = float("nan")

    def step(self) -> None:
        batch = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        stats = train_step(self.model, self.opt, self.objective, [batch], lr=LR, grad_clip=GRAD_CLIP, amp_dtype=self.amp)
        self.last_loss = float(stats[0])  # one host sync per step, as in the training loop

    def timed(self, steps: int) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.round_ms.append((time.perf_counter() - t0) / steps * 1e3)


def profile_runner(r: Runner, steps: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            r.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def bench_shape(shape: Shape, args: argparse.Namespace, log, ceilings: list[float], precision: str) -> dict[str, Any]:
    cfg, T, B = shape.cfg, args.context, args.batch
    amp = torch.bfloat16 if precision == "bfloat16" else None
    dtype = amp or torch.float32
    torch.manual_seed(args.seed)
    tri = DecoderLM(cfg)
    hf = HFLogits(hf_model(shape))
    tri.train(), hf.train()
    n_tri, n_hf, n_formula = n_params(tri), n_params(hf), count_parameters(cfg)
    log(f"[{shape.name}] parameters: triform {n_tri:,} (count_parameters {n_formula:,}), HF {n_hf:,}")
    if not n_tri == n_hf == n_formula:
        raise SystemExit(f"[{shape.name}] parameter counts differ: triform {n_tri:,}, HF {n_hf:,}, formula {n_formula:,}")

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (B * (T + 1) * args.n_batches,), generator=g)
    objective = CausalLM(ids, ids, context=T, batch_size=B, token_bytes=torch.ones(cfg.vocab_size, dtype=torch.long))
    batches = []
    for i in range(args.n_batches):
        w = ids[i * B * (T + 1) : (i + 1) * B * (T + 1)].view(B, T + 1)
        batches.append(objective.make(w[:, :-1].contiguous(), w[:, 1:].contiguous()))

    runners = [
        Runner("triform", tri, build_optimizer(tri, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS), objective, batches, amp),
        Runner("HF", hf, build_optimizer(hf, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS), objective, batches, amp),
    ]
    groups = [[sum(p.numel() for p in g_["params"]) for g_ in r.opt.param_groups] for r in runners]
    if groups[0] != groups[1]:
        log(f"[{shape.name}] WARNING: optimizer groups differ (decay/no-decay sizes): triform {groups[0]}, HF {groups[1]}")

    for r in runners:
        for _ in range(args.warmup):
            r.step()
    for i in range(args.rounds):
        order = runners if i % 2 == 0 else runners[::-1]  # ABBA: neither always goes first
        for r in order:
            r.timed(args.steps)
        ceilings.append(matmul_ceiling(repeats=2, dtype=dtype)[0])  # the ceiling under this round's conditions
        log(
            f"[{shape.name}, {precision}] round {i + 1}/{args.rounds}: "
            + ", ".join(f"{r.impl} {r.round_ms[-1]:.0f} ms/step" for r in runners)
            + f", matmul {ceilings[-1]:.0f} GFLOP/s"
        )

    fpt, n_matmul = flops_per_token(cfg, T)
    out: dict[str, Any] = {
        "shape": shape.name, "precision": precision, "config": cfg.to_dict(), "batch": B, "context": T, "tokens_per_step": B * T,
        "parameters": n_tri, "n_matmul": n_matmul, "flops_per_token": fpt, "optimizer_groups": groups[0],
        "matmul_gflops_rounds": ceilings[-args.rounds:], "impls": {},
    }
    for r in runners:
        med, best = statistics.median(r.round_ms), min(r.round_ms)
        tps, tps_best = B * T / (med / 1e3), B * T / (best / 1e3)
        out["impls"][r.impl] = {
            "ms_per_step_median": med, "ms_per_step_best": best, "ms_per_step_rounds": r.round_ms,
            "tokens_per_s": tps, "tokens_per_s_best": tps_best,
            "gflops": tps * fpt / 1e9, "gflops_best": tps_best * fpt / 1e9, "final_loss": r.last_loss,
        }
    t, h = out["impls"]["triform"], out["impls"]["HF"]
    # Headline: median over rounds of the paired ratio (each round's two runs ran back to back, so they saw
    # the same machine conditions). Ratios of the medians and of the best rounds are kept for reference.
    out["ratio"] = statistics.median(hm / tm for tm, hm in zip(t["ms_per_step_rounds"], h["ms_per_step_rounds"]))
    out["ratio_of_medians"] = t["tokens_per_s"] / h["tokens_per_s"]
    out["ratio_of_best"] = t["tokens_per_s_best"] / h["tokens_per_s_best"]
    if args.profile:
        for r in runners:
            log(f"\n[{shape.name}] profile of {r.impl}, {args.profile} steps (self CPU time):")
            log(profile_runner(r, args.profile, args.profile_top))
    del runners, tri, hf
    return out


# --------------------------------------------------------------------------------------------------
# report


def markdown(results: list[dict[str, Any]], ceilings: dict[str, list[float]], skipped: list[str], machine: str, args,
             seconds: float) -> str:
    lines = [
        "## Training throughput: triform vs HF transformers (CPU; float32 and bf16 autocast)",
        "",
        f"Machine: {machine}",
    ]
    for precision, runs in ceilings.items():
        lines.append(
            f"{precision} matmul ceiling: {max(runs):.1f} GFLOP/s best, {statistics.median(runs):.1f} GFLOP/s median "
            f"(torch.mm of 1024^2 and 2048^2 {precision} matrices, measured before, after and between the timing rounds)"
        )
    lines += [
        f"Step: forward + cross-entropy + backward + clip_grad_norm {GRAD_CLIP} + AdamW(lr {LR}, wd {WEIGHT_DECAY}, "
        f"betas {BETAS}) + zero_grad; batch {args.batch} x context {args.context}; {args.warmup} warm-up steps, then "
        f"{args.rounds} interleaved rounds (ABBA order) of {args.steps} steps per model. bfloat16 rows: both models "
        "under torch.autocast(bfloat16); weights, gradients and AdamW state float32.",
        "FLOPs/token = 6*N_matmul + 12*n_layers*d_attn*T  (N_matmul: attention + FFN projection weights of all layers "
        "+ output head; d_attn = n_heads*head_dim; T = context)",
        "Cells show median over rounds (best round). % of ceiling: median GFLOP/s vs the median matmul ceiling of the "
        "row's precision (best vs best). triform/HF: median over rounds of the back-to-back tokens/s ratio.",
        "",
        "| shape | precision | config | params | impl | ms/step | tokens/s | GFLOP/s | % of matmul ceiling | triform/HF |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        s = res["config"]["stack"]
        runs = ceilings[res["precision"]]
        ceiling, ceiling_med = max(runs), statistics.median(runs)
        desc = (
            f"d={s['d_model']} L={s['n_layers']} H={s['n_heads']}/{s['n_kv_heads']}kv ff={s['d_ff']} "
            f"T={res['context']} V={res['config']['vocab_size']} B={res['batch']}"
        )
        for impl in ("triform", "HF"):
            r = res["impls"][impl]
            ratio = f"**{res['ratio']:.3f}x**" if impl == "triform" else ""
            lines.append(
                f"| {res['shape']} | {res['precision']} | {desc} | {res['parameters'] / 1e6:.2f}M | {impl} | "
                f"{r['ms_per_step_median']:.0f} ({r['ms_per_step_best']:.0f}) | "
                f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_best']:,.0f}) | "
                f"{r['gflops']:.1f} ({r['gflops_best']:.1f}) | "
                f"{100 * r['gflops'] / ceiling_med:.1f}% ({100 * r['gflops_best'] / ceiling:.1f}%) | {ratio} |"
            )
    lines.append("")
    for res in results:
        lines.append(
            f"- {res['shape']}, {res['precision']}: triform/HF = {res['ratio']:.3f}x (paired median); ratio of medians "
            f"{res['ratio_of_medians']:.3f}x, of best rounds {res['ratio_of_best']:.3f}x; N_matmul "
            f"{res['n_matmul'] / 1e6:.2f}M, {res['flops_per_token'] / 1e6:.1f} MFLOP/token; parameter counts equal "
            f"({res['parameters']:,})."
        )
    lines += [f"- {line}" for line in skipped]
    lines.append(f"\nTotal run time {seconds:.0f} s.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--force-bf16", action="store_true", help="time bf16 rows even where bf16 is slower than float32")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--gpt2-heads", type=int, default=4)
    p.add_argument("--llama-heads", type=int, default=8)
    p.add_argument("--llama-kv-heads", type=int, default=2)
    p.add_argument("--llama-d-ff", type=int, default=688)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--n-batches", type=int, default=8, help="distinct random batches cycled through")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--profile", type=int, default=0, help="after timing, profile this many steps of each model")
    p.add_argument("--profile-top", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    machine = machine_line()
    log(machine)
    import transformers  # noqa: F401  (slow import, done once up front)

    log(f"transformers {transformers.__version__}")
    ceilings: dict[str, list[float]] = {}
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    for precision in args.precisions:
        c = matmul_ceiling(dtype=dtypes[precision])
        log(f"{precision} matmul ceiling (before): {c[0]:.1f} GFLOP/s at n={c[1]}")
        ceilings[precision] = [c[0]]
    results, skipped = [], []
    if "bfloat16" in ceilings and not args.force_bf16:
        fp32 = ceilings.get("float32", [matmul_ceiling()[0]])[0]
        if ceilings["bfloat16"][0] < fp32:
            skipped.append(
                f"bfloat16 rows skipped: this CPU's bf16 matmul ({ceilings['bfloat16'][0]:.1f} GFLOP/s) is "
                f"{fp32 / ceilings['bfloat16'][0]:.0f}x slower than float32 ({fp32:.1f}), so `--precision auto` trains "
                "in float32 here (pass --force-bf16 to time them anyway)."
            )
            log(skipped[-1])
    for precision in args.precisions:
        if precision == "bfloat16" and skipped:
            continue
        results += [bench_shape(shape, args, log, ceilings[precision], precision) for shape in build_shapes(args)]
        c = matmul_ceiling(dtype=dtypes[precision])
        log(f"{precision} matmul ceiling (after): {c[0]:.1f} GFLOP/s at n={c[1]}")
        ceilings[precision].append(c[0])
    seconds = time.perf_counter() - t_start
    machine_full = f"{machine}, transformers {transformers.__version__}"
    print(markdown(results, ceilings, skipped, machine_full, args, seconds))
    if args.json:
        payload = {
            "machine": machine_full, "matmul_ceiling_runs": ceilings, "skipped": skipped,
            "flops_formula": "6*N_matmul + 12*n_layers*d_attn*T",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results, "seconds": seconds,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
