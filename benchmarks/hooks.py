"""The cost of hook points: a decoder's forward pass and a one-token decode step with no hooks
installed (the ordinary path), with the hooked path taken but nothing kept, caching a filtered set
of names (the residual stream after each block), and caching everything; time and cache memory.
Then a training step and a decode step of this tree against the same tree with every hook point
compiled out (``--against-stripped``): each ``if self._hook_scope is not None`` branch, each
``hook(module, name, x)`` call (replaced by ``x``) and each ``enter_block`` call removed from the
syntax tree of a copy of the package — the code as it would be without hook points. The two run in
two worker processes, timed in alternating rounds, and must compute the same loss.

With no scope installed each block, attention and FFN call tests one attribute before taking the
ordinary path; the first row of the micro-benchmark is that test's cost.

    .venv/bin/python benchmarks/hooks.py                      # ~1 minute on 2 CPU cores
    .venv/bin/python benchmarks/hooks.py --against-stripped   # + ~2 minutes
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


class _StripHooks(ast.NodeTransformer):
    """Removes hook points from a module's syntax tree (see the module docstring)."""

    removed = 0

    @staticmethod
    def _is_scope_test(node: ast.AST) -> bool:
        return (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute)
                and node.left.attr == "_hook_scope" and len(node.ops) == 1 and isinstance(node.ops[0], ast.IsNot))

    @staticmethod
    def _calls(node: ast.AST, name: str) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name

    def visit_If(self, node: ast.If):
        if self._is_scope_test(node.test) and not node.orelse:
            self.removed += 1
            return None
        return self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr):
        if self._calls(node.value, "enter_block"):
            self.removed += 1
            return None
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        if self._calls(node, "hook") and len(node.args) >= 3:
            self.removed += 1
            return node.args[2]
        return node

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field_name in ("body", "orelse", "finalbody"):
            body = getattr(node, field_name, None)
            if isinstance(body, list) and field_name == "body" and not body:
                body.append(ast.Pass())
        return node


def stripped_tree(dest: Path) -> tuple[Path, int]:
    """A copy of the triform package with its hook points compiled out; (folder for sys.path, count)."""
    src = Path(__file__).resolve().parents[1] / "src" / "triform"
    shutil.copytree(src, dest / "triform", ignore=shutil.ignore_patterns("__pycache__"))
    total = 0
    for path in (dest / "triform").rglob("*.py"):
        if path.parts[-2:] == ("layers", "hooks.py"):
            continue  # the hook machinery itself stays importable (inspect imports it)
        tree = ast.parse(path.read_text())
        t = _StripHooks()
        tree = ast.fix_missing_locations(t.visit(tree))
        if t.removed:
            total += t.removed
            path.write_text(ast.unparse(tree))
    return dest, total


WORKER = r"""
import json, statistics, sys, time, torch
import triform.layers.attention, triform.layers.block, triform.layers.feedforward, triform.models.decoder
from triform.config import get_preset
from triform.models.decoder import DecoderLM
from triform.objectives.causal_lm import CausalLM
from triform.training.loop import train_step
from triform.training.optim import build_optimizer

d, L, T, B = (int(v) for v in sys.argv[1:5])
torch.manual_seed(0)
cfg = get_preset("llama3-8b-tiny").replace(d_model=d, n_layers=L, n_heads=6, n_kv_heads=2, head_dim=d // 6,
                                           d_ff=4 * d, vocab_size=8192, max_seq_len=T + 8)
model = DecoderLM(cfg)
opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
g = torch.Generator().manual_seed(1)
x = torch.randint(0, 8192, (B, T + 1), generator=g)
ids = x.flatten()
objective = CausalLM(ids, ids, context=T, batch_size=B, token_bytes=torch.ones(8192, dtype=torch.long))
batch = objective.make(x[:, :-1].contiguous(), x[:, 1:].contiguous())
first = float(train_step(model, opt, objective, [batch], lr=1e-4, grad_clip=1.0)[0])
model.eval()
cache = model.new_cache(1, T + 8)
with torch.no_grad():
    model(x[:1, :T], cache=cache)
one = x[:1, :1]

def train(n):
    t0 = time.perf_counter()
    for _ in range(n):
        float(train_step(model, opt, objective, [batch], lr=1e-4, grad_clip=1.0)[0])
    return (time.perf_counter() - t0) / n

def decode(n):
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            model(one, cache=cache)
            cache.truncate(cache.seen - 1)
    return (time.perf_counter() - t0) / n

files = [m.__file__ for m in (triform.layers.attention, triform.layers.block, triform.layers.feedforward,
                              triform.models.decoder)]
print(json.dumps({"files": files, "first_loss": first}), flush=True)
for line in sys.stdin:
    what, n = line.split()
    print(json.dumps({what: (train if what == "train" else decode)(int(n))}), flush=True)
"""


