"""The OpenAI-compatible HTTP app: routes that translate OpenAI's JSON to engine calls and back.

    app = build_app(AsyncEngine(model, tokenizer, EngineConfig()), tokenizer, model_name="tiny",
                    settings=ServeSettings(api_key="secret"))
    uvicorn.run(app)          # or triform.serve.runner.serve_forever, which drains on SIGTERM

Routes (see ``build_app``): ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/embeddings`` (an encoder's app), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /tokenize``, ``POST /detokenize``, ``GET /health``, ``GET /metrics`` and the playground page
at ``GET /``. Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``, unknown routes
included. The API key, when set, guards ``/v1/*``, ``/tokenize`` and ``/detokenize``; ``/health``,
``/metrics`` (numbers only, no request content) and the page stay open, and the page sends the key
its user types with every API call.

A request becomes one engine request per prompt, each with the request's ``n`` completions; their
outputs are merged as they come. A streaming response is a ``text/event-stream`` of
``data: {chunk}`` lines ending with ``data: [DONE]``; a client that goes away cancels the response,
which closes its engine streams, so the engine aborts the requests and frees their KV blocks (the
same happens to a non-streaming request whose client disconnects). The app's lifespan starts the
engine and, at shutdown, drains it: no new requests (503), running ones get
``ServeSettings.grace_period`` seconds, and the rest end with a 503 error (an error event when
streaming).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triform.errors import ConfigError, GenerationError, TriformError
from triform.inference.async_engine import AsyncEngine, EngineDead, EngineOverloaded, EngineStopped, RequestStream
from triform.inference.chat import render_chat
from triform.inference.core import EngineStats, RequestOutput
from triform.inference.sampling import SamplingParams, TokenLogprob
from triform.inference.scheduler import blocks_held
from triform.serve.metrics import ServerMetrics
from triform.serve.protocol import (
    APIError, Sampling, chat_logprobs, completion_logprobs, error_body, parse_chat, parse_completion,
    parse_detokenize, parse_embedding, parse_json, parse_tokenize,
)

logger = logging.getLogger("triform.serve")

STATIC = Path(__file__).parent / "static"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings"})
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
UNBOUNDED_MAX_TOKENS = 4096  # chat's default when the model has no fixed context (sliding window)


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """How the HTTP layer behaves (the engine's own settings are ``EngineConfig`` and ``max_waiting``).

    Args:
        api_key: when set, ``/v1/*``, ``/tokenize`` and ``/detokenize`` need ``Authorization: Bearer KEY``.
        max_body_bytes: largest request body; a longer one is refused with 413 before it is parsed.
        grace_period: seconds running requests get to finish once shutdown begins.
        completion_max_tokens: ``max_tokens`` of a completion that gives none (OpenAI's 16); chat's
            default is the room left in the context.
    """

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    grace_period: float = 30.0
    completion_max_tokens: int = 16

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("api_key must be a non-empty string or None.")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}.")
        g = self.grace_period
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0:
            raise ConfigError(f"grace_period must be a non-negative number of seconds, got {self.grace_period!r}.")
        m = self.completion_max_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"completion_max_tokens must be a positive integer, got {m!r}.")


def _utf8(text: str) -> bytes:
    """A JSON string's UTF-8 bytes (lone surrogates, which JSON can carry, become U+FFFD's "?")."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace")


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


class _ClientGone(Exception):
    """The client disconnected before a non-streaming response was ready."""


def _engine_error(exc: Exception) -> APIError:
    """The HTTP error for an exception the engine raised while admitting or running a request."""
    if isinstance(exc, EngineOverloaded):
        return APIError(429, f"the server is busy: {exc}", code="rate_limit_exceeded")
    if isinstance(exc, EngineDead):
        return APIError(500, "the engine has failed; the server cannot generate any more.", code="engine_dead")
    if isinstance(exc, EngineStopped):
        return APIError(503, "the server is shutting down and accepts no new requests.", code="shutting_down")
    if isinstance(exc, GenerationError):
        return APIError(400, str(exc), code="invalid_request")
    raise exc


# ---------------------------------------------------------------------------------- choices / jobs


@dataclass
class _Choice:
    """What one choice (completion ``j`` of prompt ``i``) has produced so far."""

    index: int
    prefix: str = ""  # the echoed prompt
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    data: bytearray = field(default_factory=bytearray)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class _Job:
    """One HTTP generation request: its prompts, its choices, and the chunks and final body they make.
    ``take`` folds an engine output into its choice and returns the stream chunks it makes."""

    object_name = ""
    chunk_name = ""

    def __init__(self, rid: str, model: str, prompt_lengths: list[int], n: int, token_bytes: Sequence[bytes],
                 include_usage: bool) -> None:
        self.id, self.model, self.created = rid, model, int(time.time())
        self.prompt_lengths, self.n, self.token_bytes = prompt_lengths, n, token_bytes
        self.include_usage = include_usage
        self.choices = {i * n + j: _Choice(i * n + j) for i in range(len(prompt_lengths)) for j in range(n)}

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": self.chunk_name, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_lengths)
        completion = sum(c.completion_tokens for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.chunk([]), "usage": self.usage()}

    def opening(self) -> list[dict[str, Any]]:
        """Chunks sent before any output."""
        return []

    def fold(self, prompt: int, out: RequestOutput) -> tuple[_Choice, list[TokenLogprob], list[int]]:
        """Add ``out`` to its choice; the new logprob entries and their text offsets."""
        if out.finish_reason == "abort":
            raise APIError(503, "the server shut down before the request finished.", code="shutting_down")
        c = self.choices[prompt * self.n + out.index]
        c.pieces.append(out.text)
        c.completion_tokens = out.completion_tokens
        offsets: list[int] = []
        lps = list(out.logprobs or ())
        for lp in lps:
            offsets.append(len(c.prefix) + len(c.data.decode("utf-8", errors="ignore")))
            c.data += self.token_bytes[lp.token_id] if 0 <= lp.token_id < len(self.token_bytes) else b""
        c.logprobs += lps
        c.offsets += offsets
        if out.finished:
            c.finish_reason = FINISH_REASONS.get(out.finish_reason or "", out.finish_reason)
        return c, lps, offsets

    def take(self, prompt: int, out: RequestOutput) -> list[dict[str, Any]]:
        raise NotImplementedError

    def response(self) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionJob(_Job):
    object_name = chunk_name = "text_completion"

    def __init__(self, *args: Any, logprobs: bool, echo: list[str] | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.want_logprobs = logprobs
        if echo is not None:
            for index, c in self.choices.items():
                c.prefix = echo[index // self.n]

    def opening(self) -> list[dict[str, Any]]:
        return [self.chunk([{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}])
                for c in self.choices.values() if c.prefix]

    def take(self, prompt: int, out: RequestOutput) -> list[dict[str, Any]]:
        c, lps, offsets = self.fold(prompt, out)
        if not (out.text or lps or out.finished):
            return []
        logprobs = completion_logprobs(self.token_bytes, lps, offsets) if self.want_logprobs else None
        finish = c.finish_reason if out.finished else None
        return [self.chunk([{"index": c.index, "text": out.text, "logprobs": logprobs, "finish_reason": finish}])]

    def response(self) -> dict[str, Any]:
        choices = [{
            "index": c.index, "text": c.prefix + c.text, "finish_reason": c.finish_reason,
            "logprobs": completion_logprobs(self.token_bytes, c.logprobs, c.offsets) if self.want_logprobs else None,
        } for c in sorted(self.choices.values(), key=lambda c: c.index)]
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(), "system_fingerprint": None}


class _ChatJob(_Job):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, *args: Any, logprobs: bool, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.want_logprobs = logprobs

    def opening(self) -> list[dict[str, Any]]:  # the first chunk of every choice carries the role
        return [self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for c in self.choices.values()]

    def take(self, prompt: int, out: RequestOutput) -> list[dict[str, Any]]:
        c, lps, _ = self.fold(prompt, out)
        chunks = []
        if out.text or lps:
            logprobs = chat_logprobs(self.token_bytes, lps) if self.want_logprobs else None
            chunks.append(self.chunk([{"index": c.index, "delta": {"content": out.text}, "logprobs": logprobs,
                                       "finish_reason": None}]))
        if out.finished:
            chunks.append(self.chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                       "finish_reason": c.finish_reason}]))
        return chunks

    def response(self) -> dict[str, Any]:
        choices = [{
            "index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": chat_logprobs(self.token_bytes, c.logprobs) if self.want_logprobs else None,
            "finish_reason": c.finish_reason,
        } for c in sorted(self.choices.values(), key=lambda c: c.index)]
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(), "system_fingerprint": None}


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that always closes its generator and then runs
    ``on_close``, however the response ends (finished, cancelled by a client disconnect, a failed
    send, or before the generator ever ran)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
            if self.on_close is not None:
                await self.on_close()


# ---------------------------------------------------------------------------------------- state


class ServerState:
    """What the routes share: the engine (or the sentence encoder of an embedding server), the
    tokenizer, the served model's name, the settings, the metrics, and whether the server drains."""

    def __init__(self, engine: AsyncEngine | None, tokenizer: Any, *, model_name: str, settings: ServeSettings,
                 encoder: Any = None) -> None:
        if (engine is None) == (encoder is None):
            raise ConfigError("serve either a decoder (an AsyncEngine) or an encoder (a SentenceEncoder), exactly one.")
        self.engine, self.tokenizer, self.encoder = engine, tokenizer, encoder
        self.model_name, self.settings = model_name, settings
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self._drain_task: asyncio.Future[None] | None = None
        self._embed_lock: asyncio.Lock | None = None
        self._embedding = self._embed_waiting = self._embedded_tokens = 0
        self.token_bytes: list[bytes] = tokenizer.token_bytes() if engine is not None else []
        self.unknown_fields: set[str] = set()  # request fields already logged as ignored
        self.metrics = ServerMetrics(self.stats)

    # ------------------------------------------------------------------------------- lifecycle

    def stats(self) -> EngineStats:
        """The engine's latest stats, or an embedding server's own counts."""
        if self.engine is not None:
            return self.engine.stats()
        return EngineStats(running=self._embedding, waiting=self._embed_waiting, prompt_tokens=self._embedded_tokens)

    async def start(self) -> None:
        """Remember the running event loop and start the engine on it (the lifespan's startup)."""
        self.loop = asyncio.get_running_loop()
        if self.engine is not None and not self.engine.is_running:
            await self.engine.start()

    def request_drain(self) -> None:
        """Begin draining from any thread (a signal handler included): stop admitting, give running
        requests the grace period, then abort the rest."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> asyncio.Future[None]:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        return self._drain_task

    async def _drain(self) -> None:
        self.draining = True  # with the engine's shutdown order below, before anything else runs
        if self.engine is not None:
            await self.engine.shutdown(self.settings.grace_period)

    async def drain(self) -> None:
        """Drain (see ``request_drain``) and wait until the engine has stopped."""
        await asyncio.shield(self._begin_drain())

    # ----------------------------------------------------------------------------- validation

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` is absent or the served model's name."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}.",
                           param="model", code="model_not_found")

    def need_engine(self, route: str) -> AsyncEngine:
        """The engine, or 404 on an embedding server and 503 while draining."""
        if self.engine is None:
            raise APIError(404, f"{self.model_name} is an encoder: it serves /v1/embeddings, not {route}.",
                           param="model", code="model_not_supported")
        if self.draining:
            raise _engine_error(EngineStopped(""))
        return self.engine

    def encode(self, text: str) -> list[int]:
        """A decoder's token ids for a request's text (as the offline engine encodes a string)."""
        return self.tokenizer.encode(_utf8(text))

    def check_prompt(self, engine: AsyncEngine, ids: list[int], param: str) -> None:
        """400 for an empty prompt, ids outside the vocabulary, or a prompt that fills the context."""
        limits = engine.core.limits
        if not ids:
            raise APIError(400, f"{param} is empty; give at least one token.", param=param, code="invalid_value")
        if any(not 0 <= t < limits.vocab for t in ids):
            raise APIError(400, f"{param} holds token ids outside the vocabulary [0, {limits.vocab}).",
                           param=param, code="invalid_value")
        if limits.max_len is not None and len(ids) >= limits.max_len:
            raise APIError(
                400, f"{param} is {len(ids)} tokens, but the model's context is {limits.max_len} tokens "
                "(room is needed for at least one new token).", param=param, code="context_length_exceeded",
            )

    def check_n(self, engine: AsyncEngine, sampling: Sampling) -> None:
        """400 for more completions per prompt than the engine runs at once."""
        if sampling.n > engine.core.limits.max_num_seqs:
            most = engine.core.limits.max_num_seqs
            raise APIError(400, f"n must be at most {most} on this server, got {sampling.n}.", param="n",
                           code="invalid_value")

    def room(self, engine: AsyncEngine, prompt_len: int) -> int:
        """The most new tokens a prompt of ``prompt_len`` tokens can get: the rest of the context,
        and no more than the KV pool holds for one sequence."""
        limits = engine.core.limits
        room = limits.max_len - prompt_len if limits.max_len is not None else UNBOUNDED_MAX_TOKENS
        cfg = limits.scheduler

        def fits(m: int) -> bool:
            return blocks_held(cfg, limits.window, prompt_len + m, cfg.prefill_chunk) <= cfg.num_blocks

        if fits(room):
            return room
        lo, hi = 0, room  # the largest m that fits, by bisection (blocks_held grows with m)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return max(1, lo)

    # -------------------------------------------------------------------------------- running

    async def admit(
        self, engine: AsyncEngine, rid: str, prompts: list[list[int]], params: list[SamplingParams],
    ) -> list[RequestStream]:
        """One engine request per prompt; if any is refused, the ones admitted are aborted."""
        streams: list[RequestStream] = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                streams.append(engine.generate(ids, p, request_id=f"{rid}-{i}"))
        except Exception as exc:
            await self.close(streams)
            raise _engine_error(exc) from None
        return streams

    @staticmethod
    async def close(streams: list[RequestStream]) -> None:
        """Abort whatever of ``streams`` is unfinished and wait until the engine has freed it. The
        aborts are tasks of their own, so they all go out even if this wait is cancelled."""
        if streams:
            await asyncio.shield(asyncio.gather(*(s.aclose() for s in streams)))

    async def merged(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from every stream as the outputs come; latencies go to the metrics."""
        trackers = [self.metrics.tracker() for _ in streams]
        if len(streams) == 1:
            async for out in streams[0]:
                trackers[0].observe(out)
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
                queue.put_nowait((i, exc))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            left = len(streams)
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    trackers[i].observe(item)
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def run_job(self, request: Request, job: _Job, streams: list[RequestStream]) -> dict[str, Any]:
        """Run a non-streaming job to its end; a client that disconnects first aborts it."""

        async def consume() -> None:
            async with contextlib.aclosing(self.merged(streams)) as outs:
                async for i, out in outs:
                    job.take(i, out)

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                raise _ClientGone
            try:
                work.result()
            except (EngineStopped, GenerationError) as exc:
                raise _engine_error(exc) from None
            return job.response()
        finally:
            gone.cancel()
            work.cancel()
            await self.close(streams)

    async def events(self, job: _Job, streams: list[RequestStream]) -> AsyncIterator[bytes]:
        """The server-sent events of a streaming job. Errors after the response has started go out
        as an error event in OpenAI's shape, then ``[DONE]``."""
        status = 200
        try:
            for chunk in job.opening():
                yield _sse(chunk)
            try:
                async with contextlib.aclosing(self.merged(streams)) as outs:
                    async for i, out in outs:
                        for chunk in job.take(i, out):
                            yield _sse(chunk)
                if job.include_usage:
                    yield _sse(job.usage_chunk())
            except (EngineStopped, GenerationError) as exc:
                raise _engine_error(exc) from None
        except APIError as exc:
            status = exc.status
            yield _sse(exc.body())
        except (asyncio.CancelledError, GeneratorExit):
            status = 499
            raise
        except Exception:
            status = 500
            logger.exception("a streaming response failed")
            yield _sse(error_body(500, "the server failed while streaming this response."))
        finally:
            self.metrics.count(status)
            await self.close(streams)
        yield b"data: [DONE]\n\n"

    async def respond(self, request: Request, job: _Job, streams: list[RequestStream], stream: bool) -> Response:
        """The job's event stream, or its JSON body once it has finished."""
        if stream:
            return EventStream(self.events(job, streams), on_close=lambda: self.close(streams))
        return JSONResponse(await self.run_job(request, job, streams))

    # --------------------------------------------------------------------------------- routes

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``: one engine request per prompt, choice ``i * n + j``."""
        req = parse_completion(parse_json(await request.body()), self.unknown_fields)
        self.check_model(req.model)
        engine = self.need_engine("/v1/completions")
        prompts = [self.encode(p) if isinstance(p, str) else p for p in req.prompts]
        for ids in prompts:
            self.check_prompt(engine, ids, "prompt")
        self.check_n(engine, req.sampling)
        params = req.sampling.params(req.sampling.max_tokens or self.settings.completion_max_tokens)
        echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in req.prompts] if req.echo else None
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.admit(engine, rid, prompts, [params] * len(prompts))
        job = _CompletionJob(rid, self.model_name, [len(p) for p in prompts], req.sampling.n, self.token_bytes,
                             req.include_usage and req.stream, logprobs=req.sampling.logprobs is not None, echo=echo)
        return await self.respond(request, job, streams, req.stream)

    def need_template(self) -> None:
        """400 unless the tokenizer has a chat template."""
        if not getattr(self.tokenizer, "chat_template", None) or not hasattr(self.tokenizer, "apply_chat_template"):
            raise APIError(400, f"{self.model_name} has no chat template; send a prompt to /v1/completions instead.",
                           param="messages", code="no_chat_template")

    def render(self, messages: list[dict[str, str]]) -> tuple[str, tuple[str, ...]]:
        """The chat template's prompt for ``messages`` (with the assistant's cue) and its stop strings."""
        self.need_template()
        try:
            return render_chat(self.tokenizer, messages)
        except TriformError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``: the messages through the chat template, then the engine."""
        req = parse_chat(parse_json(await request.body()), self.unknown_fields)
        self.check_model(req.model)
        engine = self.need_engine("/v1/chat/completions")
        prompt, stops = self.render(req.messages)
        ids = self.encode(prompt)
        self.check_prompt(engine, ids, "messages")
        self.check_n(engine, req.sampling)
        params = req.sampling.params(req.sampling.max_tokens or self.room(engine, len(ids)), stops)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.admit(engine, rid, [ids], [params])
        job = _ChatJob(rid, self.model_name, [len(ids)], req.sampling.n, self.token_bytes,
                       req.include_usage and req.stream, logprobs=req.logprobs)
        return await self.respond(request, job, streams, req.stream)

    async def embeddings(self, request: Request) -> Response:
        """``POST /v1/embeddings``: unit vectors from the sentence encoder, in a worker thread."""
        req = parse_embedding(parse_json(await request.body()), self.unknown_fields)
        self.check_model(req.model)
        if self.encoder is None:
            raise APIError(404, f"{self.model_name} is a decoder: it serves completions and chat, not /v1/embeddings.",
                           param="model", code="model_not_supported")
        if self.draining:
            raise _engine_error(EngineStopped(""))
        limit = self.encoder.max_length
        counts = [min(len(self.tokenizer.encode(t)), limit) for t in req.inputs]
        if self._embed_lock is None:
            self._embed_lock = asyncio.Lock()
        self._embed_waiting += 1
        waiting = True
        try:
            async with self._embed_lock:  # one batch at a time through the encoder
                self._embed_waiting -= 1
                waiting = False
                self._embedding += 1
                try:
                    vectors = await asyncio.to_thread(self.encoder.embed, req.inputs)
                finally:
                    self._embedding -= 1
        finally:
            if waiting:
                self._embed_waiting -= 1
        self._embedded_tokens += sum(counts)
        data = []
        for i, v in enumerate(vectors):
            if req.encoding_format == "base64":
                value: Any = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                value = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        total = sum(counts)
        return JSONResponse({"object": "list", "data": data, "model": self.model_name,
                             "usage": {"prompt_tokens": total, "total_tokens": total}})

    def max_model_len(self) -> int | None:
        """The context (decoder) or longest input (encoder) in tokens; None when unbounded."""
        if self.engine is not None:
            return self.engine.core.limits.max_len
        return self.encoder.max_length

    def model_card(self) -> dict[str, Any]:
        """The served model as ``/v1/models`` lists it."""
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "triform",
                "max_model_len": self.max_model_len()}

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize``: the token ids of a prompt, or of messages through the chat template."""
        req = parse_tokenize(parse_json(await request.body()), self.unknown_fields)
        self.check_model(req.model)
        if req.messages is not None:
            if self.engine is None:
                raise APIError(400, f"{self.model_name} is an encoder; it has no chat template.", param="messages",
                               code="no_chat_template")
            self.need_template()
            try:
                text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt)
            except TriformError as exc:
                raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        else:
            text = req.prompt
        assert text is not None
        ids = self.encode(text) if self.engine is not None else self.tokenizer.encode(text)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len()})

    async def detokenize(self, request: Request) -> Response:
        """``POST /detokenize``: the text of token ids."""
        req = parse_detokenize(parse_json(await request.body()), self.unknown_fields)
        self.check_model(req.model)
        vocab = self.engine.core.limits.vocab if self.engine is not None else self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens must lie in [0, {vocab}).", param="tokens", code="invalid_value")
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (the body has been read, so only a disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ------------------------------------------------------------------------------------ middleware


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class _APIKey:
    """Refuse requests to the API routes without ``Authorization: Bearer KEY`` (401)."""

    def __init__(self, app: ASGIApp, key: str, state: ServerState) -> None:
        self.app, self.key, self.state = app, key.encode("utf-8"), state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        message = "a valid API key is required: send the header Authorization: Bearer KEY." if not given else \
            "the API key given is not valid."
        if scope["path"] in GENERATION_PATHS:
            self.state.metrics.count(401)
        await _json_response(401, error_body(401, message, code="invalid_api_key"),
                             {"WWW-Authenticate": "Bearer"})(scope, receive, send)


class _BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413) before anything parses them: by their
    ``Content-Length``, or by counting a streamed body. The body is read here and handed on whole;
    the rest of an oversized body is read and dropped (up to ``DRAIN_FACTOR`` times the limit), so
    the client gets the answer instead of a reset connection."""

    DRAIN_FACTOR = 64

    def __init__(self, app: ASGIApp, max_bytes: int, state: ServerState) -> None:
        self.app, self.max_bytes, self.state = app, max_bytes, state

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, seen: int, more: bool) -> None:
        while more and seen <= self.max_bytes * self.DRAIN_FACTOR:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
        if scope["path"] in GENERATION_PATHS:
            self.state.metrics.count(413)
        body = error_body(413, f"the request body is over the server's limit of {self.max_bytes} bytes.",
                          code="request_too_large")
        await _json_response(413, body, {"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, 0, int(length) <= self.max_bytes * self.DRAIN_FACTOR)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            more = message.get("more_body", False)
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send, seen, more)
                return
            chunks.append(chunk)
            if not more:
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body only a disconnect is left to hear of

        await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------ app


def build_app(
    engine: AsyncEngine | None, tokenizer: Any, *, model_name: str, settings: ServeSettings | None = None,
    encoder: Any = None,
) -> FastAPI:
    """The FastAPI app serving ``engine`` (a decoder; started by the app's lifespan, drained when
    it ends) or, with ``engine=None``, ``encoder`` (a ``SentenceEncoder``, for ``/v1/embeddings``)
    under the name ``model_name``. See the module docstring for the routes; ``app.state.server``
    is the :class:`ServerState` (``request_drain()`` begins a graceful shutdown from any thread)."""
    settings = settings or ServeSettings()
    state = ServerState(engine, tokenizer, model_name=model_name, settings=settings, encoder=encoder)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.drain()

    app = FastAPI(title="triform", description="An OpenAI-compatible API over triform's engine.", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    def handle(fn: Callable[[Request], Awaitable[Response]], counted: bool) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            try:
                response = await fn(request)
            except APIError as exc:
                if counted:
                    state.metrics.count(exc.status)
                return _json_response(exc.status, exc.body())
            except _ClientGone:
                state.metrics.count(499)
                return Response(status_code=499)
            if counted and not isinstance(response, EventStream):  # a stream counts itself when it ends
                state.metrics.count(response.status_code)
            return response

        route.__name__ = fn.__name__
        route.__doc__ = fn.__doc__
        return route

    app.add_api_route("/v1/completions", handle(state.completions, True), methods=["POST"])
    app.add_api_route("/v1/chat/completions", handle(state.chat, True), methods=["POST"])
    app.add_api_route("/v1/embeddings", handle(state.embeddings, True), methods=["POST"])
    app.add_api_route("/tokenize", handle(state.tokenize, False), methods=["POST"])
    app.add_api_route("/detokenize", handle(state.detokenize, False), methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [state.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != state.model_name:
            body = error_body(404, f"the model {model_id!r} does not exist; this server serves {state.model_name!r}.",
                              param="model", code="model_not_found")
            return _json_response(404, body)
        return JSONResponse(state.model_card())

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return _json_response(503, error_body(503, "the server is shutting down.", code="shutting_down"))
        if state.engine is not None and not state.engine.is_running:
            return _json_response(503, error_body(503, "the engine is not running.", code="engine_dead"))
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        content, media_type = state.metrics.render()
        return Response(content, media_type=media_type)

    @app.get("/")
    async def playground() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return _json_response(404, error_body(404, "the playground page is not installed.", code="not_found"))
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message, code = f"{request.url.path} is not a route of this server.", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}.", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return _json_response(exc.status_code, error_body(exc.status_code, message, code=code), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        param = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else None
        return _json_response(400, error_body(400, f"the request is not valid: {errors[0]['msg'] if errors else exc}.",
                                              param=param or None, code="invalid_value"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_response(500, error_body(500, "the server failed while handling this request."))

    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes, state=state)
    if settings.api_key is not None:
        app.add_middleware(_APIKey, key=settings.api_key, state=state)
    return app
