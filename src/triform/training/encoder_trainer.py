"""Pretraining byte-level encoders: masked-LM (RoBERTa-style dynamic masks, or BERT's static ones),
plus next-sentence or sentence-order prediction, or DistilBERT distillation from a teacher checkpoint.

Inputs are ``[CLS] segment [SEP]`` (or ``[CLS] A [SEP] B [SEP]`` with segment ids 0/1 for the
pair objectives); the byte tokenizer's <bos>, <eos>, <mask> and <pad> serve as [CLS], [SEP],
[MASK] and [PAD]. The loop reuses the decoder trainer's pieces: AdamW groups, warm-up + cosine,
clipping, wall-clock budgets and atomic checkpoints.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from triform.config import EncoderConfig, get_encoder_preset
from triform.data.corpus import Corpus, load_corpus
from triform.errors import CheckpointError, ConfigError, DataError
from triform.models.encoder import (
    EncoderForPreTraining,
    EncoderForQuestionAnswering,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
    student_from_teacher,
)
from triform.objectives.masked_lm import (
    distillation_loss,
    mask_tokens,
    mlm_loss,
    sentence_pairs,
    static_mask_generator,
)
from triform.tokenizers.byte import ByteTokenizer
from triform.training.checkpoint import CHECKPOINT_DIR, load_weights, read_meta, resolve_checkpoint, save_checkpoint
from triform.training.optim import build_optimizer, lr_at
from triform.training.trainer import parse_duration, resolve_device, steps_for_budget

Objective = Literal["mlm", "mlm+nsp", "mlm+sop", "distill"]


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """One encoder pretraining run.

    Args:
        objective: mlm (RoBERTa: masked-LM only), mlm+nsp (BERT), mlm+sop (ALBERT) or distill
            (DistilBERT: a half-depth student of ``teacher``).
        data: Text file, folder or glob; default: Shakespeare's works with four plays held out.
        context: Tokens per input, [CLS] and [SEP] included.
        batch_size: Sequences per step.
        max_steps: Upper bound on optimizer steps.
        time_budget: Wall-clock budget such as 5m; the step count and cosine horizon are fitted to it.
        lr: Peak learning rate.
        min_lr: Learning rate at the end of the cosine decay.
        warmup_steps: Linear warm-up steps (post-norm stacks need some).
        weight_decay: AdamW weight decay on weight matrices.
        grad_clip: Gradient-norm clipping (0 disables).
        static_masks: BERT's masks fixed per sequence instead of RoBERTa's fresh masks each time.
        teacher: With objective=distill, the teacher's checkpoint folder.
        temperature: Distillation softmax temperature.
        eval_batches: Held-out batches scored at the end.
        seed: Random seed.
        device: "auto", "cpu" or "cuda".
        progress: Show a progress bar.
    """

    objective: Objective = "mlm"
    data: str | None = None
    context: int = 128
    batch_size: int = 32
    max_steps: int = 2000
    time_budget: str | None = None
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    static_masks: bool = False
    teacher: str | None = None
    temperature: float = 2.0
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.objective not in ("mlm", "mlm+nsp", "mlm+sop", "distill"):
            raise ConfigError(
                f"objective must be mlm, mlm+nsp, mlm+sop or distill (encoders), or span, prefix-lm, ul2 or causal "
                f"(encoder-decoders and decoders), got {self.objective!r}."
            )
        if self.objective == "distill" and not self.teacher:
            raise ConfigError("objective distill needs --teacher CHECKPOINT (a pretrained encoder).")
        for name in ("context", "batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.context < 8:
            raise ConfigError(f"context must be at least 8 tokens, got {self.context}.")
        parse_duration(self.time_budget)


@dataclass
class PretrainResult:
    steps: int
    train_loss: float
    val_mlm_loss: float
    val_pair_accuracy: float | None
    seconds: float
    checkpoint: Path


class ByteEncoderInputs:
    """Byte-level encoder inputs from documents: windows for masked-LM, segment pairs for NSP/SOP."""

    def __init__(self, docs: list[bytes], context: int, tok: ByteTokenizer) -> None:
        self.docs = [d for d in docs if len(d) > context]
        if not self.docs:
            raise DataError(f"no document is longer than the context ({context} bytes).")
        self.context, self.tok = context, tok
        self.weights = [len(d) for d in self.docs]
        half = (context - 3) // 2
        # Segments for the pair objectives: consecutive lines packed up to half the context each.
        self.segments: list[list[list[int]]] = []
        for d in self.docs:
            segs, cur = [], b""
            for line in d.split(b"\n"):
                if cur and len(cur) + len(line) + 1 > half:
                    segs.append(list(cur[:half]))
                    cur = b""
                cur = cur + b"\n" + line if cur else line
            if cur:
                segs.append(list(cur[:half]))
            self.segments.append([s for s in segs if s])

    def windows(self, n: int, rng: random.Random) -> Tensor:
        """``n`` rows of [CLS] + context-2 bytes + [SEP] from random places (full-sentence packing)."""
        rows = []
        for d in rng.choices(self.docs, weights=self.weights, k=n):
            s = rng.randrange(len(d) - (self.context - 2))
            rows.append([self.tok.bos_id, *d[s : s + self.context - 2], self.tok.eos_id])
        return torch.tensor(rows)

    def pairs(self, n: int, task: str, rng: random.Random) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(tokens, attention mask, segment ids, labels) for ``n`` NSP or SOP pairs, padded to the context."""
        try:
            items = sentence_pairs(self.segments, task=task, rng=rng, n=n)
        except ValueError as exc:
            raise DataError(f"the corpus is too small for {task}: {exc}") from None
        tokens = torch.full((n, self.context), self.tok.pad_id)
        types = torch.zeros((n, self.context), dtype=torch.long)
        for r, (a, b, _) in enumerate(items):
            row = [self.tok.bos_id, *a, self.tok.eos_id, *b, self.tok.eos_id][: self.context]
            tokens[r, : len(row)] = torch.tensor(row)
            types[r, len(a) + 2 : len(row)] = 1
        mask = (tokens != self.tok.pad_id).long()
        return tokens, mask, types, torch.tensor([y for *_, y in items])


