"""The one training loop, for every objective and every model family.

``fit(model, objective, args)`` owns what every run needs once: AdamW groups, warm-up + cosine,
gradient accumulation normalised by the step's token count, clipping, the precision choice, a
wall-clock budget that is refitted as the pace becomes known, periodic and final evaluation, the
divergence check, atomic checkpoints (periodic, final, and on Ctrl-C), bit-exact resume,
``metrics.jsonl``, the loss plot and the progress bar. ``train_step`` is the plain step it calls, so
a distributed wrapper or a benchmark can call it too. A step makes one host sync: the logged loss
(and gradient norm) come back in a single transfer after the optimizer step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from triform.checkpoint import CHECKPOINT_DIR, load_trainer_state, save_checkpoint
from triform.output_dir import check_output_dir, claim_output_dir, is_own_output
from triform.errors import ConfigError
from triform.objectives.base import Batch, BatchRng, Objective, combine
from triform.tokenizers.base import Tokenizer
from triform.device import resolve_device
from triform.training import distributed
from triform.training.args import TrainArgs, parse_duration
from triform.training.distributed import World
from triform.training.optim import build_optimizer, lr_at
from triform.training.precision import PrecisionChoice, choose_precision

SKIP_STEPS = 2  # steps not timed for the pace: they include allocation and kernel selection
CALIBRATION_STEPS = 8  # timed steps before the first fit of the step count to a budget
REFITS = 10  # the step count is refitted each time another tenth of the budget has passed


@dataclass
class FitResult:
    """What a run produced: losses per step, evaluations, the final metrics and where time went."""

    steps: int
    train_losses: list[float]
    evals: list[dict[str, float]]
    final: dict[str, float]
    seconds: float  # the whole loop: training, evaluation and checkpoints
    train_seconds: float
    eval_seconds: float
    tokens: int
    precision: str
    out_dir: Path | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)

    @property
    def val_loss(self) -> float | None:
        return self.final.get("loss")

    @property
    def val_bpb(self) -> float | None:
        return self.final.get("bpb")

    @property
    def train_loss(self) -> float:
        """The mean training loss of the last 20 steps."""
        tail = self.train_losses[-20:]
        return sum(tail) / max(len(tail), 1)

    @property
    def checkpoint(self) -> Path | None:
        return self.out_dir / CHECKPOINT_DIR if self.out_dir is not None else None


def _rng_state(rng: BatchRng) -> dict[str, Any]:
    state = {"batch": rng.state_dict(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(rng: BatchRng, state: dict[str, Any]) -> None:
    rng.load_state_dict(state["batch"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RUN_FILES = (CHECKPOINT_DIR, "metrics.jsonl", "loss.png")


def check_run_dir(out_dir: Path | str, *, command: str, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse ``out_dir`` for a new training run of ``command`` before any slow work starts, touching
    nothing: a folder with files triform did not write (unless ``overwrite``), or one that already
    holds a run (unless ``overwrite``; ``resume`` continues it instead)."""
    out = Path(out_dir)
    if resume:
        return  # the run's checkpoint is checked by loading it
    check_output_dir(out, command=command, overwrite=overwrite)
    if out.is_dir() and not overwrite and any((out / name).exists() for name in RUN_FILES):
        what = "a training run" if is_own_output(out, command) else "output of another command"
        raise ConfigError(f"{out} already holds {what}; pass --resume to continue it or --overwrite to start again.")


