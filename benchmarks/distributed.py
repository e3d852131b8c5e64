"""Distributed training on one machine: 1 process x T threads against P processes x T/P threads
under DDP and FSDP2, through triform's own loop (``triform.training.loop.fit``), from one run.

What it reports, per mode:

* tokens/s of the timed steps (``FitResult.tokens_per_second``: training time only, evaluation
  excluded) and the scaling efficiency against the 1-process run on the same cores;
* bytes communicated per step per rank, measured on the wire (the loopback interface's byte counter
  in /proc/net/dev, read by rank 0 around the timed steps and divided by steps and ranks; gloo
  talks TCP over loopback on one machine), against the analytic figure for ring collectives over P
  ranks of a model with B parameter bytes:
      DDP:  all-reduce of the gradients, 2 (P-1)/P B per step (reduce-scatter + all-gather halves);
      FSDP: all-gather of the parameters in forward and again in backward (reshard after forward),
            reduce-scatter of the gradients: 3 (P-1)/P B per step (per micro-batch for the gathers);
* what each rank holds: parameters, gradients (one per local parameter element, as held during
  backward) and AdamW state as local tensors (a DTensor's local
  shard under FSDP), and the process's peak resident memory (ru_maxrss, which also counts the
  Python and torch libraries, the same ~0.4 GiB in every mode).

    .venv/bin/python benchmarks/distributed.py                       # ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/distributed.py --d-model 512 --layers 8 --steps 12 --json out.json

On a CUDA machine the same script runs the ranks on GPUs with NCCL (``--device cuda``; one process
per GPU; memory then is torch.cuda.max_memory_allocated). A benchmark, never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def lo_bytes() -> int | None:
    """Bytes sent over the loopback interface so far (machine-wide), None where unreadable."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])  # transmit bytes
    except OSError:
        return None
    return None


def held_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this process holds at rest, from the
    optimizer's parameters (under FSDP the sharded DTensors; their local shards are what is held
    between steps, while a unit's full parameters exist only around its forward and backward)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = [p for g in optimizer.param_groups for p in g["params"]]
    held = sum(local(p).numel() * p.element_size() for p in params)
    # the step frees gradients (zero_grad(set_to_none=True)); after backward each rank holds one per
    # local parameter element (FSDP reduce-scatters into the shard)
    grads = sum(local(p).numel() * p.element_size() for p in params if p.requires_grad)
    opt = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                opt += local(v).numel() * v.element_size()
    return {"params": held, "grads": grads, "optimizer": opt}


# ------------------------------------------------------------------------------------------------
# worker: one rank of one mode


def worker(ns: argparse.Namespace) -> None:
    from triform.config import get_preset
    from triform.models.decoder import DecoderLM
    from triform.objectives.causal_lm import CausalLM
    from triform.training import distributed, loop
    from triform.training.args import TrainArgs

    torch.set_num_threads(ns.threads)
    world = distributed.env_world_size()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ns.vocab, (2_000_000,), generator=g)
    cfg = get_preset("gpt2-tiny").replace(vocab_size=ns.vocab, d_model=ns.d_model, n_layers=ns.layers,
                                          n_heads=ns.heads, max_seq_len=ns.context, dropout=0.0)
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    args = TrainArgs(batch_size=ns.batch, grad_accum=ns.grad_accum, lr=1e-3, warmup_steps=2, max_steps=ns.steps + 2,
                     eval_interval=10**6, checkpoint_interval=10**6, seed=0, device=ns.device, precision="float32",
                     progress=False, parallel=ns.parallel if world > 1 else "none")
    objective = CausalLM(ids, ids[:50_000], context=ns.context, batch_size=args.micro_batch_size,
                         token_bytes=torch.ones(ns.vocab, dtype=torch.long), eval_tokens=2 * ns.context,
                         final_eval_tokens=2 * ns.context, eval_batch_size=2)

    # time the steps after two warm-up steps: run 2, then read the counters, then the rest
    holder: dict = {}
    original_step = loop.train_step

    def counting_step(model_, optimizer, *a, **kw):
        holder.setdefault("calls", 0)
        holder["calls"] += 1
        if holder["calls"] == 3:
            distributed.barrier(distributed.current())
            holder["lo0"], holder["t0"] = lo_bytes(), time.perf_counter()
        out = original_step(model_, optimizer, *a, **kw)
        if holder["calls"] == ns.steps + 2:  # the last step: stop the clock before the final evaluation
            out.tolist()
            distributed.barrier(distributed.current())
            holder["lo1"], holder["t1"] = lo_bytes(), time.perf_counter()
            holder["held"] = held_bytes(optimizer)
        return out

    loop.train_step = counting_step  # type: ignore[assignment]
    result = loop.fit(model, objective, args, log=lambda _: None)
    lo1, t1, held = holder["lo1"], holder["t1"], holder["held"]
    steps = ns.steps
    if ns.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {
        "rank": distributed.env_rank(), "world": world, "parallel": ns.parallel if world > 1 else "none",
        "threads": ns.threads, "seconds": t1 - holder["t0"], "steps": steps,
        "tokens_per_second": steps * ns.batch * ns.context / (t1 - holder["t0"]),
        "fit_tokens_per_second": result.tokens_per_second,
        "lo_bytes": None if lo1 is None or holder.get("lo0") is None else lo1 - holder["lo0"],
        "held": held, "peak_bytes": peak, "parameters": result.extra["parameters"],
    }
    out = Path(ns.out)
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
    distributed.shutdown()


