"""The asyncio front end of the engine: one core thread, one output queue per request.

    async with AsyncEngine(model, tokenizer, EngineConfig(num_blocks=4096), max_waiting=256) as engine:
        async for out in engine.generate("Once upon a time", SamplingParams(max_new_tokens=64)):
            print(out.text, end="")

The :class:`~triform.inference.core.EngineCore` (scheduler, KV pages, model, request state) lives on
a thread of its own that runs one loop: take every command waiting in a thread-safe inbox (add,
abort, shutdown), run ``step()`` while there is work, and block on the inbox when there is none.
The outputs of each step go back to the event loop in one ``loop.call_soon_threadsafe`` call, which
routes each to the ``asyncio.Queue`` of its request. Nothing else touches core state: the front end
only validates requests against the core's immutable limits, puts commands in the inbox and reads
the immutable stats snapshot the core publishes.

``generate`` checks a request before it reaches the core (bad parameters or a prompt too long for
the context raise ``GenerationError``, a full queue raises :class:`EngineOverloaded`, a stopping
engine :class:`EngineStopped`) and returns a :class:`RequestStream`, an async iterator of
:class:`~triform.inference.core.RequestOutput`. A consumer that stops early (``aclose()``, a
cancelled task, or dropping the stream) aborts its request, so a client disconnect frees its KV
blocks; the front end forgets a request when the core reports its last output. If the core thread
fails, every open stream raises :class:`EngineDead` and new requests are refused with it.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from triform.errors import ConfigError, GenerationError, TriformError
from triform.inference.core import EngineConfig, EngineCore, EngineStats, RequestOutput
from triform.inference.sampling import SamplingParams
from triform.models.decoder import DecoderLM
from triform.tokenizers.base import Tokenizer


class EngineOverloaded(TriformError):
    """Too many requests are waiting for the engine; try again later (an HTTP server's 429)."""


class EngineStopped(TriformError):
    """The engine is not admitting requests: it has not started, is shutting down, or has stopped."""


class EngineDead(EngineStopped):
    """The engine core failed; its exception is this one's ``__cause__``."""


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Shutdown:
    deadline: float


@dataclass(frozen=True)
class _Refused:
    """The core refused an add (it re-checks what the front end checked): that request's error."""

    request_id: str
    error: Exception


_Command = _Add | _Abort | _Shutdown


@dataclass(eq=False)
class _Entry:
    """The front end's side of one request: its output queue, and a future done when it ends."""

    queue: asyncio.Queue[RequestOutput | BaseException]
    ended: asyncio.Future[None]
    started: bool = False  # has produced an output (so no longer counts as waiting)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RequestStream:
    """The outputs of one request, as an async iterator (``async for out in stream``). It ends after
    the request's last output (``request_finished``); stopping early aborts the request: call
    ``aclose()`` (which returns once the core has freed the request's blocks), cancel the task
    awaiting it, or drop it. ``prompt_token_ids`` are the ids the request was run with."""

    def __init__(self, engine: AsyncEngine, request_id: str, prompt_token_ids: list[int], entry: _Entry) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._engine = engine
        self._entry = entry
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._entry.queue.get()
        except BaseException:  # the consumer was cancelled mid-wait (a client disconnect): abort
            self._done = True
            self._engine._send_abort(self.request_id, self._entry)
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.request_finished:
            self._done = True
        return item

    async def aclose(self) -> None:
        """Stop consuming: abort the request unless it has ended, and wait until the core has
        freed its blocks and forgotten it."""
        if self._done:
            return
        self._done = True
        self._engine._send_abort(self.request_id, self._entry)
        await asyncio.shield(self._entry.ended)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):  # dropped unfinished: abort (the inbox is safe from __del__)
            self._engine._send_abort(self.request_id, self._entry)


@dataclass
class _FrontState:
    accepting: bool = False
    error: BaseException | None = None
    entries: dict[str, _Entry] = field(default_factory=dict)
    queued: int = 0  # requests admitted that have produced no output yet


