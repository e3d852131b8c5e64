"""Fine-tuning encoders for sequence classification: from a triform encoder checkpoint, a Hugging Face
encoder folder (WordPiece, e.g. all-MiniLM-L6-v2) or a preset from scratch (byte-level).

Data: JSONL lines {"text": ..., "label": ...} or a CSV file with ``text`` and ``label`` columns.
Labels are strings; their set comes from the training file, and a test label outside it is an error.
"""

from __future__ import annotations

import csv
import json
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from triform.config import get_encoder_preset
from triform.errors import ConfigError, DataError
from triform.models.encoder import Encoder, EncoderForSequenceClassification
from triform.tokenizers.byte import ByteTokenizer
from triform.tokenizers.wordpiece import EncodedBatch, WordPieceTokenizer
from triform.training.checkpoint import CHECKPOINT_DIR, save_checkpoint
from triform.training.optim import build_optimizer, lr_at
from triform.training.trainer import parse_duration, resolve_device, steps_for_budget


class ByteTextEncoder:
    """Byte-level inputs for encoders: ``[CLS] bytes [SEP]`` with <bos>/<eos> as [CLS]/[SEP]."""

    def __init__(self, tok: ByteTokenizer) -> None:
        self.tok = tok

    def batch(self, texts: list[str], *, max_length: int, truncate: bool = True, warn: bool = True) -> EncodedBatch:
        if any(not t for t in texts):
            raise DataError("empty text: every input needs at least one character.")
        rows = [list(t.encode("utf-8")) for t in texts]
        too_long = [i for i, r in enumerate(rows) if len(r) + 2 > max_length]
        if too_long and not truncate:
            raise DataError(f"text {too_long[0] + 1} is {len(rows[too_long[0]]) + 2} tokens, more than the model's {max_length}.")
        if too_long and warn:
            warnings.warn(f"{len(too_long)} text(s) longer than {max_length} tokens were truncated.", stacklevel=2)
        rows = [[self.tok.bos_id, *r[: max_length - 2], self.tok.eos_id] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return EncodedBatch(ids, mask, torch.zeros_like(ids))


def read_labelled(path: str) -> list[tuple[str, str]]:
    """(text, label) pairs from a JSONL or CSV file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path} does not exist.")
    rows: list[tuple[str, str]] = []
    try:
        if p.suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                    raise DataError(f"{path} needs a header with 'text' and 'label' columns.")
                rows = [(r["text"], str(r["label"])) for r in reader]
        else:
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    rows.append((item["text"], str(item["label"])))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{n} is not a JSON object with \"text\" and \"label\".") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text.") from None
    if not rows:
        raise DataError(f"{path} holds no examples.")
    empty = [i for i, (t, _) in enumerate(rows, start=1) if not t.strip()]
    if empty:
        raise DataError(f"{path}: example {empty[0]} has empty text.")
    return rows


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A classification fine-tuning run.

    Args:
        base: A triform encoder checkpoint, a Hugging Face encoder folder, or an encoder preset name
            (trained from scratch, byte-level).
        max_length: Longest input in tokens, [CLS]/[SEP] included.
        truncate: Cut longer texts (with a warning) instead of refusing them.
        batch_size: Examples per step.
        epochs: Passes over the training data (bounded by max_steps and time_budget).
        max_steps: Upper bound on steps.
        time_budget: Wall-clock budget such as 3m.
        lr: Peak learning rate (10% warm-up, cosine decay to a tenth).
        weight_decay: AdamW weight decay on matrices.
        dropout: Dropout in the encoder while fine-tuning.
        seed: Random seed.
        device: "auto", "cpu" or "cuda".
        progress: Show a progress bar.
    """

    base: str = "bert-base-tiny"
    max_length: int = 128
    truncate: bool = True
    batch_size: int = 32
    epochs: int = 3
    max_steps: int | None = None
    time_budget: str | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    dropout: float = 0.1
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 4 or self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("max_length (>= 4), batch_size and epochs must be positive.")
        parse_duration(self.time_budget)


@dataclass
class Classifier:
    """A fine-tuned classifier with its text encoder and label names; ``predict`` gives label ids."""

    model: EncoderForSequenceClassification
    text_encoder: Any
    labels: list[str]
    max_length: int

    @torch.inference_mode()
    def logits(self, texts: list[str], *, batch_size: int = 64) -> Tensor:
        self.model.eval()
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            b = self.text_encoder.batch(texts[i : i + batch_size], max_length=self.max_length, truncate=True, warn=False)
            out.append(self.model(b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), token_type_ids=b.token_type_ids.to(dev)).float().cpu())
        return torch.cat(out)

    def accuracy(self, rows: list[tuple[str, str]]) -> float:
        unknown = sorted({y for _, y in rows} - set(self.labels))
        if unknown:
            raise DataError(f"label {unknown[0]!r} does not occur in the training data (labels: {', '.join(self.labels)}).")
        pred = self.logits([t for t, _ in rows]).argmax(-1)
        gold = torch.tensor([self.labels.index(y) for _, y in rows])
        return float((pred == gold).float().mean())


