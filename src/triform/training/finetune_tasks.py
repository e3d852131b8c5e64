"""Token tagging (CoNLL files) and extractive question answering (SQuAD JSON) for encoders, byte-level
(triform checkpoints, presets) or WordPiece (Hugging Face encoder folders).

Tagging: one ``token tag`` pair per line, a blank line between sentences. The tag is predicted at
each word's first byte (words joined by spaces) or first word piece; other positions are not scored.
QA: SQuAD's {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers":
[{"text", "answer_start"}]}]}]}]}; inputs are ``[CLS] question [SEP] context [SEP]``, and the answer
is the best span of context tokens (start <= end, at most ``max_answer_len`` long), mapped back to
the context's characters.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from triform.errors import DataError
from triform.models.encoder import EncoderForQuestionAnswering, EncoderForTokenClassification, best_span
from triform.objectives.masked_lm import IGNORE
from triform.tokenizers.byte import ByteTokenizer
from triform.tokenizers.wordpiece import WordPieceTokenizer
from triform.training.finetune import FinetuneConfig
from triform.training.optim import build_optimizer, lr_at
from triform.training.trainer import resolve_device


def read_conll(path: str) -> list[tuple[list[str], list[str]]]:
    """Sentences as (tokens, tags) from a CoNLL-style file (token first, tag last on each line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path} does not exist.")
    sentences, tokens, tags = [], [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines() + [""], start=1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        parts = line.split()
        if len(parts) < 2:
            raise DataError(f"{path}:{n} needs a token and a tag separated by whitespace.")
        tokens.append(parts[0])
        tags.append(parts[-1])
    if not sentences:
        raise DataError(f"{path} holds no sentences.")
    return sentences


@dataclass
class QAExample:
    qid: str
    question: str
    context: str
    answer: str
    start: int  # character offset of the answer in the context


def read_squad(path: str) -> list[QAExample]:
    """Examples from a SQuAD-style JSON file; an answer that is not at its stated place is an error."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path} does not exist.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))["data"]
        out = []
        for article in data:
            for para in article["paragraphs"]:
                ctx = para["context"]
                for qa in para["qas"]:
                    ans = qa["answers"][0]
                    start, text = int(ans["answer_start"]), ans["text"]
                    if not text or start < 0 or ctx[start : start + len(text)] != text:
                        raise DataError(
                            f"{path}: question {qa.get('id', '?')!r} has an answer span outside its context "
                            f"(answer_start {start} does not point at {text!r})."
                        )
                    out.append(QAExample(str(qa.get("id", len(out))), qa["question"], ctx, text, start))
    except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is not SQuAD-style JSON ({type(exc).__name__}: {exc}).") from None
    if not out:
        raise DataError(f"{path} holds no questions.")
    return out


def _byte_model(base: str, kind: str, n_labels: int, dropout: float) -> tuple[nn.Module, ByteTokenizer | WordPieceTokenizer]:
    """The task model and its tokenizer: from a Hugging Face encoder folder (WordPiece), a triform
    encoder checkpoint (bytes) or a preset (bytes, from scratch)."""
    path = Path(base)
    tok: ByteTokenizer | WordPieceTokenizer = ByteTokenizer()
    if (path / "tokenizer.json").is_file() and (path / "config.json").is_file():
        from triform.interop.hf_encoders import load_hf_encoder

        encoder, hf_cfg = load_hf_encoder(path, "none")
        cfg, state, tok = hf_cfg.replace(dropout=dropout), encoder.state_dict(), WordPieceTokenizer(path)
    elif path.exists():
        from triform.training.encoder_trainer import load_encoder_checkpoint

        pre, tok, _ = load_encoder_checkpoint(path)
        cfg = pre.encoder.cfg.replace(dropout=dropout)
        state = pre.encoder.state_dict()
    else:
        from triform.config import get_encoder_preset

        cfg = get_encoder_preset(base).replace(vocab_size=-(-tok.vocab_size // 8) * 8, pad_id=tok.pad_id, dropout=dropout)
        state = None
    model = EncoderForTokenClassification(cfg, n_labels) if kind == "tag" else EncoderForQuestionAnswering(cfg)
    if state is not None:
        model.encoder.load_state_dict(state, strict=False)
    return model, tok


def _train_loop(model: nn.Module, cfg: FinetuneConfig, n: int, batch_loss) -> None:
    device = next(model.parameters()).device
    steps = -(-n // cfg.batch_size) * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    bar = tqdm(total=steps, disable=not cfg.progress, unit="step", file=sys.stderr, desc="finetune")
    for step in range(steps):
        if not order:
            order = list(range(n))
            rng.shuffle(order)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=cfg.lr, min_lr=cfg.lr / 10, warmup=max(1, steps // 10), total=steps)
        model.train()
        loss = batch_loss(idx, device)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


class Tagger:
    """A byte-level token tagger: ``fit`` on CoNLL sentences, ``predict`` tags, ``accuracy``."""

    def __init__(self, cfg: FinetuneConfig, tags: list[str]) -> None:
        self.cfg, self.tags = cfg, tags
        self.model, self.tok = _byte_model(cfg.base, "tag", len(tags), cfg.dropout)
        self.model.to(resolve_device(cfg.device))
        self.max_length = min(cfg.max_length, self.model.cfg.max_tokens)

    def _encode(self, tokens: list[str], tags: list[str] | None) -> tuple[list[int], list[int]]:
        if isinstance(self.tok, WordPieceTokenizer):  # the tag goes on each word's first piece
            enc = self.tok._tok.encode(tokens, is_pretokenized=True)
            ids, labels, previous = list(enc.ids), [IGNORE] * len(enc.ids), None
            for i, w in enumerate(enc.word_ids):
                if w is not None and w != previous and tags is not None:
                    labels[i] = self.tags.index(tags[w])
                previous = w
            if len(ids) > self.max_length:
                if not self.cfg.truncate:
                    raise DataError(f"a sentence is {len(ids)} tokens, more than the model's {self.max_length}.")
                ids, labels = ids[: self.max_length - 1] + [self.tok.sep_id], labels[: self.max_length - 1] + [IGNORE]
            return ids, labels
        ids, labels = [self.tok.bos_id], [IGNORE]
        for i, t in enumerate(tokens):
            piece = list((" " if i else "").encode() + t.encode("utf-8"))
            first = len(ids) + (1 if i else 0)  # the token's first byte (after its space)
            ids += piece
            labels += [IGNORE] * len(piece)
            if tags is not None:
                labels[first] = self.tags.index(tags[i])
        ids.append(self.tok.eos_id)
        labels.append(IGNORE)
        if len(ids) > self.max_length:
            if not self.cfg.truncate:
                raise DataError(f"a sentence is {len(ids)} bytes, more than the model's {self.max_length}.")
            ids, labels = ids[: self.max_length - 1] + [self.tok.eos_id], labels[: self.max_length - 1] + [IGNORE]
        return ids, labels

    def fit(self, sentences: list[tuple[list[str], list[str]]]) -> Tagger:
        enc = [self._encode(t, g) for t, g in sentences]

        def batch_loss(idx: list[int], device: torch.device) -> Tensor:
            ids = _pad([enc[i][0] for i in idx], self.tok.pad_id).to(device)
            labels = _pad([enc[i][1] for i in idx], IGNORE).to(device)
            mask = _pad([[1] * len(enc[i][0]) for i in idx], 0).to(device)
            logits = self.model(ids, attention_mask=mask)
            return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

        _train_loop(self.model, self.cfg, len(enc), batch_loss)
        return self

    @torch.inference_mode()
    def accuracy(self, sentences: list[tuple[list[str], list[str]]]) -> float:
        unknown = sorted({t for _, g in sentences for t in g} - set(self.tags))
        if unknown:
            raise DataError(f"tag {unknown[0]!r} does not occur in the training data.")
        self.model.eval()
        dev = next(self.model.parameters()).device
        right = total = 0
        for tokens, tags in sentences:
            ids, labels = self._encode(tokens, tags)
            x = torch.tensor([ids], device=dev)
            pred = self.model(x)[0].argmax(-1).cpu()
            gold = torch.tensor(labels)
            scored = gold != IGNORE
            right += int((pred[scored] == gold[scored]).sum())
            total += int(scored.sum())
        return right / max(total, 1)


def _normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, words."""
    text = re.sub(r"\b(a|an|the)\b", " ", re.sub(r"[^\w\s]", " ", text.lower()))
    return text.split()


def span_f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred), _normalize(gold)
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return float(p == g)
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