def load_encoder_checkpoint(path: Path | str, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ByteTokenizer, dict[str, Any]]:
    """An encoder checkpoint written by ``pretrain`` or ``finetune``: (model in eval mode, tokenizer, meta)."""
    from triform.tokenizers.base import load_tokenizer

    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    if meta.get("kind") != "encoder":
        raise CheckpointError(f"{folder} holds a decoder; this command needs an encoder checkpoint (from triform pretrain).")
    try:
        cfg = EncoderConfig.from_dict(meta["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{folder / 'config.json'}: {exc}") from None
    head = meta.get("head", "pretraining")
    n = int(meta.get("num_labels", 2))
    model: nn.Module = {
        "pretraining": lambda: EncoderForPreTraining(cfg, pair_head=bool(meta.get("pair_head", cfg.pooler))),
        "sequence": lambda: EncoderForSequenceClassification(cfg, n),
        "token": lambda: EncoderForTokenClassification(cfg, n),
        "qa": lambda: EncoderForQuestionAnswering(cfg),
    }[head]()
    load_weights(model, folder)
    tok = load_tokenizer(folder)
    return model.to(device).eval(), tok, meta  # type: ignore[return-value]


def _objective_loss(
    model: EncoderForPreTraining, cfg: PretrainConfig, data: ByteEncoderInputs, rng: random.Random,
    g: torch.Generator, device: torch.device, teacher: EncoderForPreTraining | None, seen: list[int],
) -> tuple[Tensor, dict[str, float]]:
    tok = data.tok
    pair_task = {"mlm+nsp": "nsp", "mlm+sop": "sop"}.get(cfg.objective)
    if pair_task:
        tokens, mask, types, labels_pair = data.pairs(cfg.batch_size, pair_task, rng)
    else:
        tokens = data.windows(cfg.batch_size, rng)
        mask, types, labels_pair = torch.ones_like(tokens), None, None
    maskable = tokens < 256
    if cfg.static_masks:  # one generator per sequence index seen, so the same sequence gets the same mask
        rows = [mask_tokens(t[None], mask_id=tok.mask_id, random_ids=(0, 256), maskable=m[None],
                            generator=static_mask_generator(seen[0] + i, cfg.seed)) for i, (t, m) in enumerate(zip(tokens, maskable))]
        inputs, labels = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    else:
        inputs, labels = mask_tokens(tokens, mask_id=tok.mask_id, random_ids=(0, 256), maskable=maskable, generator=g)
    seen[0] += len(tokens)
    inputs, labels, mask = inputs.to(device), labels.to(device), mask.to(device)
    types = types.to(device) if types is not None else None
    out = model(inputs, attention_mask=mask, token_type_ids=types)
    if teacher is not None:
        with torch.no_grad():
            t = teacher(inputs, attention_mask=mask)
        return distillation_loss(out.mlm_logits, t.mlm_logits, labels, out.hidden, t.hidden, mask, temperature=cfg.temperature)
    loss = mlm_loss(out.mlm_logits, labels)
    parts = {"mlm": loss.item()}
    if labels_pair is not None and out.pair_logits is not None:
        pair = nn.functional.cross_entropy(out.pair_logits, labels_pair.to(device))
        parts["pair"] = pair.item()
        loss = loss + pair
    return loss, parts


@torch.inference_mode()
def evaluate_pretraining(model: EncoderForPreTraining, cfg: PretrainConfig, data: ByteEncoderInputs, device: torch.device) -> tuple[float, float | None]:
    """Held-out masked-LM loss (fixed masks) and pair accuracy over ``eval_batches`` batches."""
    model.eval()
    rng, g = random.Random(1234), torch.Generator().manual_seed(1234)
    tok = data.tok
    losses, correct, total = [], 0, 0
    pair_task = {"mlm+nsp": "nsp", "mlm+sop": "sop"}.get(cfg.objective)
    for _ in range(cfg.eval_batches):
        tokens = data.windows(cfg.batch_size, rng)
        inputs, labels = mask_tokens(tokens, mask_id=tok.mask_id, random_ids=(0, 256), maskable=tokens < 256, generator=g)
        losses.append(mlm_loss(model(inputs.to(device)).mlm_logits, labels.to(device)).item())
        if pair_task and model.pair is not None:
            toks, mask, types, y = data.pairs(cfg.batch_size, pair_task, rng)
            logits = model(toks.to(device), attention_mask=mask.to(device), token_type_ids=types.to(device)).pair_logits
            correct += int((logits.argmax(-1).cpu() == y).sum())
            total += len(y)
    return sum(losses) / len(losses), (correct / total if total else None)


def pretrain(cfg: PretrainConfig, *, preset: str = "bert-base-tiny", out_dir: Path | str = "runs/encoder", overrides: dict[str, Any] | None = None) -> PretrainResult:
    """Pretrain a byte-level encoder and save it to ``out_dir/checkpoint``."""
    from triform.data.shakespeare import shakespeare_corpus

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng, g = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    tok = ByteTokenizer()
    corpus: Corpus = shakespeare_corpus() if cfg.data is None else load_corpus(cfg.data)
    train_data = ByteEncoderInputs([d.text for d in corpus.train], cfg.context, tok)
    val_data = ByteEncoderInputs([d.text for d in corpus.val], cfg.context, tok)
    teacher = None
    if cfg.objective == "distill":
        teacher_model, _, _ = load_encoder_checkpoint(cfg.teacher, device=device)  # type: ignore[arg-type]
        if not isinstance(teacher_model, EncoderForPreTraining):
            raise ConfigError("the teacher must be a pretrained encoder (masked-LM head), not a fine-tuned one.")
        teacher = teacher_model.eval()
        model = student_from_teacher(teacher).to(device)
    else:
        vocab = -(-tok.vocab_size // 8) * 8
        mcfg = get_encoder_preset(preset).replace(vocab_size=vocab, pad_id=tok.pad_id, **(overrides or {}))
        if cfg.context > mcfg.max_tokens:
            mcfg = mcfg.replace(max_seq_len=cfg.context + mcfg.position_offset)
        if cfg.objective == "mlm+sop" and not mcfg.pooler:
            mcfg = mcfg.replace(pooler=True)
        model = EncoderForPreTraining(mcfg, pair_head=cfg.objective in ("mlm+nsp", "mlm+sop")).to(device)
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    budget = parse_duration(cfg.time_budget)
    total = cfg.max_steps
    bar = tqdm(total=total, disable=not cfg.progress, unit="step", dynamic_ncols=True, file=sys.stderr, desc=cfg.objective)
    seen = [0]
    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, total=total)
        model.train()
        loss, parts = _objective_loss(model, cfg, train_data, rng, g, device, teacher, seen)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        elapsed = time.perf_counter() - t0
        if budget is not None and step == 10:  # fit the step count (and cosine horizon) to the budget
            total = steps_for_budget(step, elapsed, budget, cfg.max_steps)
            bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}, refresh=False)
        if budget is not None and elapsed > budget:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    val_loss, pair_acc = evaluate_pretraining(model, cfg, val_data, device)
    out = Path(out_dir)
    meta = {"kind": "encoder", "head": "pretraining", "pair_head": model.pair is not None, "objective": cfg.objective,
            "train": {k: v for k, v in cfg.__dict__.items()}}
    saved = save_checkpoint(out / CHECKPOINT_DIR, model, tok, extra=meta)
    return PretrainResult(step, sum(losses[-20:]) / len(losses[-20:]), val_loss, pair_acc, seconds, saved)