class AsyncEngine:
    """An engine core on its own thread with an asyncio front end (see the module docstring).

    Args:
        model, tokenizer, config: as for the offline ``Engine``.
        max_waiting: most requests admitted and not yet producing output (queued for the core or
            in its waiting queue, prompt computation included); one more raises
            ``EngineOverloaded``. None: no limit.
        clock: the time source for request times and the shutdown deadline (tests pass their own).
    """

    def __init__(
        self, model: DecoderLM, tokenizer: Tokenizer, config: EngineConfig | None = None, *,
        max_waiting: int | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        bad = isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0
        if max_waiting is not None and bad:
            raise ConfigError(f"max_waiting must be a non-negative integer or None, got {max_waiting!r}.")
        self.core = EngineCore(model, tokenizer, config, check_thread=True, clock=clock)
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        self._clock = clock
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._state = _FrontState()
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future[None] | None = None
        self._stopping = False

    # --------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the core thread on the running event loop; the engine then admits requests."""
        if self._thread is not None:
            raise EngineStopped("this engine has already been started; make a new one.")
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="triform-engine-core", daemon=True)
        self._state.accepting = True
        self._thread.start()

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        """Leaving the block shuts the engine down with no grace: requests still open are aborted."""
        await self.shutdown(grace_s=0.0)

    @property
    def is_running(self) -> bool:
        """Whether the core thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop admitting (new requests raise ``EngineStopped``), let the admitted requests run for up
        to ``grace_s`` seconds of the engine's clock, abort what is left (their streams end with
        finish reason "abort"), and join the core thread. Calling it again waits for the same end."""
        if not grace_s >= 0:
            raise ConfigError(f"grace_s must be a non-negative number of seconds, got {grace_s!r}.")
        self._state.accepting = False
        if self._thread is None or self._exited is None:
            return
        if not self._stopping:
            self._stopping = True
            self._inbox.put(_Shutdown(self._clock() + grace_s))
        await asyncio.shield(self._exited)
        await asyncio.to_thread(self._thread.join)

    # ---------------------------------------------------------------------------------- requests

    def generate(
        self, prompt: str | bytes | Seq[int], params: SamplingParams | None = None, *, request_id: str | None = None,
    ) -> RequestStream:
        """Admit a request and return the stream of its outputs. Raises at once, before the request
        reaches the core: ``GenerationError`` for a bad request (empty prompt, prompt longer than the
        context allows, token ids outside the vocabulary, ``n`` too large, more KV than the pool
        holds, a request id in use), ``EngineOverloaded`` past ``max_waiting``, ``EngineStopped``
        when the engine is not running, and ``EngineDead`` after the core has failed."""
        st = self._state
        if self._loop is not None and _running_loop() is not self._loop:
            raise RuntimeError("call generate() from the event loop the engine was started on.")
        if st.error is not None:
            raise EngineDead("the engine core has failed; no new requests are accepted.") from st.error
        if not st.accepting:
            raise EngineStopped("the engine is not accepting requests (not started, or shutting down).")
        params = params or SamplingParams()
        ids = list(prompt) if not isinstance(prompt, (str, bytes)) else self.tokenizer.encode(prompt)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in st.entries:
                request_id = f"req-{next(self._ids)}"
        if request_id in st.entries:
            raise GenerationError(f"request id {request_id!r} is already in use.")
        self.core.limits.check(request_id, ids, params)
        if self.max_waiting is not None and st.queued >= self.max_waiting:
            raise EngineOverloaded(
                f"{st.queued} requests are already waiting (max_waiting={self.max_waiting}); try again later."
            )
        assert self._loop is not None
        entry = _Entry(asyncio.Queue(), self._loop.create_future())
        st.entries[request_id] = entry
        st.queued += 1
        self._inbox.put(_Add(request_id, ids, params, self._clock()))
        return RequestStream(self, request_id, ids, entry)

    async def abort(self, request_id: str) -> None:
        """Abort a request and wait until the core has freed its blocks and forgotten it; its stream
        ends with finish reason "abort". A request that has already ended (or never existed) is
        left alone."""
        entry = self._state.entries.get(request_id)
        if entry is None:
            return
        self._send_abort(request_id, entry)
        await asyncio.shield(entry.ended)

    def _send_abort(self, request_id: str, entry: _Entry) -> None:
        """Queue an abort for the request behind ``entry`` if it is still live (thread-safe: it only
        reads the entries and puts on the inbox)."""
        if self._state.entries.get(request_id) is entry and self.is_running:
            self._inbox.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """The core's latest stats snapshot (running / waiting requests, KV blocks, token counts)."""
        return self.core.stats()

    @property
    def num_queued(self) -> int:
        """Requests admitted that have produced no output yet (what ``max_waiting`` bounds)."""
        return self._state.queued

    @property
    def num_open(self) -> int:
        """Requests the front end is following (admitted, and not yet ended)."""
        return len(self._state.entries)

    # ------------------------------------------------------------------- event-loop side of outputs

    def _dispatch(self, items: list[RequestOutput | _Refused]) -> None:
        """Route a step's outputs to their request queues (runs on the event loop)."""
        st = self._state
        for item in items:
            entry = st.entries.get(item.request_id)
            if entry is None:
                continue
            if not entry.started:
                entry.started = True
                st.queued -= 1
            if isinstance(item, _Refused):
                entry.queue.put_nowait(item.error)
                self._forget(item.request_id)
                continue
            entry.queue.put_nowait(item)
            if item.request_finished:
                self._forget(item.request_id)

    def _forget(self, request_id: str) -> None:
        entry = self._state.entries.pop(request_id)
        if not entry.started:
            self._state.queued -= 1
        if not entry.ended.done():
            entry.ended.set_result(None)

    def _fail(self, error: BaseException) -> None:
        """The core thread died: every open stream raises ``EngineDead``; new requests are refused."""
        st = self._state
        st.error, st.accepting = error, False
        for rid in list(st.entries):
            dead = EngineDead(f"the engine core failed while request {rid} was open: {error!r}")
            dead.__cause__ = error
            st.entries[rid].queue.put_nowait(dead)
            self._forget(rid)

    def _exit(self) -> None:
        assert self._exited is not None
        if not self._exited.done():
            self._exited.set_result(None)

    # -------------------------------------------------------------------------- the core thread

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop (from the core thread)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass

    def _take(self, block: bool) -> list[_Command]:
        """Every command in the inbox; when ``block``, wait for at least one (no busy spin)."""
        cmds = [self._inbox.get()] if block else []
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _run(self) -> None:
        """The core loop: commands, then a step while there is work; idle, block on the inbox."""
        core = self.core
        deadline: float | None = None
        try:
            while True:
                busy = core.has_unfinished()
                if deadline is not None and not busy:
                    break
                out: list[RequestOutput | _Refused] = []
                for cmd in self._take(block=not busy):
                    if isinstance(cmd, _Add):
                        try:
                            core.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, arrival_time=cmd.arrival_time)
                        except GenerationError as e:
                            out.append(_Refused(cmd.request_id, e))
                    elif isinstance(cmd, _Abort):
                        out += core.abort_request(cmd.request_id)
                    else:
                        deadline = cmd.deadline if deadline is None else min(deadline, cmd.deadline)
                if deadline is not None and self._clock() >= deadline:
                    out += core.abort_all()
                if core.has_unfinished():
                    out += core.step()
                if out:
                    self._post(self._dispatch, out)
            leftover = core.abort_all()
            if leftover:
                self._post(self._dispatch, leftover)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting client instead of lost
            self._post(self._fail, e)
        finally:
            self._post(self._exit)
