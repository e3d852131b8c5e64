"""Fine-tuning encoders for sequence classification: from a triform encoder checkpoint, a Hugging Face
encoder folder (WordPiece, e.g. all-MiniLM-L6-v2) or a preset from scratch (byte-level).

Data: JSONL lines {"text": ..., "label": ...} or a CSV file with ``text`` and ``label`` columns.
Labels are strings; their set comes from the training file, and a test label outside it is an error.
Token tagging and question answering (``finetune_tasks``) share ``FinetuneConfig`` and
``encoder_for_task``; all three train through the one loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from triform.config import get_encoder_preset
from triform.errors import ConfigError, DataError
from triform.interop import load_encoder
from triform.models.encoder import (
    EncoderForQuestionAnswering,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
)
from triform.objectives.finetune import Classification
from triform.tokenizers.base import Tokenizer
from triform.tokenizers.byte import ByteTokenizer
from triform.tokenizers.wordpiece import EncodedBatch, WordPieceTokenizer
from triform.training.distributed import print_main
from triform.training.args import TrainArgs, check_positive_int, with_shared_docs
from triform.training.loop import FitResult, fit


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


@with_shared_docs
@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainArgs):
    """A fine-tuning run: the shared training arguments (see ``TrainArgs``) and these. The step
    count is epochs over the training data, bounded by max_steps and time_budget; warm-up is 10%
    of it unless warmup_steps is given, then cosine decay to a tenth of lr.

    Args:
        base: A triform encoder checkpoint, a Hugging Face encoder folder, or an encoder preset name
            (trained from scratch, byte-level).
        max_length: Longest input in tokens, [CLS]/[SEP] included.
        truncate: Cut longer texts (with a warning) instead of refusing them.
        epochs: Passes over the training data (bounded by max_steps and time_budget).
        dropout: Dropout in the encoder while fine-tuning.
    """

    base: str = "bert-base-tiny"
    max_length: int = 128
    truncate: bool = True
    batch_size: int = 32
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 5e-5
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    beta2: float = 0.999
    dropout: float = 0.1
    eval_interval: int = 1_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("max_length", self.max_length, minimum=4)
        check_positive_int("epochs", self.epochs)
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}.")

    def bounded_by_data(self) -> bool:
        return True

    def steps_for(self, n: int) -> int:
        """Optimizer steps for ``n`` training examples: epochs of them, bounded by max_steps."""
        steps = -(-n // self.micro_batch_size) * self.epochs // self.micro_batches
        return max(1, steps if self.max_steps is None else min(self.max_steps, steps))


def encoder_for_task(base: str, task: str, n_labels: int, dropout: float) -> tuple[nn.Module, Tokenizer]:
    """The task model (``task``: "classify", "tag" or "qa") and its tokenizer: from a Hugging Face
    encoder folder (WordPiece), a triform encoder checkpoint, or a preset (bytes, from scratch).
    A pretrained base's encoder weights are copied in; the task head (and a pooler the base lacks)
    start fresh."""
    if Path(base).exists():
        encoder, tok = load_encoder(base)
        cfg, state = encoder.cfg.replace(dropout=dropout), encoder.state_dict()
    else:
        tok = ByteTokenizer()
        cfg = get_encoder_preset(base).replace(vocab_size=-(-tok.vocab_size // 8) * 8, pad_id=tok.pad_id, dropout=dropout)
        state = None
    model: nn.Module = {
        "classify": lambda: EncoderForSequenceClassification(cfg, n_labels),
        "tag": lambda: EncoderForTokenClassification(cfg, n_labels),
        "qa": lambda: EncoderForQuestionAnswering(cfg),
    }[task]()
    if state is not None:
        model.encoder.load_state_dict(state, strict=False)
    return model, tok


def finetune_fit(model: nn.Module, objective: Any, cfg: FinetuneConfig, n: int, tokenizer: Tokenizer, *,
                 out_dir: Path | str | None, meta: dict[str, Any], log: Callable[[str], None] | None = None) -> FitResult:
    """Run the one loop for a fine-tuning objective over ``n`` examples (epochs → steps)."""
    say = log or print_main
    return fit(model, objective, cfg.replace(max_steps=cfg.steps_for(n)), out_dir=out_dir, tokenizer=tokenizer,
               meta={**meta, "train": {k: v for k, v in cfg.__dict__.items()}}, title=f"{objective.name} fine-tuning", log=say)


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


def finetune_classifier(
    cfg: FinetuneConfig, train_rows: list[tuple[str, str]], *, out_dir: Path | str | None = None,
    log: Callable[[str], None] | None = None,
) -> Classifier:
    """Fine-tune on (text, label) rows; saves ``out_dir/checkpoint`` when given."""
    torch.manual_seed(cfg.seed)
    labels = sorted({y for _, y in train_rows})
    if len(labels) < 2:
        raise DataError("classification needs at least two labels in the training data.")
    model, tok = encoder_for_task(cfg.base, "classify", len(labels), cfg.dropout)
    text_encoder = tok if isinstance(tok, WordPieceTokenizer) else ByteTextEncoder(tok)  # type: ignore[arg-type]
    max_length = min(cfg.max_length, model.cfg.max_tokens)
    # Tokenize once (a too-long text is refused here unless truncation is allowed).
    enc = text_encoder.batch([t for t, _ in train_rows], max_length=max_length, truncate=cfg.truncate)
    y = torch.tensor([labels.index(lab) for _, lab in train_rows])
    objective = Classification(enc.input_ids, enc.attention_mask, enc.token_type_ids, y, batch_size=cfg.micro_batch_size)
    meta = {"labels": labels, "max_length": max_length}
    finetune_fit(model, objective, cfg, len(train_rows), tok, out_dir=out_dir, meta=meta, log=log)
    return Classifier(model.eval(), text_encoder, labels, max_length)