class SpanQA:
    """Byte-level extractive QA: ``fit`` on SQuAD examples, ``answer`` questions, ``evaluate`` EM/F1."""

    def __init__(self, cfg: FinetuneConfig, *, max_answer_len: int = 64) -> None:
        self.cfg, self.max_answer_len = cfg, max_answer_len
        self.model, self.tok = _byte_model(cfg.base, "qa", 2, cfg.dropout)
        self.model.to(resolve_device(cfg.device))
        self.max_length = min(cfg.max_length, self.model.cfg.max_tokens)

    def _encode_wordpiece(self, ex: QAExample) -> tuple[list[int], list[int], int, int, list[tuple[int, int]]] | None:
        """(ids, context token positions, answer start, answer end, char offsets); None if cut off."""
        tok = self.tok._tok  # type: ignore[union-attr]
        tok.enable_truncation(max_length=self.max_length, strategy="only_second")
        try:
            enc = tok.encode(ex.question, ex.context)
        finally:
            tok.no_truncation()
        ctx = [i for i, sid in enumerate(enc.sequence_ids) if sid == 1]
        if not ctx:
            raise DataError(f"question {ex.qid!r} leaves no room for its context within {self.max_length} tokens.")
        a, b = ex.start, ex.start + len(ex.answer)
        inside = [i for i in ctx if enc.offsets[i][0] < b and enc.offsets[i][1] > a]
        if not inside:
            return None
        return list(enc.ids), ctx, inside[0], inside[-1], list(enc.offsets)

    def _encode(self, ex: QAExample) -> tuple[list[int], int, int, int] | None:
        """(ids, context offset, answer start, answer end) in token positions; None if the answer was cut off."""
        if isinstance(self.tok, WordPieceTokenizer):
            wp = self._encode_wordpiece(ex)
            return None if wp is None else (wp[0], wp[1][0], wp[2], wp[3])
        q = list(ex.question.encode("utf-8"))
        c = list(ex.context.encode("utf-8"))
        offset = 1 + len(q) + 1
        room = self.max_length - offset - 1
        if room < 1:
            raise DataError(f"question {ex.qid!r} leaves no room for its context within {self.max_length} tokens.")
        start = offset + len(ex.context[: ex.start].encode("utf-8"))
        end = start + len(ex.answer.encode("utf-8")) - 1
        ids = [self.tok.bos_id, *q, self.tok.eos_id, *c[:room], self.tok.eos_id]
        if end >= offset + room:
            return None
        return ids, offset, start, end

    def fit(self, examples: list[QAExample]) -> SpanQA:
        enc = [e for e in (self._encode(x) for x in examples) if e is not None]
        if not enc:
            raise DataError("no training answer fits within max_length; raise it.")

        def batch_loss(idx: list[int], device: torch.device) -> Tensor:
            ids = _pad([enc[i][0] for i in idx], self.tok.pad_id).to(device)
            mask = _pad([[1] * len(enc[i][0]) for i in idx], 0).to(device)
            start, end = self.model(ids, attention_mask=mask)
            ys = torch.tensor([enc[i][2] for i in idx], device=device)
            ye = torch.tensor([enc[i][3] for i in idx], device=device)
            return (nn.functional.cross_entropy(start, ys) + nn.functional.cross_entropy(end, ye)) / 2

        _train_loop(self.model, self.cfg, len(enc), batch_loss)
        return self

    @torch.inference_mode()
    def answer(self, question: str, context: str) -> str:
        self.model.eval()
        if isinstance(self.tok, WordPieceTokenizer):
            wp = self._encode_wordpiece(QAExample("", question, context, context[:1] or " ", 0))
            if wp is None:
                return ""
            ids, ctx, _, _, offsets = wp
            x = torch.tensor([ids], device=next(self.model.parameters()).device)
            start, end = self.model(x)
            allowed = torch.zeros(1, len(ids), dtype=torch.bool)
            allowed[0, ctx] = True
            s, e, _ = best_span(start.cpu(), end.cpu(), allowed, max_answer_len=self.max_answer_len)[0]
            return context[offsets[s][0] : offsets[e][1]] if s >= 0 else ""
        ids, offset, *_ = self._encode(QAExample("", question, context, context[:1] or " ", 0)) or (None, 0)
        if ids is None:
            return ""
        x = torch.tensor([ids], device=next(self.model.parameters()).device)
        start, end = self.model(x)
        allowed = torch.zeros_like(x, dtype=torch.bool)
        allowed[0, offset : len(ids) - 1] = True
        s, e, _ = best_span(start.cpu(), end.cpu(), allowed.cpu(), max_answer_len=self.max_answer_len)[0]
        return bytes(ids[s : e + 1]).decode("utf-8", errors="replace") if s >= 0 else ""

    def evaluate(self, examples: list[QAExample]) -> dict[str, float]:
        preds = [self.answer(x.question, x.context) for x in examples]
        em = sum(_normalize(p) == _normalize(x.answer) for p, x in zip(preds, examples)) / len(examples)
        f1 = sum(span_f1(p, x.answer) for p, x in zip(preds, examples)) / len(examples)
        return {"exact_match": em, "f1": f1}
