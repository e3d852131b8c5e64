"""Pretraining with span corruption, prefix-LM or UL2's mixture of denoisers, for either family:
an encoder-decoder (``Seq2Seq``, T5 / ByT5 presets) or a decoder (``DecoderLM`` presets, trained as
a prefix-LM: bidirectional over the inputs, causal over the targets). ``causal`` trains a decoder as
a plain language model with the same loop, so objectives can be compared at equal budgets.

Byte-level throughout (``denoising_tokenizer``: bytes, specials, UL2's mode tokens, 250 sentinels).
The loop reuses the decoder trainer's pieces: AdamW groups, warm-up + cosine, clipping, wall-clock
budgets and atomic checkpoints. ``denoise_step`` is a plain function a distributed wrapper can call.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from triform.config import PRESETS, SEQ2SEQ_PRESETS, get_preset, get_seq2seq_preset
from triform.data.corpus import Corpus, load_corpus
from triform.errors import CheckpointError, ConfigError, DataError
from triform.models.decoder import DecoderLM
from triform.models.encoder_decoder import Seq2Seq
from triform.objectives.denoise import IGNORE, OBJECTIVES, DenoisingTask, prefix_lm_batch, seq2seq_batch, task_for
from triform.tokenizers.byte import ByteTokenizer, denoising_tokenizer
from triform.training.checkpoint import CHECKPOINT_DIR, load_weights, read_meta, resolve_checkpoint, save_checkpoint
from triform.training.optim import build_optimizer, lr_at
from triform.training.trainer import LN2, parse_duration, resolve_device, steps_for_budget

DENOISING_OBJECTIVES = ("span", "prefix-lm", "ul2")


def family_of(preset: str) -> str:
    """"seq2seq" or "decoder" for a preset name, or a ConfigError listing both kinds."""
    if preset in SEQ2SEQ_PRESETS:
        return "seq2seq"
    if preset in PRESETS:
        return "decoder"
    raise ConfigError(
        f"unknown preset {preset!r}; encoder-decoder presets: {', '.join(SEQ2SEQ_PRESETS)}; "
        f"decoder presets: {', '.join(sorted(PRESETS))}."
    )


@dataclass(frozen=True, kw_only=True)
class DenoiseConfig:
    """One denoising pretraining run.

    Args:
        objective: span (T5 span corruption), prefix-lm, ul2 (mixture of denoisers), or causal
            (plain language modelling; decoder presets only).
        data: Text file, folder or glob; default: Shakespeare's works with four plays held out.
        context: Bytes of text per example, before corruption.
        batch_size: Examples per step.
        max_steps: Upper bound on optimizer steps.
        time_budget: Wall-clock budget such as 5m; the step count and cosine horizon are fitted to it.
        lr: Peak learning rate.
        min_lr: Learning rate at the end of the cosine decay (default lr / 10).
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay on weight matrices.
        grad_clip: Gradient-norm clipping (0 disables).
        noise_density: Share of bytes hidden by span corruption.
        mean_span: Mean span length of span corruption (ByT5: 20 bytes).
        mixture_weights: UL2 weights of R(3), R(8), X(3,.5), X(8,.5), X(64,.15), X(64,.5), S.
        eval_batches: Held-out batches scored at the end.
        seed: Random seed.
        device: "auto", "cpu" or "cuda".
        progress: Show a progress bar.
    """

    objective: str = "ul2"
    data: str | None = None
    context: int = 512
    batch_size: int = 16
    max_steps: int = 2000
    time_budget: str | None = None
    lr: float = 2e-3
    min_lr: float | None = None
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    noise_density: float = 0.15
    mean_span: float = 20.0
    mixture_weights: tuple[float, ...] | None = None
    eval_batches: int = 4
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.")
        for name in ("batch_size", "max_steps", "eval_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}.")
        if self.context < 8:
            raise ConfigError(f"context must be at least 8 bytes, got {self.context}.")
        if not self.lr > 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise ConfigError("lr must be positive and min_lr between 0 and lr.")
        if not 0.0 < self.noise_density < 1.0 or not self.mean_span > 0:
            raise ConfigError(f"noise_density must be in (0, 1) and mean_span positive, got {self.noise_density} and {self.mean_span}.")
        if self.mixture_weights is not None:
            w = list(self.mixture_weights)
            if len(w) != 7 or any(x < 0 for x in w) or not sum(w) > 0:
                raise ConfigError("mixture_weights must be 7 non-negative numbers (R3, R8, X3, X8, X64, X64', S) summing to a positive number.")
        parse_duration(self.time_budget)


@dataclass
class DenoiseResult:
    steps: int
    train_loss: float
    val_loss: float
    val_bits_per_byte: float
    seconds: float
    checkpoint: Path
    family: str
    parameters: int
    target_tokens: int = 0  # tokens that carried loss during training


class ByteWindows:
    """Random windows of ``length`` bytes from documents, weighted by document length."""

    def __init__(self, docs: Sequence[bytes], length: int) -> None:
        self.docs = [d for d in docs if len(d) > length]
        if not self.docs:
            raise DataError(f"no document is longer than the context ({length} bytes).")
        self.length, self.weights = length, [len(d) for d in self.docs]

    def sample(self, n: int, rng: random.Random) -> list[list[int]]:
        out = []
        for d in rng.choices(self.docs, weights=self.weights, k=n):
            s = rng.randrange(len(d) - self.length + 1)
            out.append(list(d[s : s + self.length]))
        return out


def build_model(family: str, preset: str, tok: ByteTokenizer, task: DenoisingTask, context: int,
                overrides: dict[str, Any] | None = None) -> nn.Module:
    """The preset, re-shaped for the byte vocabulary and long enough for the task's examples."""
    vocab = -(-tok.vocab_size // 8) * 8
    longest = task.max_length(context)
    if family == "seq2seq":
        cfg = get_seq2seq_preset(preset).replace(
            vocab_size=vocab, pad_id=tok.pad_id, eos_id=tok.eos_id, decoder_start_id=tok.pad_id, **(overrides or {}))
        if longest > cfg.encoder.max_seq_len:
            cfg = cfg.replace(max_seq_len=longest)
        return Seq2Seq(cfg)
    if task.objective != "causal" and get_preset(preset).stack.sliding_window is not None:
        raise ConfigError(f"preset {preset} has a sliding window; prefix-LM training needs full attention.")
    total = context + 1 if task.objective == "causal" else 2 * longest
    dcfg = get_preset(preset).replace(vocab_size=vocab, **(overrides or {}))
    if total > dcfg.stack.max_seq_len:
        dcfg = dcfg.replace(max_seq_len=total)
    return DecoderLM(dcfg)


def example_batch(task: DenoisingTask, windows: list[list[int]], rng: random.Random, tok: ByteTokenizer, family: str) -> dict[str, Tensor]:
    """Tensors of one batch: seq2seq (source, source_mask, decoder_input, labels) or decoder
    (tokens, labels, prefix_lengths)."""
    pairs = [task.example(w, rng) for w in windows]
    if family == "seq2seq":
        return vars(seq2seq_batch(pairs, pad_id=tok.pad_id, start_id=tok.pad_id))
    tokens, labels, prefix = prefix_lm_batch(pairs, pad_id=tok.pad_id)
    return {"tokens": tokens, "labels": labels, "prefix_lengths": prefix}


def batch_logits(model: nn.Module, batch: dict[str, Tensor], *, causal: bool = False) -> Tensor:
    """Logits (B, T, V) for a batch built by ``example_batch``."""
    if isinstance(model, Seq2Seq):
        return model(batch["source"], batch["decoder_input"], source_mask=batch["source_mask"])
    prefix = None if causal else batch["prefix_lengths"]
    return model(batch["tokens"], prefix_lengths=prefix)


def denoise_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], *, lr: float,
                 grad_clip: float, causal: bool = False) -> float:
    """One optimizer step on one batch; returns the mean cross-entropy over target tokens (nats)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    logits = batch_logits(model, batch, causal=causal)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.inference_mode()
def evaluate_denoising(model: nn.Module, task: DenoisingTask, windows: ByteWindows, tok: ByteTokenizer, family: str,
                       *, batches: int, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Held-out (nats per target token, bits per target byte) with fixed examples (seed 1234)."""
    model.eval()
    rng = random.Random(1234)
    nats, tokens, nbytes = 0.0, 0, 0
    for _ in range(batches):
        batch = {k: v.to(device) for k, v in example_batch(task, windows.sample(batch_size, rng), rng, tok, family).items()}
        logits = batch_logits(model, batch, causal=task.objective == "causal")
        labels = batch["labels"]
        nats += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum").item()
        tokens += int((labels != IGNORE).sum())
        nbytes += int(((labels >= 0) & (labels < 256)).sum())
    return nats / max(tokens, 1), nats / (max(nbytes, 1) * LN2)