def _base_model(base: str, n_labels: int, dropout: float) -> tuple[EncoderForSequenceClassification, Any, str]:
    """The classifier to fine-tune, its text encoder, and what the base was."""
    path = Path(base)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():  # a Hugging Face encoder folder
        from triform.interop.hf_encoders import load_hf_encoder

        encoder, cfg = load_hf_encoder(path, "none")
        model = EncoderForSequenceClassification(cfg.replace(dropout=dropout), n_labels)
        model.encoder.load_state_dict(encoder.state_dict(), strict=False)  # a pooler the base lacks starts fresh
        return model, WordPieceTokenizer(path), "hf"
    if path.exists():
        from triform.training.encoder_trainer import load_encoder_checkpoint

        pre, tok, _ = load_encoder_checkpoint(path)
        encoder: Encoder = pre.encoder  # type: ignore[assignment]
        model = EncoderForSequenceClassification(encoder.cfg.replace(dropout=dropout), n_labels)
        model.encoder.load_state_dict(encoder.state_dict(), strict=False)
        return model, (tok if isinstance(tok, WordPieceTokenizer) else ByteTextEncoder(tok)), "checkpoint"
    tok = ByteTokenizer()
    cfg = get_encoder_preset(base).replace(vocab_size=-(-tok.vocab_size // 8) * 8, pad_id=tok.pad_id, dropout=dropout)
    return EncoderForSequenceClassification(cfg, n_labels), ByteTextEncoder(tok), "scratch"


def finetune_classifier(
    cfg: FinetuneConfig, train_rows: list[tuple[str, str]], *, out_dir: Path | str | None = None,
) -> Classifier:
    """Fine-tune on (text, label) rows; saves ``out_dir/checkpoint`` when given."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    labels = sorted({y for _, y in train_rows})
    if len(labels) < 2:
        raise DataError("classification needs at least two labels in the training data.")
    model, text_encoder, _ = _base_model(cfg.base, len(labels), cfg.dropout)
    model.to(device)
    max_length = min(cfg.max_length, model.cfg.max_tokens)
    # Tokenize once (a too-long text is refused here unless truncation is allowed).
    enc = text_encoder.batch([t for t, _ in train_rows], max_length=max_length, truncate=cfg.truncate)
    y = torch.tensor([labels.index(lab) for _, lab in train_rows])
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    budget = parse_duration(cfg.time_budget)
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(total=total, disable=not cfg.progress, unit="step", dynamic_ncols=True, file=sys.stderr, desc="finetune")
    t0, step = time.perf_counter(), 0
    order: list[int] = []
    while step < total:
        if not order:
            order = list(range(len(train_rows)))
            rng.shuffle(order)
        idx = torch.tensor(order[: cfg.batch_size])
        order = order[cfg.batch_size :]
        for group in opt.param_groups:
            # 10% warm-up of the (possibly budget-fitted) step count, then cosine decay to a tenth
            group["lr"] = lr_at(step, lr=cfg.lr, min_lr=cfg.lr / 10, warmup=max(1, total // 10), total=total)
        model.train()
        width = int(enc.attention_mask[idx].sum(1).max())  # trim the batch's padding
        logits = model(enc.input_ids[idx, :width].to(device), attention_mask=enc.attention_mask[idx, :width].to(device),
                       token_type_ids=enc.token_type_ids[idx, :width].to(device))
        loss = loss_fn(logits, y[idx].to(device))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t0
        if budget is not None and step == 5:
            total = steps_for_budget(step, elapsed, budget, total)
            bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if budget is not None and elapsed > budget:
            break
    bar.close()
    clf = Classifier(model.eval(), text_encoder, labels, max_length)
    if out_dir is not None:
        meta = {"kind": "encoder", "head": "sequence", "num_labels": len(labels), "labels": labels, "max_length": max_length}
        tok = text_encoder.tok if isinstance(text_encoder, ByteTextEncoder) else text_encoder
        save_checkpoint(Path(out_dir) / CHECKPOINT_DIR, model, tok, extra=meta)
    return clf