def claim_run_dir(out_dir: Path | str, *, command: str, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``out_dir`` the folder of a training run of ``command`` (see ``check_run_dir``): a new or
    empty folder is created and marked; with ``overwrite`` an earlier run's checkpoint, metrics and
    plot are removed first (and nothing else in the folder)."""
    out = Path(out_dir)
    check_run_dir(out, command=command, resume=resume, overwrite=overwrite)
    if resume or not distributed.is_main_process():
        return out  # under torchrun rank 0 alone claims (the others have checked the same folder)
    if out.is_dir():
        import shutil

        for name in RUN_FILES:
            for path in (out / name, out / f".{name}.old", out / f".{name}.tmp"):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    return claim_output_dir(out, command=command, overwrite=overwrite)


def model_width(model: nn.Module) -> int:
    """The model's hidden width, for sizing the precision measurement."""
    cfg = getattr(model, "cfg", None)
    vision = getattr(cfg, "vision", None)  # CLIP: the wider of its two towers
    for stack in (getattr(cfg, "stack", None), getattr(cfg, "encoder", None), getattr(cfg, "text", None)):
        if stack is not None:
            return max(int(stack.d_model), int(vision.stack.d_model) if vision is not None else 0)
    return 512


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type, or nothing for float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def step_counts(batches: Sequence[Batch]) -> dict[str, int]:
    """Each loss part's count added over micro-batches."""
    counts: dict[str, int] = {}
    for b in batches:
        for k, v in b.counts.items():
            counts[k] = counts.get(k, 0) + v
    return counts


def accumulate_gradients(
    model: nn.Module, objective: Objective, batches: Sequence[Batch], *, amp_dtype: torch.dtype | None = None,
    counts: dict[str, int] | None = None, scale: float = 1.0,
) -> Tensor:
    """Backward through every micro-batch (already on the model's device), each part of the loss
    divided by its count summed over all of them, so the gradients equal one large batch's.
    ``counts`` are the whole step's when the batches are one rank's share of it; ``scale`` (the world
    size) undoes the ranks' gradient averaging. Returns this process's share of the step's loss as a
    tensor, without synchronising with the device."""
    counts = step_counts(batches) if counts is None else counts
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    sync = getattr(model, "no_sync", None)
    fsdp_sync = getattr(model, "set_requires_gradient_sync", None)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        # reduce gradients once, on the last micro-batch: DDP's no_sync (nanoGPT's
        # require_backward_grad_sync); FSDP2 keeps unsharded gradients until the last one
        ctx = sync() if sync is not None and not last else nullcontext()
        if fsdp_sync is not None:
            fsdp_sync(last)
        with ctx:
            with autocast(device, amp_dtype):
                sums = objective.loss(model, b)
            loss = combine(objective, sums, counts)
            (loss * scale if scale != 1.0 else loss).backward()
        total += loss.detach().float()
    return total


def _leaves_parameters_unused(model: nn.Module, objective: Objective, batch: Batch) -> bool:
    """Whether a backward on ``batch`` leaves some trainable parameter without a gradient (DDP must
    then look for unused parameters every step). RNG streams and gradients are left as found."""
    with torch.random.fork_rng(devices=[]):
        accumulate_gradients(model, objective, [batch])
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return unused


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective, batches: Sequence[Batch], *,
    lr: float, grad_clip: float, amp_dtype: torch.dtype | None = None, counts: dict[str, int] | None = None,
    scale: float = 1.0,
) -> Tensor:
    """One optimizer step over micro-batches: gradients accumulated by ``accumulate_gradients``,
    clipped, applied. Returns (loss, gradient norm) as one tensor, without synchronising."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    total = accumulate_gradients(model, objective, batches, amp_dtype=amp_dtype, counts=counts, scale=scale)
    if grad_clip > 0:
        norm = distributed.full_norm(nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    else:
        norm = torch.zeros((), device=total.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([total, norm.float().to(total.device)])


def evaluate_objective(
    model: nn.Module, objective: Objective, batches: Sequence[Batch] | Any, *, amp_dtype: torch.dtype | None = None,
    world: World | None = None,
) -> dict[str, float]:
    """The objective's metrics over held-out batches: sums and counts added over all of them, one
    sync. Under several ranks (``world``) each evaluates every world-size-th batch and the sums are
    all-reduced; the counts are known on every rank."""
    world = world or World()
    batches = list(batches)
    counts = step_counts(batches)
    shard = world.active and len(batches) >= world.size
    if shard:
        mine = batches[world.rank :: world.size]
        rounds = -(-len(batches) // world.size)  # FSDP: every rank runs as many forwards as the others
    else:
        mine, rounds = batches, len(batches)
    fsdp = world.active and world.parallel == "fsdp"
    net = distributed.unwrap(model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    sums: dict[str, Tensor] = {}
    with torch.no_grad() if fsdp else torch.inference_mode():
        for i in range(rounds):
            b = mine[i] if i < len(mine) else mine[0]
            with autocast(device, amp_dtype):
                out = objective.loss(net, b.to(device))
            if i >= len(mine):
                continue  # a padding forward, for the collectives only
            for k, v in out.items():
                sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
    net.train(was_training)
    names = sorted(sums)
    if shard:
        import torch.distributed as dist

        every: list[Any] = [None] * world.size
        dist.all_gather_object(every, names)
        names = sorted(set().union(*every))
    if not names:
        return {}
    zero = torch.zeros((), device=device)
    values_t = torch.stack([sums.get(k, zero) for k in names])
    if shard:
        values_t = distributed.all_reduce_sum(values_t)
    values = values_t.tolist()
    return objective.summarize(dict(zip(names, values)), counts)


def plot_losses(path: Path, losses: list[float], evals: list[dict[str, float]], title: str) -> None:
    """Save the training loss per step and the held-out loss at each evaluation (nats) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if losses:
        ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.7, label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", lw=1.5, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


