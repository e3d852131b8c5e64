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

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from triform.data.readers import QAExample
from triform.errors import DataError
from triform.models.encoder import best_span
from triform.objectives.finetune import SpanExtraction, Tagging
from triform.objectives.masked_lm import IGNORE
from triform.tokenizers.wordpiece import WordPieceTokenizer
from triform.training.finetune import FinetuneConfig, encoder_for_task, finetune_fit


class Tagger:
    """A byte-level token tagger: ``fit`` on CoNLL sentences, ``predict`` tags, ``accuracy``."""

    def __init__(self, cfg: FinetuneConfig, tags: list[str]) -> None:
        self.cfg, self.tags = cfg, tags
        self.model, self.tok = encoder_for_task(cfg.base, "tag", len(tags), cfg.dropout)
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

    def fit(self, sentences: list[tuple[list[str], list[str]]], *, out_dir: Path | str | None = None,
            log: Callable[[str], None] | None = None) -> Tagger:
        """Fine-tune on (tokens, tags) sentences; saves ``out_dir/checkpoint`` when given."""
        torch.manual_seed(self.cfg.seed)
        objective = Tagging([self._encode(t, g) for t, g in sentences], pad_id=self.tok.pad_id,
                            batch_size=self.cfg.micro_batch_size)
        finetune_fit(self.model, objective, self.cfg, len(sentences), self.tok, out_dir=out_dir,
                     meta={"labels": self.tags}, log=log)
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
        self.model, self.tok = encoder_for_task(cfg.base, "qa", 2, cfg.dropout)
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

    def fit(self, examples: list[QAExample], *, out_dir: Path | str | None = None,
            log: Callable[[str], None] | None = None) -> SpanQA:
        """Fine-tune on SQuAD examples (those whose answer is cut off by max_length are skipped);
        saves ``out_dir/checkpoint`` when given."""
        torch.manual_seed(self.cfg.seed)
        enc = [(e[0], e[2], e[3]) for e in (self._encode(x) for x in examples) if e is not None]
        if not enc:
            raise DataError("no training answer fits within max_length; raise it.")
        objective = SpanExtraction(enc, pad_id=self.tok.pad_id, batch_size=self.cfg.micro_batch_size)
        finetune_fit(self.model, objective, self.cfg, len(enc), self.tok, out_dir=out_dir, meta={}, log=log)
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
