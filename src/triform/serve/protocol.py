"""OpenAI's request JSON, checked field by field, and the shapes of its errors and logprobs.

Each ``parse_*`` function takes the decoded JSON object of one request and returns a frozen
dataclass, or raises :class:`APIError` (HTTP 400) naming the field in ``param``: a wrong type, a
value out of range, a missing field. A JSON ``null`` means "use the default", as in OpenAI's API.
Fields the server does not know (or knows but does not honour, such as ``presence_penalty``) are
ignored and logged once per field name (per server: each passes its own ``seen`` set). Nothing here
touches the engine; ``app.py`` turns the parsed requests into engine calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from triform.inference.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob

logger = logging.getLogger("triform.serve")

ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "server_error",
}


class APIError(Exception):
    """An error to send as OpenAI does: HTTP ``status`` and ``{"error": {"message", "type", "param",
    "code"}}``, the type following from the status unless given."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's own field name
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` for an error that is not raised (middleware answers, exception handlers)."""
    return APIError(status, message, param=param, code=code).body()


# ------------------------------------------------------------------------------------ JSON body


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why it is not one (NaN and Infinity, which
    Python's parser would accept, are not JSON)."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).split(":")[0] if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise APIError(400, f"the request body is not valid JSON ({reason}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_kind(data)}.", code="invalid_json")
    return data


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _ignore_unknown(body: dict[str, Any], known: frozenset[str], endpoint: str, seen: set[str] | None) -> None:
    """Log each field outside ``known`` the first time ``seen`` (a server's own set) meets it."""
    for name in body:
        if name not in known and (seen is None or name not in seen):
            if seen is not None:
                seen.add(name)
            logger.warning("ignoring the request field %r (first seen on %s; not honoured by this server)",
                           name, endpoint)


def _type_error(name: str, want: str, value: Any) -> APIError:
    return APIError(400, f"{name} must be {want}, got {_kind(value)}.", param=name, code="invalid_type")


def _value_error(name: str, message: str) -> APIError:
    return APIError(400, f"{name} {message}", param=name, code="invalid_value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _type_error(name, "an integer", value)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    if not math.isfinite(value):
        raise _value_error(name, "must be a finite number.")
    return float(value)


def _boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "true or false", value)
    return value


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


# ----------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sampling:
    """The sampling fields completions and chat share. ``max_tokens`` None: the endpoint's default;
    ``logprobs``: alternatives per token, None for no log-probabilities at all."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int | None
    n: int
    seed: int | None
    stop: tuple[str, ...]
    logprobs: int | None = None

    def params(self, max_new_tokens: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        """The engine's ``SamplingParams`` for ``max_new_tokens`` new tokens at most."""
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_new_tokens=max_new_tokens,
            stop=self.stop + tuple(s for s in extra_stop if s not in self.stop), seed=self.seed,
            logprobs=self.logprobs,
        )


SAMPLING_FIELDS = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream", "stream_options"}
)


def _sampling(body: dict[str, Any], max_tokens_field: str = "max_tokens") -> Sampling:
    max_tokens = _integer(body, max_tokens_field, None)
    if max_tokens_field != "max_tokens" and max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None)
        max_tokens_field = "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise _value_error(max_tokens_field, f"must be at least 1, got {max_tokens}.")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise _value_error("temperature", f"must be >= 0, got {temperature:g}.")
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise _value_error("top_p", f"must be in (0, 1], got {top_p:g}.")
    top_k = _integer(body, "top_k", None)
    if top_k is not None and top_k in (0, -1):
        top_k = None  # 0 and -1 both mean "no top-k", as in other OpenAI-compatible servers
    if top_k is not None and top_k < 1:
        raise _value_error("top_k", f"must be a positive integer (or -1 for none), got {top_k}.")
    n = _integer(body, "n", 1)
    assert n is not None
    if n < 1:
        raise _value_error("n", f"must be at least 1, got {n}.")
    seed = _integer(body, "seed", None)
    return Sampling(max_tokens, temperature, top_p, top_k, n, seed, _stop(body))


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _type_error("stop", "a string or an array of strings", value)
    return tuple(dict.fromkeys(s for s in value if s))  # empty strings stop nothing; drop them


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _type_error("stream_options.include_usage", "true or false", usage)
    return stream, bool(usage)


def _top_count(body: dict[str, Any], name: str) -> int | None:
    k = _integer(body, name, None)
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise _value_error(name, f"must be between 0 and {MAX_LOGPROBS}, got {k}.")
    return k


# -------------------------------------------------------------------------------- completions


Prompt = str | list[int]


@dataclass(frozen=True)
class CompletionRequest:
    """``POST /v1/completions``: one or more prompts (texts or token-id lists)."""

    model: str | None
    prompts: list[Prompt]
    sampling: Sampling
    stream: bool
    include_usage: bool
    echo: bool


COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo"}


def _prompts(value: Any) -> list[Prompt]:
    want = "a string, an array of strings, an array of token ids or an array of token-id arrays"
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise (_type_error("prompt", want, value) if not isinstance(value, list) else
               _value_error("prompt", "must not be an empty array."))
    if all(isinstance(p, str) for p in value):
        return list(value)
    if all(_is_int(t) for t in value):
        return [list(value)]
    if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in value):
        return [list(p) for p in value]
    raise _type_error("prompt", want, value)


def parse_completion(body: dict[str, Any], seen: set[str] | None = None) -> CompletionRequest:
    """Check a completions request (see the module docstring)."""
    _ignore_unknown(body, COMPLETION_FIELDS, "/v1/completions", seen)
    model = _string(body, "model")
    if body.get("prompt") is None:
        raise APIError(400, "prompt is required.", param="prompt", code="missing_field")
    prompts = _prompts(body["prompt"])
    sampling = _sampling(body)
    logprobs = _top_count(body, "logprobs")
    echo = _boolean(body, "echo", False)
    if echo and logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (the server does not score prompt tokens).",
                       param="echo", code="unsupported")
    stream, usage = _stream(body)
    sampling = dataclasses.replace(sampling, logprobs=logprobs)
    return CompletionRequest(model, prompts, sampling, stream, usage, echo)


# ------------------------------------------------------------------------------------------ chat


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatRequest:
    """``POST /v1/chat/completions``: the conversation so far, as ``{"role", "content"}`` turns."""

    model: str | None
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool
    include_usage: bool
    logprobs: bool


CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


def _content(value: Any, param: str, role: str) -> str:
    if value is None and role == "assistant":
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: only text ones carry anything a text model reads
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{param}[{i}] must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                               "this model reads text only.", param=f"{param}[{i}]", code="invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise _type_error(param, "a string or an array of text parts", value)


def parse_messages(value: Any) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` with string content (``developer`` turns
    become ``system`` turns; text content parts are joined)."""
    if value is None:
        raise APIError(400, "messages is required.", param="messages", code="missing_field")
    if not isinstance(value, list):
        raise _type_error("messages", "an array of messages", value)
    if not value:
        raise _value_error("messages", "must hold at least one message.")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(where, "an object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"{where}.role must be one of system, developer, user or assistant, got {role!r}.",
                           param=f"{where}.role", code="invalid_value")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content", role)})
    return out


def parse_chat(body: dict[str, Any], seen: set[str] | None = None) -> ChatRequest:
    """Check a chat completions request (see the module docstring)."""
    _ignore_unknown(body, CHAT_FIELDS, "/v1/chat/completions", seen)
    model = _string(body, "model")
    messages = parse_messages(body.get("messages"))
    sampling = _sampling(body, "max_completion_tokens")
    logprobs = _boolean(body, "logprobs", False)
    top = _top_count(body, "top_logprobs")
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs", code="invalid_value")
    stream, usage = _stream(body)
    sampling = dataclasses.replace(sampling, logprobs=(top or 0) if logprobs else None)
    return ChatRequest(model, messages, sampling, stream, usage, logprobs)


# ------------------------------------------------------------------------------------ embeddings


@dataclass(frozen=True)
class EmbeddingRequest:
    """``POST /v1/embeddings``: texts to embed, and how to encode the vectors ("float" or "base64")."""

    model: str | None
    inputs: list[str]
    encoding_format: str


EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format"})


def parse_embedding(body: dict[str, Any], seen: set[str] | None = None) -> EmbeddingRequest:
    """Check an embeddings request: ``input`` is a string or a non-empty array of non-empty strings
    (token-id inputs are refused: the encoder reads text)."""
    _ignore_unknown(body, EMBEDDING_FIELDS, "/v1/embeddings", seen)
    model = _string(body, "model")
    value = body.get("input")
    if value is None:
        raise APIError(400, "input is required.", param="input", code="missing_field")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        if isinstance(value, list) and value and all(_is_int(t) or isinstance(t, list) for t in value):
            raise APIError(400, "input must be text: this server embeds strings, not token ids.", param="input",
                           code="invalid_type")
        raise _type_error("input", "a string or an array of strings", value)
    if not value:
        raise _value_error("input", "must not be an empty array.")
    if not all(value):
        raise _value_error("input", "must not hold empty strings.")
    fmt = _string(body, "encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _value_error("encoding_format", f"must be 'float' or 'base64', got {fmt!r}.")
    return EmbeddingRequest(model, list(value), fmt)


# ------------------------------------------------------------------------------ tokenize / detokenize


@dataclass(frozen=True)
class TokenizeRequest:
    """``POST /tokenize``: a ``prompt`` text, or ``messages`` to render with the chat template."""

    model: str | None
    prompt: str | None
    messages: list[dict[str, str]] | None
    add_generation_prompt: bool


def parse_tokenize(body: dict[str, Any], seen: set[str] | None = None) -> TokenizeRequest:
    """Check a tokenize request: exactly one of ``prompt`` (a string) and ``messages``."""
    _ignore_unknown(body, frozenset({"model", "prompt", "messages", "add_generation_prompt"}), "/tokenize", seen)
    model = _string(body, "model")
    prompt = _string(body, "prompt")
    has_messages = body.get("messages") is not None
    if (prompt is None) == (not has_messages):
        raise APIError(400, "give exactly one of prompt and messages.", param="prompt", code="missing_field")
    messages = parse_messages(body["messages"]) if has_messages else None
    return TokenizeRequest(model, prompt, messages, _boolean(body, "add_generation_prompt", True))


@dataclass(frozen=True)
class DetokenizeRequest:
    """``POST /detokenize``: token ids to turn back into text."""

    model: str | None
    tokens: list[int]


def parse_detokenize(body: dict[str, Any], seen: set[str] | None = None) -> DetokenizeRequest:
    """Check a detokenize request: ``tokens`` is an array of integers."""
    _ignore_unknown(body, frozenset({"model", "tokens"}), "/detokenize", seen)
    model = _string(body, "model")
    tokens = body.get("tokens")
    if tokens is None:
        raise APIError(400, "tokens is required.", param="tokens", code="missing_field")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise _type_error("tokens", "an array of integers", tokens)
    return DetokenizeRequest(model, list(tokens))


# ------------------------------------------------------------------------------------- logprobs


def token_text(token_bytes: Sequence[bytes], token: int) -> str:
    """A token as text (invalid UTF-8, such as part of a character, shown as U+FFFD)."""
    return token_bytes[token].decode("utf-8", errors="replace") if 0 <= token < len(token_bytes) else ""


def completion_logprobs(
    token_bytes: Sequence[bytes], lps: Sequence[TokenLogprob], offsets: Sequence[int],
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for tokens with these text offsets."""
    return {
        "tokens": [token_text(token_bytes, lp.token_id) for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{token_text(token_bytes, t): v for t, v in lp.top} for lp in lps],
        "text_offset": list(offsets),
    }


def chat_logprobs(token_bytes: Sequence[bytes], lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: one entry per token with its bytes and top alternatives."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes[token] if 0 <= token < len(token_bytes) else b""
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps],
        "refusal": None,
    }