def against_stripped(ns: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, removed = stripped_tree(Path(tmp))
        here = str(Path(__file__).resolve().parents[1] / "src")
        workers = {}
        for label, path in (("this tree", here), ("hook points compiled out", str(root))):
            env = dict(os.environ, PYTHONPATH=path)
            proc = subprocess.Popen([sys.executable, "-c", WORKER, str(ns.d_model), str(ns.layers), str(ns.context),
                                     str(ns.batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            hello = json.loads(proc.stdout.readline())
            wrong = [f for f in hello["files"] if not f.startswith(path)]
            if wrong:
                raise SystemExit(f"worker imported {wrong}, not the tree under {path}")
            workers[label] = (proc, hello["first_loss"])
        losses = {label: loss for label, (_, loss) in workers.items()}
        if len(set(losses.values())) != 1:
            raise SystemExit(f"the two trees compute different losses: {losses}")
        times: dict[str, dict[str, list[float]]] = {label: {"train": [], "decode": []} for label in workers}
        for _ in range(ns.rounds):
            for what, n in (("train", ns.train_steps), ("decode", ns.decode_steps)):
                for label, (proc, _) in workers.items():
                    proc.stdin.write(f"{what} {n}\n")
                    proc.stdin.flush()
                    times[label][what].append(json.loads(proc.stdout.readline())[what])
        for proc, _ in workers.values():
            proc.stdin.close()
            proc.wait()
    print(f"## With no hook installed against the code without hook points ({removed} hook points, branches and "
          f"block markers removed from a copy of the package); {ns.rounds} alternating rounds, median")
    print()
    print(f"Same first training loss in both trees: {losses['this tree']:.6f}.")
    print()
    print(f"| code | train step (B={ns.batch}, T={ns.context}) ms | decode step ms (context {ns.context}) |")
    print("|---|---:|---:|")
    med = {label: {k: statistics.median(v) for k, v in d.items()} for label, d in times.items()}
    for label, m in med.items():
        print(f"| {label} | {m['train'] * 1e3:.1f} | {m['decode'] * 1e3:.2f} |")
    a, b = med["this tree"], med["hook points compiled out"]
    print(f"| ratio (this tree / compiled out) | {a['train'] / b['train']:.3f}x | {a['decode'] / b['decode']:.3f}x |")
    spread = {label: {k: (min(v) * 1e3, max(v) * 1e3) for k, v in d.items()} for label, d in times.items()}
    print()
    print("round-to-round range (ms): " + "; ".join(
        f"{label}: train {s['train'][0]:.1f}-{s['train'][1]:.1f}, decode {s['decode'][0]:.2f}-{s['decode'][1]:.2f}"
        for label, s in spread.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--against-stripped", action="store_true",
                   help="also time a train step and a decode step against the code with hook points compiled out")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=60)
    p.add_argument("--only-stripped", action="store_true", help="skip the first table")
    ns = p.parse_args()
    if ns.only_stripped:
        against_stripped(ns)
        return
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
    if ns.against_stripped:
        print()
        against_stripped(ns)


if __name__ == "__main__":
    main()
