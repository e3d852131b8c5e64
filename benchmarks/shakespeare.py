"""Validation loss on tinyshakespeare at nanoGPT's CPU budget: nanoGPT's recipe vs triform's preset.

nanoGPT's README gives a CPU recipe for its character-level Shakespeare model — 4 layers, 4 heads,
d=128, context 64, batch 12, 2000 iterations, no dropout (lr 1e-3 → 1e-4, warm-up 100, beta2 0.99,
from its ``config/train_shakespeare_char.py``) — and reports a validation loss of about 1.88 after
about 3 minutes on a laptop. This script

1. trains that recipe (same shapes and hyperparameters, as a GPT-2-style triform model: learned
   positions, LayerNorm without bias, GELU, tied embeddings) for its 2000 iterations, timing it;
2. trains triform's ``shakespeare`` preset with that same wall-clock time as its budget;
3. prints both validation losses in nats per byte (= per character: the file is ASCII) on the
   same held-out 10% (nanoGPT's split, bytes 1,003,854 onward), scored over the whole split.

Run:  .venv/bin/python benchmarks/shakespeare.py --data ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from triform.config import count_parameters
from triform.tokenizers import ByteTokenizer
from triform.training.trainer import TrainConfig, model_config_for, train

NANOGPT_REPORTED = 1.88  # nanoGPT README, CPU recipe on a laptop (~3 minutes)

RECIPE = dict(
    preset="gpt2-tiny",
    model=dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, bias=False, ffn="gelu", dropout=0.0),
    train=dict(context=64, batch_size=12, max_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100,
               beta2=0.99, weight_decay=0.1, grad_clip=1.0),
)


def run(name: str, preset: str, model: dict, train_kw: dict, data: str, out: Path, seed: int) -> dict:
    cfg = TrainConfig(data=data, eval_interval=10**9, eval_tokens=4096, final_eval_tokens=None,
                      checkpoint_interval=10**9, progress=False, seed=seed, **train_kw)
    print(f"[{name}] training ...", file=sys.stderr)
    t = time.perf_counter()
    result = train(cfg, preset=preset, model_overrides=model, out_dir=out / name, log=lambda m: print(f"[{name}] {m}", file=sys.stderr))
    mcfg = model_config_for(preset, ByteTokenizer(), cfg.context, model)
    return {
        "name": name, "params": count_parameters(mcfg), "steps": result.steps, "context": result.extra["context"],
        "tokens": result.steps * result.extra["tokens_per_step"], "train_s": result.train_seconds, "run_s": result.seconds,
        "wall_s": time.perf_counter() - t, "val_loss": result.val_loss, "val_bpb": result.val_bpb,
        "tok_s": result.tokens_per_second,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="path to tinyshakespeare.txt (1,115,394 bytes)")
    ap.add_argument("--preset", default="shakespeare")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the preset (default: the recipe's measured time)")
    ap.add_argument("--override", default="{}", help="JSON dict of extra TrainConfig fields for the preset run")
    ap.add_argument("--model-override", default="{}", help="JSON dict of model fields for the preset run")
    ap.add_argument("--skip-recipe", action="store_true", help="needs --budget")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"error: {args.data} does not exist")
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if not args.skip_recipe:
            rows.append(run("nanoGPT CPU recipe", RECIPE["preset"], RECIPE["model"], RECIPE["train"], args.data, out, args.seed))
        budget = args.budget or rows[0]["run_s"]  # the recipe's whole run (training + evaluation) is the preset's budget
        preset_train = {"time_budget": f"{budget:.1f}s", "max_steps": 10**6, **json.loads(args.override)}
        rows.append(run(f"triform {args.preset}", args.preset, json.loads(args.model_override), preset_train, args.data, out, args.seed))

    print(f"\n## tinyshakespeare, equal wall-clock budget ({budget:.0f} s per run, evaluation included, on this machine, "
          f"{torch.get_num_threads()} threads, float32)\n")
    print("| run | params | context | steps | tokens seen | run s | train s | tokens/s | val loss (nats/byte) | val bits/byte |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['context']} | {r['steps']:,} | {r['tokens'] / 1e6:.2f}M | "
              f"{r['run_s']:.0f} | {r['train_s']:.0f} | {r['tok_s']:,.0f} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    print(f"| nanoGPT README (reported, laptop) | 0.80M | 64 | 2,000 | 1.54M | - | ~180 | - | {NANOGPT_REPORTED:.2f} | "
          f"{NANOGPT_REPORTED / 0.6931:.3f} |")
    if len(rows) == 2:
        print(f"\nloss ratio triform / recipe = {rows[1]['val_loss'] / rows[0]['val_loss']:.3f} "
              f"({rows[0]['val_loss'] - rows[1]['val_loss']:+.3f} nats/byte in triform's favour)")
    if args.json:
        Path(args.json).write_text(json.dumps({"budget_s": budget, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
