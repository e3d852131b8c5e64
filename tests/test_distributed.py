"""Training under torchrun: 2 processes, gloo, CPU, tiny seeded models, bounded time.

Tolerance. A run over 2 ranks adds each step's gradient contributions in another order than one
process accumulating the same micro-batches (the all-reduce sums the ranks' partial gradients, the
single process adds micro-batch gradients into one buffer), so results agree to float32 rounding,
not bit for bit; AdamW divides by sqrt(v), which turns relative rounding of ~1e-7 into parameter
differences of that order per step. Over 6 steps the loss curves must agree within 1e-4 nats
(observed: <= 1e-6). A wrong normalisation (per-rank counts, a missing world-size factor, a rank
training on the other's rows) moves the loss or the gradient norm by far more than that.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from test_loop import CASES

from triform.checkpoint import load_checkpoint
from triform.training.args import TrainArgs
from triform.training.loop import fit

TOL = 1e-4
HERE = Path(__file__).parent
DRIVEN = ("causal", "mlm", "span-seq2seq")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(case: str, **kw) -> TrainArgs:
    base = dict(batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, max_steps=6, eval_interval=3,
                checkpoint_interval=100, seed=5, device="cpu", precision="float32", progress=False)
    return TrainArgs(**{**base, **kw})


def _train_lines(folder: Path) -> list[dict]:
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("driven")
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", str(HERE / "distributed_driver.py"), str(out), ",".join(DRIVEN)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", DRIVEN)
def test_ddp_and_fsdp_follow_one_process_accumulating_the_same_batches(driven, case: str, tmp_path: Path) -> None:
    out, results = driven
    make_model, make_objective, tok = CASES[case]
    torch.manual_seed(0)
    single = fit(make_model(), make_objective(2), _one_process(case), out_dir=tmp_path / "one", tokenizer=tok,
                 log=lambda _: None)
    for parallel in ("ddp", "fsdp"):
        got = results[case][parallel]["losses"]
        assert len(got) == 6
        assert max(abs(a - b) for a, b in zip(got, single.train_losses)) <= TOL, (parallel, got, single.train_losses)
        for k, v in single.final.items():
            assert results[case][parallel]["final"][k] == pytest.approx(v, abs=TOL), (parallel, k)
        # the gradient norm (logged before clipping) shows the scaling that AdamW would hide
        norms = [r["grad_norm"] for r in _train_lines(out / f"{case}-{parallel}-stop")]
        assert norms[:3] == pytest.approx([r["grad_norm"] for r in _train_lines(tmp_path / "one")][:3], rel=1e-4)
    # the training actually moved: the curve is not flat
    assert single.train_losses[-1] < single.train_losses[0]


def test_accumulating_on_every_rank_follows_one_process(driven) -> None:
    """2 ranks x 2 micro-batches (DDP's no_sync, FSDP2's deferred gradient sync) = 1 process x 4."""
    _, results = driven
    make_model, make_objective, tok = CASES["causal"]
    torch.manual_seed(0)
    single = fit(make_model(), make_objective(2), _one_process("causal", batch_size=8, grad_accum=4), log=lambda _: None)
    for parallel in ("ddp", "fsdp"):
        got = results["causal-accum"][parallel]["losses"]
        assert len(got) == 6 and max(abs(a - b) for a, b in zip(got, single.train_losses)) <= TOL, parallel


@pytest.mark.parametrize("case", DRIVEN)
def test_ranks_hold_identical_parameters(driven, case: str) -> None:
    out, _ = driven
    r0 = torch.load(out / f"params-{case}-ddp-rank0.pt")
    r1 = torch.load(out / f"params-{case}-ddp-rank1.pt")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # exactly: every rank applied the same update
    fsdp = torch.load(out / f"params-{case}-fsdp.pt")  # FSDP's shards, gathered
    for k in r0:
        torch.testing.assert_close(fsdp[k], r0[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", DRIVEN)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_checkpoint_from_two_ranks_resumes_in_one_process(driven, case: str, parallel: str) -> None:
    out, results = driven
    make_model, make_objective, tok = CASES[case]
    folder = out / f"{case}-{parallel}-stop1"
    model, _, _ = load_checkpoint(folder, kind=None)  # a world-size-2 checkpoint loads in one process
    resumed = fit(model, make_objective(2), _one_process(case), out_dir=folder, tokenizer=tok, resume=True,
                  log=lambda _: None)
    two = results[case][parallel]["resumed"]  # the same checkpoint continued at world size 2
    assert resumed.train_losses[:3] == two[:3]
    assert max(abs(a - b) for a, b in zip(resumed.train_losses[3:], two[3:])) <= TOL
    uninterrupted = results[case][parallel]["losses"]
    assert max(abs(a - b) for a, b in zip(resumed.train_losses, uninterrupted)) <= TOL


def _cli_train(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["-m", "triform", "train", "--preset", "gpt2-tiny", "--data", str(corpus), "--out", str(out),
            "--batch-size", "8", "--context", "32", "--eval-interval", "1000", "--sample-tokens", "0",
            "--precision", "float32", "--progress", "false", "--seed", "3", *extra]


def test_two_launches_form_one_run_like_two_nodes(tmp_path: Path, corpus_file: Path) -> None:
    """The multi-node form on one machine: two torchrun launches meet at a c10d rendezvous; FSDP over
    them follows one process accumulating the same two micro-batches."""
    port = _free_port()
    node = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex[:8]]
    run = tmp_path / "nodes"
    args = _cli_train(run, corpus_file, "--max-steps", "4", "--parallel", "fsdp")
    procs = [subprocess.Popen([*node, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    err = "".join(e for _, e in outputs)
    assert "fsdp over 2 ranks (gloo)" in err
    assert "warning: FSDP shards a" in err  # a tiny model: told that DDP would be faster
    assert sum("trained 4 steps" in o for o, _ in outputs) == 1  # results printed by rank 0 only
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, *_cli_train(one, corpus_file, "--max-steps", "4", "--grad-accum", "2")],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = [r["loss"] for r in _train_lines(run)], [r["loss"] for r in _train_lines(one)]
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= TOL


def test_pretrain_and_finetune_run_under_torchrun(tmp_path: Path, corpus_file: Path) -> None:
    launch = [sys.executable, "-m", "triform", "launch", "--standalone", "--nproc-per-node", "2"]
    pre = subprocess.run([*launch, "pretrain", "--data", str(corpus_file), "--out", str(tmp_path / "mlm"), "--context", "32",
                          "--batch-size", "8", "--time-budget", "8s", "--parallel", "fsdp", "--progress", "false"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr[-2000:]
    assert pre.stdout.count("pretrained ") == 1 and "fsdp over 2 ranks" in pre.stderr
    # the budget's step count is decided on rank 0 and shared: both ranks stop at the same step (a rank
    # that went on alone would wait in its next collective and fail the run), well before max_steps
    steps = int(pre.stdout.split("pretrained ")[1].split(" steps in ")[0])
    assert 3 < steps < 5000 and len(_train_lines(tmp_path / "mlm")) == steps
    saved = torch.load(tmp_path / "mlm" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert saved["step"] == saved["total_steps"] == steps
    assert "returned a view tensor" not in pre.stderr
    rows = [{"text": f"The {w} will speak of love.", "label": "royal" if w in ("king", "queen") else "noble"}
            for w in ["king", "queen", "lord", "lady"] * 12]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    ft = subprocess.run([*launch, "finetune", "--task", "classify", "--train", str(train), "--test", str(train),
                         "--base", str(tmp_path / "mlm"), "--epochs", "2", "--batch-size", "16",
                         "--out", str(tmp_path / "ft"), "--progress", "false"],
                        env=_env(), capture_output=True, text=True, timeout=300)
    assert ft.returncode == 0, ft.stderr[-2000:]
    assert "ddp over 2 ranks" in ft.stderr and ft.stdout.count("test accuracy") == 1
    # 48 examples, 2 epochs, global batch 16 over 2 ranks: 6 steps, as in one process
    steps = [r for r in _train_lines(tmp_path / "ft")]
    assert len(steps) == 6
    model, _, meta = load_checkpoint(tmp_path / "ft", kind="encoder")
    assert meta["labels"] == ["noble", "royal"]


def test_train_vision_runs_under_torchrun(tmp_path: Path) -> None:
    """ViT and CLIP through the same distributed loop: DDP over 2 ranks, each step's global batch
    split between them, rank 0 alone reporting and saving; the checkpoint loads."""
    launch = [sys.executable, "-m", "triform", "launch", "--standalone", "--nproc-per-node", "2", "train-vision"]
    for task, kind in (("classify", "vision"), ("clip", "clip")):
        out = tmp_path / task
        run = subprocess.run([*launch, "--task", task, "--batch-size", "16", "--max-steps", "5", "--out", str(out),
                              "--progress", "false"], env=_env(), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "ddp over 2 ranks" in run.stderr and run.stdout.count("checkpoint: ") == 1
        assert len(_train_lines(out)) == 5
        model, _, meta = load_checkpoint(out, kind=kind)
        assert meta["task"] == task and torch.isfinite(next(model.parameters())).all()


def _pids_with(marker: str, rank: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"TRIFORM_TEST_RUN={marker}".encode() in env and f"RANK={rank}".encode() in env:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_other_with_one_sentence(tmp_path: Path, corpus_file: Path) -> None:
    marker = uuid.uuid4().hex
    run = tmp_path / "run"
    # through `triform launch`: torchrun's agent, with its failure report as one sentence
    cmd = [sys.executable, "-m", "triform", "launch", "--standalone", "--nproc-per-node", "2",
           *_cli_train(run, corpus_file, "--max-steps", "100000", "--checkpoint-interval", "4")[2:]]
    proc = subprocess.Popen(cmd, env=_env(TRIFORM_TEST_RUN=marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint").is_dir() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (run / "checkpoint").is_dir(), "no checkpoint was written"
        victims = _pids_with(marker, 1)
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert took < 45  # bounded: torchrun's 30 s grace period is never needed
    lines = [line for line in err.splitlines() if "triform train: error:" in line]
    assert lines, err[-3000:]
    assert "rank 1 of 2 stopped (its process died or lost its connection)" in lines[0]
    assert "the last checkpoint" in lines[0] and "still loads" in lines[0]
    assert "Traceback" not in err  # neither the rank nor the launcher printed one
    assert "triform launch: error: rank 0 exited with code 2; rank 1 was killed by SIGKILL" in err
    # the last checkpoint loads and resumes in one process (grad_accum rescaled from 1 x 2 ranks to 2)
    step = json.loads((run / "checkpoint" / "config.json").read_text())
    assert step["train"]["world_size"] == 2
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    resumed = subprocess.run([sys.executable, "-m", "triform", "train", "--out", str(run), "--resume",
                              "--stop-after", str(state["step"] + 2), "--sample-tokens", "0"],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"trained {state['step'] + 2} steps" in resumed.stdout


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triform", *args], env=env or _env(), capture_output=True, text=True,
                          timeout=300)


def test_launch_mistakes_get_one_sentence(tmp_path: Path, corpus_file: Path) -> None:
    as_rank = _env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    bad_batch = _cli(*_cli_train(tmp_path / "a", corpus_file, "--max-steps", "2", "--batch-size", "6",
                                 "--grad-accum", "2")[2:], env=as_rank)
    assert bad_batch.returncode == 2
    assert "batch_size 6 (the global batch) does not split over 2 ranks x 2 micro-batches" in bad_batch.stderr
    nccl = _cli(*_cli_train(tmp_path / "b", corpus_file, "--max-steps", "2", "--backend", "nccl")[2:])
    if not torch.cuda.is_available():
        assert nccl.returncode == 2
        assert "backend nccl needs CUDA GPUs and none is visible" in nccl.stderr
    none = _cli(*_cli_train(tmp_path / "c", corpus_file, "--max-steps", "2", "--parallel", "none")[2:], env=as_rank)
    assert none.returncode == 2 and "--parallel none cannot train under torchrun with 2 processes" in none.stderr
    bad = _cli(*_cli_train(tmp_path / "d", corpus_file, "--max-steps", "2", "--parallel", "zero")[2:])
    assert bad.returncode == 2 and "--parallel must be one of auto, none, ddp, fsdp, got 'zero'" in bad.stderr
    started = time.monotonic()
    unreachable = _cli("launch", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", "192.0.2.1:29400", "--rdzv-id", "x", "--rdzv-conf", "join_timeout=3",
                       *_cli_train(tmp_path / "e", corpus_file, "--max-steps", "2")[2:])
    assert unreachable.returncode == 2 and time.monotonic() - started < 60
    assert "cannot reach the rendezvous endpoint 192.0.2.1:29400 within 3 s" in unreachable.stderr
    for result in (bad_batch, nccl, none, bad, unreachable):
        assert "Traceback" not in result.stderr