# ------------------------------------------------------------------------------------------------
# driver


def run_mode(ns: argparse.Namespace, procs: int, parallel: str) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix=f"triform-dist-{parallel}-"))
    threads = max(1, ns.threads // procs)
    worker_args = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--threads", str(threads),
                   "--parallel", parallel, "--d-model", str(ns.d_model), "--layers", str(ns.layers),
                   "--heads", str(ns.heads), "--context", str(ns.context), "--batch", str(ns.batch),
                   "--grad-accum", str(ns.grad_accum), "--vocab", str(ns.vocab), "--steps", str(ns.steps),
                   "--device", ns.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    if procs == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *worker_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ns.timeout)
    if proc.returncode != 0:
        sys.exit(f"{parallel} x{procs} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


def gib(n: float) -> str:
    return f"{n / 2**30:.3f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="")
    p.add_argument("--procs", type=int, default=2, help="processes of the DDP and FSDP runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads in all (split over processes)")
    p.add_argument("--parallel", default="ddp")
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--json", default=None, help="also write the results here")
    ns = p.parse_args()
    if ns.worker:
        worker(ns)
        return

    single = run_mode(ns, 1, "none")[0]
    ddp = run_mode(ns, ns.procs, "ddp")
    fsdp = run_mode(ns, ns.procs, "fsdp")
    P = ns.procs
    param_bytes = single["held"]["params"]
    analytic = {"ddp": 2 * (P - 1) / P * param_bytes,
                "fsdp": (2 * ns.grad_accum + 1) * (P - 1) / P * param_bytes}
    print("## Distributed training on one machine: 1 process vs "
          f"{P} processes (DDP, FSDP2), gloo over loopback" if ns.device == "cpu" else "## Distributed training (NCCL)")
    print()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"Python {platform.python_version()}; {ns.threads} threads in all (1 x {ns.threads}, {P} x {max(1, ns.threads // P)})")
    print(f"Model: decoder d={ns.d_model} L={ns.layers} H={ns.heads} V={ns.vocab} T={ns.context}, "
          f"{single['parameters'] / 1e6:.2f}M parameters ({mib(param_bytes)} MiB float32); global batch {ns.batch} x "
          f"{ns.context} tokens, grad_accum {ns.grad_accum} per rank; {ns.steps} timed steps after 2 warm-up steps; "
          "the step is triform's fit loop (AdamW, clip 1.0).")
    print()
    print("| mode | processes x threads | tokens/s | scaling vs 1 process | sent per step per rank (measured) | "
          "analytic (ring) | measured / analytic |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = single["tokens_per_second"]
    print(f"| 1 process | 1 x {single['threads']} | {base:,.0f} | 1.00x | - | - | - |")
    rows = {}
    for name, recs in (("DDP", ddp), ("FSDP", fsdp)):
        r0 = recs[0]
        tps = r0["tokens_per_second"]
        sent = r0["lo_bytes"] / (r0["steps"] * P) if r0["lo_bytes"] is not None else None
        a = analytic[name.lower()]
        rows[name] = {"tokens_per_second": tps, "sent_per_step_per_rank": sent, "analytic": a}
        ratio = f"{sent / a:.2f}" if sent is not None else "n/a"
        print(f"| {name} | {P} x {r0['threads']} | {tps:,.0f} | {tps / base:.2f}x | "
              f"{mib(sent) + ' MiB' if sent is not None else 'n/a'} | {mib(a)} MiB | {ratio} |")
    print()
    print("What each rank holds (local tensors after the last step) and its peak memory:")
    print()
    print("| mode | rank | parameters MiB | gradients MiB | AdamW state MiB | sum MiB | sum / 1-process sum | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    total1 = sum(single["held"].values())
    for name, recs in (("1 process", [single]), ("DDP", ddp), ("FSDP", fsdp)):
        for r in recs:
            h = r["held"]
            s = sum(h.values())
            print(f"| {name} | {r['rank']} | {mib(h['params'])} | {mib(h['grads'])} | {mib(h['optimizer'])} | {mib(s)} | "
                  f"{s / total1:.2f} | {gib(r['peak_bytes'])} |")
    print()
    print("Measured bytes count everything rank 0 saw cross the loopback interface during the timed steps (TCP "
          "payload and headers of both ranks, the loss all-reduce and the heartbeats included), divided by "
          "steps and ranks.")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"single": single, "ddp": ddp, "fsdp": fsdp, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
