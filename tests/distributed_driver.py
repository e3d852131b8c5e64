"""Run by ``torchrun --nproc-per-node 2`` from tests/test_distributed.py: trains the tiny cases of
test_loop.py through ``fit`` under DDP and FSDP2 (gloo, CPU) and writes what the test compares.

    torchrun --nproc-per-node 2 tests/distributed_driver.py OUT CASE[,CASE...]

For every case and parallel mode: a 6-step run (global batch 4, one micro-batch of 2 per rank), its
parameters per rank (DDP) or gathered (FSDP); a run paused at step 3 into OUT/CASE-MODE-stop and a
copy of it (OUT/CASE-MODE-stop1, for the test to resume in one process); and the paused run
continued at world size 2. Rank 0 writes OUT/results.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_loop import CASES

from triform.checkpoint import CHECKPOINT_DIR, load_weights
from triform.training import distributed
from triform.training.args import TrainArgs
from triform.training.loop import fit

STEPS, PAUSE = 6, 3


def args(parallel: str) -> TrainArgs:
    return TrainArgs(batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=2, max_steps=STEPS, eval_interval=3,
                     checkpoint_interval=100, seed=5, device="cpu", precision="float32", progress=False,
                     parallel=parallel, dist_timeout=120)


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2].split(",")
    results: dict[str, dict[str, dict]] = {}
    rank = distributed.env_rank()
    for case in cases:
        make_model, make_objective, tok = CASES[case]
        results[case] = {}
        for parallel in ("ddp", "fsdp"):
            torch.manual_seed(0)
            model = make_model()
            run = fit(model, make_objective(2), args(parallel), log=lambda _: None)
            entry = {"losses": run.train_losses, "final": run.final}
            if parallel == "ddp":
                torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                           out / f"params-{case}-ddp-rank{rank}.pt")
            else:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if rank == 0:
                    torch.save(full, out / f"params-{case}-fsdp.pt")

            stop = out / f"{case}-{parallel}-stop"
            torch.manual_seed(0)
            fit(make_model(), make_objective(2), args(parallel), out_dir=stop, tokenizer=tok, stop_after=PAUSE,
                log=lambda _: None)
            if rank == 0:
                shutil.copytree(stop, out / f"{case}-{parallel}-stop1")
            dist.barrier()
            torch.manual_seed(0)
            model = load_weights(make_model(), stop / CHECKPOINT_DIR)
            resumed = fit(model, make_objective(2), args(parallel), out_dir=stop, tokenizer=tok, resume=True,
                          log=lambda _: None)
            entry["resumed"] = resumed.train_losses
            results[case][parallel] = entry
    # accumulation on each rank: global batch 8 as 2 ranks x 2 micro-batches of 2 (no_sync / FSDP2's
    # deferred reduce-scatter on all but the last)
    make_model, make_objective, tok = CASES["causal"]
    results["causal-accum"] = {}
    for parallel in ("ddp", "fsdp"):
        torch.manual_seed(0)
        run = fit(make_model(), make_objective(2), args(parallel).replace(batch_size=8, grad_accum=2), log=lambda _: None)
        results["causal-accum"][parallel] = {"losses": run.train_losses, "final": run.final}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