def pretrain_denoiser(
    cfg: DenoiseConfig, *, preset: str = "byt5-tiny", out_dir: Path | str = "runs/ul2", overrides: dict[str, Any] | None = None,
) -> DenoiseResult:
    """Pretrain an encoder-decoder or a decoder with ``cfg.objective``; saves ``out_dir/checkpoint``."""
    from triform.data.shakespeare import shakespeare_corpus

    family = family_of(preset)
    if family == "seq2seq" and cfg.objective == "causal":
        raise ConfigError("objective causal trains decoder presets; an encoder-decoder needs span, prefix-lm or ul2.")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok = denoising_tokenizer()
    try:
        task = task_for(tok, cfg.objective, noise_density=cfg.noise_density, mean_span=cfg.mean_span,
                        mixture_weights=cfg.mixture_weights)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    length = cfg.context + 1 if cfg.objective == "causal" else cfg.context
    corpus: Corpus = shakespeare_corpus() if cfg.data is None else load_corpus(cfg.data)
    train_windows = ByteWindows([d.text for d in corpus.train], length)
    val_windows = ByteWindows([d.text for d in corpus.val], length)
    model = build_model(family, preset, tok, task, cfg.context, overrides).to(device)
    if cfg.objective != "causal" and task.max_spans(cfg.context) > len(task.sentinels):
        raise ConfigError(f"a context of {cfg.context} bytes needs up to {task.max_spans(cfg.context)} sentinels; "
                          f"the tokenizer has {len(task.sentinels)}. Use a shorter context.")
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    budget = parse_duration(cfg.time_budget)
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    total = cfg.max_steps
    n_params = sum(p.numel() for p in model.parameters())
    bar = tqdm(total=total, disable=not cfg.progress, unit="step", dynamic_ncols=True, file=sys.stderr,
               desc=f"{cfg.objective} ({family}, {n_params / 1e6:.2f}M)")
    t0 = time.perf_counter()
    losses: list[float] = []
    step, target_tokens = 0, 0
    while step < total:
        batch = example_batch(task, train_windows.sample(cfg.batch_size, rng), rng, tok, family)
        target_tokens += int((batch["labels"] != IGNORE).sum())  # counted on the host, before the copy
        batch = {k: v.to(device) for k, v in batch.items()}
        lr = lr_at(step, lr=cfg.lr, min_lr=min_lr, warmup=cfg.warmup_steps, total=total)
        loss = denoise_step(model, opt, batch, lr=lr, grad_clip=cfg.grad_clip, causal=cfg.objective == "causal")
        if not math.isfinite(loss):
            raise ConfigError(f"training diverged at step {step + 1} (loss {loss}); lower the learning rate.")
        losses.append(loss)
        step += 1
        elapsed = time.perf_counter() - t0
        if budget is not None and step == 5:  # fit the step count (and cosine horizon) to the budget
            total = steps_for_budget(step, elapsed, budget, cfg.max_steps)
            bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if budget is not None and elapsed > budget:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    val_loss, val_bpb = evaluate_denoising(model, task, val_windows, tok, family, batches=cfg.eval_batches,
                                           batch_size=cfg.batch_size, device=device)
    meta = {"kind": family, "objective": cfg.objective, "preset": preset,
            "train": {**asdict(cfg), "mixture_weights": list(cfg.mixture_weights) if cfg.mixture_weights else None}}
    saved = save_checkpoint(Path(out_dir) / CHECKPOINT_DIR, model, tok, extra=meta)
    tail = losses[-20:]
    return DenoiseResult(step, sum(tail) / len(tail), val_loss, val_bpb, seconds, saved, family, n_params, target_tokens)


def load_seq2seq_checkpoint(path: Path | str, *, device: str | torch.device = "cpu") -> tuple[Seq2Seq, ByteTokenizer, dict[str, Any]]:
    """An encoder-decoder checkpoint (from ``pretrain_denoiser`` or ``triform convert``): (model, tokenizer, meta)."""
    from triform.config import Seq2SeqConfig
    from triform.tokenizers.base import load_tokenizer

    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    if meta.get("kind") != "seq2seq":
        raise CheckpointError(f"{folder} does not hold an encoder-decoder model.")
    try:
        mcfg = Seq2SeqConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: {exc}") from None
    model = load_weights(Seq2Seq(mcfg), folder)
    return model.to(device).eval(), load_tokenizer(folder), meta  # type: ignore[return-value]