class _Budget:
    """Fits the step count to a wall-clock budget: the pace is measured after the first steps
    (which include start-up) and re-measured each tenth of the budget; evaluation time is counted,
    and the final evaluation and checkpoint are reserved for."""

    def __init__(self, seconds: float, cap: int | None, eval_interval: int) -> None:
        self.seconds, self.cap, self.eval_interval = seconds, cap, eval_interval
        self.step_time, self.steps_timed = 0.0, 0
        self.eval_time, self.evals = 0.0, 0
        self.reserve = 0.0
        self.next_refit = 0.0

    def record_step(self, step: int, seconds: float) -> None:
        if step > SKIP_STEPS:
            self.step_time += seconds
            self.steps_timed += 1

    def record_eval(self, seconds: float, batches: int, final_batches: int) -> None:
        """Time one periodic evaluation took; the fastest per-batch time seen (the first evaluation
        includes start-up) sizes the reserve for the final evaluation and checkpoint."""
        self.eval_time += seconds
        self.evals += 1
        per_batch = seconds / max(batches, 1)
        self.per_batch = min(getattr(self, "per_batch", per_batch), per_batch)
        self.reserve = self.per_batch * (final_batches + 2)

    def refit(self, step: int, elapsed: float, total: int | None) -> int | None:
        """A new total step count, or ``total`` unchanged when it is not time to refit."""
        if self.steps_timed < CALIBRATION_STEPS or (total is not None and elapsed < self.next_refit):
            return total
        self.next_refit = elapsed + self.seconds / REFITS
        pace = self.step_time / self.steps_timed
        if self.evals:
            pace += self.eval_time / self.evals / self.eval_interval
        room = self.seconds - elapsed - self.reserve
        fitted = step + max(0, int(room / pace))
        return max(step + 1, min(self.cap, fitted) if self.cap is not None else fitted)

    def pace(self) -> float:
        """Seconds one more step takes, as measured so far (0 before any step is timed)."""
        return self.step_time / self.steps_timed if self.steps_timed else 0.0

    def out_of_time(self, elapsed: float) -> bool:
        if self.steps_timed < CALIBRATION_STEPS:
            return elapsed > self.seconds
        return elapsed + self.step_time / self.steps_timed + self.reserve > self.seconds


