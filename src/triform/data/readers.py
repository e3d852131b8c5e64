"""Readers for the files users hand to commands: labelled texts (JSONL or CSV), CoNLL tags, SQuAD
questions, plain text lists and prompt files.

Every reader refuses what it cannot use with one sentence naming the file and, where there is one,
the line: a missing file, bytes that are not UTF-8, a value of the wrong type (a number where text is
expected), a missing field, or a file with nothing in it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triform.errors import DataError


def _read_bytes(path: str | Path, what: str = "") -> bytes:
    p = Path(path)
    label = f"{what} {path}".strip()
    if p.is_dir():
        raise DataError(f"{label} is a folder, not a file.")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{label} does not exist.") from None
    except OSError as exc:
        raise DataError(f"{label} could not be read ({exc.strerror or type(exc).__name__}).") from None


def read_lines(path: str | Path, what: str = "") -> list[str]:
    """The file's lines as text; a line that is not UTF-8 is an error naming its number."""
    out = []
    for n, raw in enumerate(_read_bytes(path, what).splitlines(), start=1):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}:{n} is not UTF-8 text.") from None
    if out and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]  # a byte-order mark
    return out


def _type_name(v: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _text_field(item: Any, key: str, where: str) -> str:
    if not isinstance(item, dict) or key not in item:
        raise DataError(f"{where} is not a JSON object with a \"{key}\" field.")
    value = item[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be text, got {_type_name(value)}.")
    return value


def _label_field(item: dict, where: str) -> str:
    if "label" not in item:
        raise DataError(f"{where} is not a JSON object with \"text\" and \"label\".")
    value = item["label"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: 'label' must be text or a whole number, got {_type_name(value)}.")
    return str(value)


def read_labelled(path: str | Path) -> list[tuple[str, str]]:
    """(text, label) pairs from JSONL lines {"text": ..., "label": ...} or a CSV file with ``text`` and
    ``label`` columns. Labels may be text or whole numbers; they are kept as strings."""
    rows: list[tuple[str, str]] = []
    if str(path).endswith(".csv"):
        lines = read_lines(path)
        reader = csv.DictReader(io.StringIO("\n".join(lines)))
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path} needs a header with 'text' and 'label' columns.")
        for r in reader:
            if r.get("text") is None or r.get("label") is None:
                raise DataError(f"{path}:{reader.line_num} has fewer columns than its header.")
            rows.append((r["text"], r["label"]))
    else:
        for n, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{where} is not a JSON object with \"text\" and \"label\".") from None
            rows.append((_text_field(item, "text", where), _label_field(item, where)))
    if not rows:
        raise DataError(f"{path} holds no examples.")
    empty = [i for i, (t, _) in enumerate(rows, start=1) if not t.strip()]
    if empty:
        raise DataError(f"{path}: example {empty[0]} has empty text.")
    return rows


def read_conll(path: str | Path) -> list[tuple[list[str], list[str]]]:
    """Sentences as (tokens, tags) from a CoNLL-style file (token first, tag last on each line, a
    blank line between sentences)."""
    sentences, tokens, tags = [], [], []
    for n, line in enumerate(read_lines(path) + [""], start=1):
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
    """One extractive question: the answer is ``context[start : start + len(answer)]``."""

    qid: str
    question: str
    context: str
    answer: str
    start: int  # character offset of the answer in the context


def read_squad(path: str | Path) -> list[QAExample]:
    """Examples from a SQuAD-style JSON file ({"data": [{"paragraphs": [{"context", "qas": [{"id",
    "question", "answers": [{"text", "answer_start"}]}]}]}]}); an answer that is not at its stated
    place, or a field of the wrong type, is an error naming the question."""
    text = "\n".join(read_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno} is not valid JSON ({exc.msg}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path} is not SQuAD-style JSON (no \"data\" list at the top).")
    out = []
    for a, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: article {a + 1} has no \"paragraphs\" list.")
        for p, para in enumerate(paragraphs):
            where = f"{path}: article {a + 1}, paragraph {p + 1}"
            ctx = _text_field(para, "context", where)
            qas = para.get("qas")
            if not isinstance(qas, list):
                raise DataError(f"{where} has no \"qas\" list.")
            for qa in qas:
                qid = str(qa.get("id", len(out))) if isinstance(qa, dict) else str(len(out))
                qwhere = f"{path}: question {qid!r}"
                question = _text_field(qa, "question", qwhere)
                answers = qa.get("answers")
                if not isinstance(answers, list) or not answers:
                    raise DataError(f"{qwhere} has no answers.")
                answer = _text_field(answers[0], "text", qwhere)
                start = answers[0].get("answer_start")
                if isinstance(start, bool) or not isinstance(start, int):
                    raise DataError(f"{qwhere}: 'answer_start' must be a whole number, got {_type_name(start)}.")
                if not answer or start < 0 or ctx[start : start + len(answer)] != answer:
                    raise DataError(
                        f"{qwhere} has an answer span outside its context (answer_start {start} does not point at {answer!r})."
                    )
                out.append(QAExample(qid, question, ctx, answer, start))
    if not out:
        raise DataError(f"{path} holds no questions.")
    return out


def read_texts(path: str | Path) -> list[str]:
    """Texts from a file: one per line, or JSONL objects with a "text" field (for ``.jsonl``)."""
    texts = []
    for n, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        if str(path).endswith(".jsonl"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n} is not a JSON object with a \"text\" field.") from None
            texts.append(_text_field(item, "text", f"{path}:{n}"))
        else:
            texts.append(line)
    if not texts:
        raise DataError(f"{path} holds no texts.")
    return texts


def read_prompts(path: str | Path) -> list[bytes]:
    """One prompt per non-blank line, as the bytes written (any encoding passes through to a byte
    tokenizer); ``\\n`` inside a line stands for a newline."""
    lines = [line for line in _read_bytes(path, "prompts file").split(b"\n") if line.strip()]
    if not lines:
        raise DataError(f"prompts file {path} has no prompts (one per line).")
    return [line.rstrip(b"\r").replace(b"\\n", b"\n") for line in lines]