def fit(
    model: nn.Module, objective: Objective, args: TrainArgs, *, out_dir: Path | str | None = None,
    tokenizer: Tokenizer | None = None, meta: dict[str, Any] | None = None, resume: bool = False,
    stop_after: int | None = None, title: str = "", log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``objective`` with ``args``; writes ``checkpoint/``, ``metrics.jsonl`` and
    ``loss.png`` into ``out_dir`` (nothing when it is None).

    ``resume`` continues from ``out_dir``'s checkpoint (the caller has loaded its weights into
    ``model``) exactly as if the run had never stopped. ``stop_after`` pauses at that step with the
    schedule unchanged, as an interruption would. Ctrl-C saves a resumable checkpoint, then re-raises.

    Under ``torchrun`` every rank calls ``fit`` with the same arguments: the process group is joined
    here, the model is wrapped (``args.parallel``), each rank trains on its share of every step's
    global batch, and rank 0 alone prints, logs and writes files (see ``triform.training.distributed``).
    """
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and tokenizer is None:
        raise ValueError("fit needs the tokenizer to save checkpoints into out_dir.")
    device = resolve_device(args.device)
    world = distributed.setup(args.parallel, args.backend, device=device, timeout_s=args.dist_timeout)
    device = distributed.device_for(world, device)
    main = world.is_main
    quiet: Callable[[str], None] = lambda msg: None  # noqa: E731
    say = (log or distributed.print_main) if main else quiet
    model.to(device)
    budget_s = parse_duration(args.time_budget)
    eval_set = list(objective.eval_batches(final=False))
    final_set = list(objective.eval_batches(final=True))
    if world.active:
        unused = not eval_set or _leaves_parameters_unused(model, objective, eval_set[0].to(device))
        model = distributed.wrap(model, world, device, find_unused=unused, say=say)
        say(f"{world.parallel} over {world.size} ranks ({world.backend}); each step's {args.batch_size} rows split "
            f"into {args.micro_batches} micro-batches of {args.micro_batch_size}, {args.grad_accum} per rank")
    base = distributed.unwrap(model)  # the optimizer and checkpoints see the module itself
    optimizer = build_optimizer(base, lr=args.lr, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2))
    rng = BatchRng(args.seed)
    step, losses, evals = 0, [], []
    total: int | None = None if budget_s else args.max_steps
    elapsed_before, tokens = 0.0, 0
    precision: PrecisionChoice
    if resume:
        if out is None:
            raise ValueError("resume needs out_dir.")
        state = load_trainer_state(out)
        distributed.load_optimizer_state(base, optimizer, state["optimizer"], world)
        _set_rng_state(rng, state["rng"])
        objective.load_state_dict(state.get("objective", {}))
        step, losses, evals = state["step"], list(state["losses"]), list(state["evals"])
        total, elapsed_before, tokens = state["total_steps"], state["elapsed"], state.get("tokens", 0)
        precision = choose_precision(state.get("precision", "float32"), device)
        if total is not None:
            budget_s = None
    else:
        name = args.precision
        if world.active and name == "auto":  # one measurement decides for every rank: rank 0's
            name = distributed.broadcast_object(world, choose_precision(name, device, d_model=model_width(base)).name)
        precision = choose_precision(name, device, d_model=model_width(base))
    distributed.seed_rank(world, args.seed, step)
    amp = precision.dtype
    budget = _Budget(budget_s - elapsed_before, args.max_steps, args.eval_interval) if budget_s and main else None
    say(f"precision: {precision.reason}")

    metrics = None
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        # opened once, line-buffered: each record reaches the file as it is written, without an open per step
        metrics = open(out / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed before returning)
    t0 = time.perf_counter()
    eval_seconds = 0.0
    saved_at: int | None = step if resume else None

    def elapsed() -> float:
        return time.perf_counter() - t0

    def write(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        nonlocal saved_at
        if out is None:
            return
        weights, optim_state = distributed.gather_state(model, optimizer, world)
        if main:
            trainer_state = {
                "optimizer": optim_state, "rng": _rng_state(rng), "objective": objective.state_dict(),
                "step": step, "losses": losses, "evals": evals, "total_steps": total, "tokens": tokens,
                "elapsed": elapsed_before + elapsed(), "precision": precision.name,
            }
            save_checkpoint(out / CHECKPOINT_DIR, base, tokenizer, trainer_state=trainer_state, extra=meta,  # type: ignore[arg-type]
                            state=weights)
        distributed.barrier(world)
        saved_at = step

    def run_eval(batches: list[Batch], kind: str) -> dict[str, float]:
        nonlocal eval_seconds
        t = time.perf_counter()
        result = {"step": step, **evaluate_objective(model, objective, batches, amp_dtype=amp, world=world)}
        seconds = time.perf_counter() - t
        eval_seconds += seconds
        if budget is not None and kind == "eval":
            budget.record_eval(seconds, len(batches), len(final_set))
        write({"kind": kind, **result})
        return result

    keep = distributed.micro_batches(world, args.grad_accum)
    # under several ranks rank 0's budget decisions (the refitted step count, and whether the next step
    # still fits) travel with the next step's loss all-reduce: [total or -1, stop after that step]
    pending = [-1.0 if total is None else float(total), 0.0]
    bar = None
    train_seconds = 0.0
    warmup = args.warmup_steps
    try:
        with distributed.terminate_as_exception(world):
            if step == 0 and eval_set:
                e = run_eval(eval_set, "eval")
                evals.append(e)
                say(f"step 0: held-out loss {e['loss']:.4f}" + (f", {e['bpb']:.3f} bits/byte" if "bpb" in e else ""))
            if budget_s:
                total = None
                pending[0] = -1.0
            bar = tqdm(total=total, initial=step, disable=not (args.progress and main), unit="step", dynamic_ncols=True,
                       file=sys.stderr, desc=objective.name)
            while total is None or step < total:
                if stop_after is not None and step >= stop_after:
                    break
                t_step = time.perf_counter()
                horizon = total if total is not None else args.max_steps
                if args.warmup_steps is None:
                    warmup = max(1, (horizon or 10) // 10)
                lr = lr_at(step, lr=args.lr, min_lr=args.final_lr, warmup=warmup or 0, total=total)
                drawn = [objective.batch(rng) for _ in range(args.micro_batches)]
                counts = step_counts(drawn)
                batches = [b.to(device) for b in drawn[keep[0] : keep[1]]]
                stats = train_step(model, optimizer, objective, batches, lr=lr, grad_clip=args.grad_clip, amp_dtype=amp,
                                   counts=counts, scale=float(world.size))
                stop_next = False
                if world.active:
                    own = 1.0 if main else 0.0
                    vec = torch.cat([stats * torch.tensor([1.0, own], device=stats.device),
                                     torch.tensor(pending, device=stats.device) * own])
                    loss, norm, shared_total, stop_next_f = distributed.all_reduce_sum(vec).tolist()  # the one sync
                    total = None if shared_total < 0 else int(shared_total)
                    stop_next = stop_next_f > 0
                else:
                    loss, norm = stats.tolist()  # the step's one host sync
                if not math.isfinite(loss):
                    raise ConfigError(
                        f"training diverged at step {step + 1} (loss {loss}); lower the learning rate"
                        + (" (the last checkpoint is kept)." if out is not None else ".")
                    )
                step += 1
                losses.append(loss)
                tokens += counts.get("tokens", counts[objective.parts[0]])
                seconds = time.perf_counter() - t_step
                train_seconds += seconds
                write({"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": norm})
                if budget is not None:
                    budget.record_step(step, seconds)
                    refitted = budget.refit(step, elapsed(), total)
                    if world.active:  # decided here, applied by every rank after the next step
                        pending = [-1.0 if refitted is None else float(refitted),
                                   1.0 if budget.out_of_time(elapsed() + budget.pace()) else 0.0]
                    elif refitted != total:
                        total = refitted
                if bar.total != total:
                    bar.total = total
                    bar.refresh()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens / max(train_seconds, 1e-9):,.0f}",
                                refresh=False)
                if world.active:
                    done = (total is not None and step >= total) or stop_next
                else:
                    done = (total is not None and step >= total) or (budget is not None and budget.out_of_time(elapsed()))
                if args.max_steps is not None and step >= args.max_steps:
                    done = True
                if step % args.eval_interval == 0 and not done and eval_set:
                    e = run_eval(eval_set, "eval")
                    evals.append(e)
                    if main:
                        bar.write(f"step {step}: train loss {loss:.4f}, held-out loss {e['loss']:.4f}"
                                  + (f", {e['bpb']:.3f} bits/byte" if "bpb" in e else ""), file=sys.stderr)
                    if out is not None and main:
                        plot_losses(out / "loss.png", losses, evals, title)
                if step % args.checkpoint_interval == 0 and not done:
                    checkpoint()
                if done:
                    break
            bar.close()
            final: dict[str, float] = {}
            if final_set:
                final = run_eval(final_set, "final_eval")
                evals.append(final)
            if stop_after is None:
                total = step  # a budget run may end early: record where its schedule ended
            checkpoint()
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if not world.active or world.parallel == "ddp":
            _save_local(world, checkpoint, base, optimizer, out, tokenizer, meta, rng, objective, step, losses, evals,
                        total, tokens, elapsed_before + elapsed(), precision.name)
            if out is not None:
                say(f"interrupted at step {step}; checkpoint saved in {out / CHECKPOINT_DIR}, continue with --resume.")
        raise
    except BaseException as exc:
        if world.active and distributed.is_communication_error(exc):
            distributed.stopping()
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
            last = str(out / CHECKPOINT_DIR) + f", step {saved_at}" if out is not None and saved_at is not None else None
            message = distributed.failure_message(world, step, last, terminated=isinstance(exc, distributed.Terminated))
            raise distributed.RankFailure(message) from None
        raise
    if out is not None and main:
        plot_losses(out / "loss.png", losses, evals, title)
    seconds = elapsed()
    if metrics is not None:
        metrics.close()
    return FitResult(
        steps=step, train_losses=losses, evals=evals, final=final, seconds=seconds, train_seconds=train_seconds,
        eval_seconds=eval_seconds, tokens=tokens, precision=precision.name, out_dir=out,
        extra={"budget": budget_s, "parameters": sum(p.numel() for p in base.parameters()), "world_size": world.size,
               "parallel": world.parallel},
    )


def _save_local(world: World, checkpoint: Callable[[], None], base: nn.Module, optimizer: torch.optim.Optimizer,
                out: Path | None, tokenizer: Tokenizer | None, meta: dict[str, Any] | None, rng: BatchRng,
                objective: Objective, step: int, losses: list[float], evals: list[dict[str, float]], total: int | None,
                tokens: int, elapsed_s: float, precision: str) -> None:
    """The Ctrl-C checkpoint. One process saves as usual; under DDP every rank holds the same weights
    and optimizer state, so rank 0 saves its own without any collective (the others may be gone)."""
    if not world.active:
        checkpoint()
        return
    if out is None or not world.is_main:
        return
    trainer_state = {
        "optimizer": optimizer.state_dict(), "rng": _rng_state(rng), "objective": objective.state_dict(),
        "step": step, "losses": losses, "evals": evals, "total_steps": total, "tokens": tokens,
        "elapsed": elapsed_s, "precision": precision,
    }
    save_checkpoint(out / CHECKPOINT_DIR, base, tokenizer, trainer_state=trainer_state, extra=meta)  # type: ignore[arg-type]
