"""The serving engine, offline: paged KV cache + continuous batching + prefix sharing, behind a small API.

    engine = Engine(model, tokenizer, EngineConfig(kv_cache_memory=2 << 30))
    rid = engine.submit("Once upon a time", SamplingParams(temperature=0.8, seed=1, n=2))
    for out in engine.stream():           # RequestOutput: request id, completion index, new text
        print(out.request_id, out.index, out.text, end="")

``Engine`` is a thin synchronous driver over an :class:`~triform.inference.core.EngineCore` in the
caller's thread: ``submit`` / ``abort`` / ``step`` go straight to the core, and the driver keeps what
``result()`` needs for its own requests (the core forgets a request as soon as it ends). A server
uses :class:`~triform.inference.async_engine.AsyncEngine` instead, which runs the same core on a
thread of its own.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from torch import Tensor

from triform.errors import GenerationError
from triform.inference.core import EngineConfig, EngineCore, EngineStats, RequestOutput
from triform.inference.decode import Completion
from triform.inference.paged import PagedKVStore
from triform.inference.sampling import SamplingParams
from triform.inference.scheduler import Scheduler, Sequence
from triform.models.decoder import DecoderLM
from triform.tokenizers.base import Tokenizer

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "RequestResult"]


@dataclass
class RequestResult:
    """A finished request: its prompt ids and its completions, in index order."""

    request_id: str
    prompt_ids: list[int]
    completions: list[Completion]


@dataclass
class _Record:
    """What the offline driver keeps of one of its requests until ``result()`` collects it: the
    pieces of every completion as they streamed, and (while the core runs it) its live sequences."""

    prompt_ids: list[int]
    params: SamplingParams
    seqs: dict[int, Sequence]
    text: dict[int, list[str]] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    finish_reason: dict[int, str] = field(default_factory=dict)
    finished: bool = False

    def collect(self, out: RequestOutput) -> None:
        self.text.setdefault(out.index, []).append(out.text)
        self.token_ids.setdefault(out.index, []).extend(out.token_ids)
        if out.finish_reason is not None:
            self.finish_reason[out.index] = out.finish_reason
        self.finished = self.finished or out.request_finished


class Engine:
    """Continuous-batching generation over a paged KV cache, driven from the caller's thread (see
    the module docstring). ``core`` is the :class:`EngineCore` it drives; ``requests`` holds the
    driver's record of each request submitted and not yet collected by ``result()``."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.core = EngineCore(model, tokenizer, config)
        self.requests: dict[str, _Record] = {}
        self._ids = itertools.count()

    @property
    def model(self) -> DecoderLM:
        return self.core.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.core.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def store(self) -> PagedKVStore:
        return self.core.store

    @property
    def stats(self) -> EngineStats:
        """The core's latest stats snapshot."""
        return self.core.stats()

    @property
    def last_logits(self) -> dict[str, Tensor]:
        """"request/index" -> the next-token logits (V,) each completion saw in the last step."""
        return self.core.last_logits

    # ----------------------------------------------------------------------------------- requests

    def submit(
        self, prompt: str | bytes | Seq[int], params: SamplingParams | None = None, *, request_id: str | None = None,
    ) -> str:
        """Queue a request and return its id. Anything wrong with it raises ``GenerationError`` here,
        before it touches the engine's state, so the requests already queued carry on."""
        params = params or SamplingParams()
        ids = list(prompt) if not isinstance(prompt, (str, bytes)) else self.tokenizer.encode(prompt)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise GenerationError(f"request id {rid!r} is already in use.")
        self.core.add_request(rid, ids, params)
        self.requests[rid] = _Record(list(ids), params, self.core.sequences(rid))
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks; ``result()`` then reports its unfinished
        completions as "abort"."""
        record = self.requests.get(request_id)
        if record is None:
            raise GenerationError(f"no request with id {request_id!r}.")
        self._collect(self.core.abort_request(request_id))

    def has_unfinished(self) -> bool:
        """Whether any request is still waiting or running."""
        return self.core.has_unfinished()

    def result(self, request_id: str) -> RequestResult:
        """The completions of a finished request (and forget it)."""
        record = self.requests[request_id]
        if not record.finished:
            raise GenerationError(f"request {request_id!r} has not finished.")
        del self.requests[request_id]
        completions = [
            Completion("".join(record.text[i]), record.token_ids[i], record.finish_reason[i])
            for i in sorted(record.text)
        ]
        return RequestResult(request_id, record.prompt_ids, completions)

    # ---------------------------------------------------------------------------------- stepping

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return what every completion that advanced produced."""
        return self._collect(self.core.step())

    def _collect(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for out in outputs:
            self.requests[out.request_id].collect(out)
        return outputs

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every queued request has finished, yielding outputs as they come."""
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self, prompts: Seq[str | bytes | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
        *, progress: bool = False,
    ) -> list[RequestResult]:
        """Run many prompts to completion (one ``SamplingParams`` for all, or one per prompt); results
        come back in prompt order. ``progress`` shows a bar of finished requests and tokens/s."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets.")
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), unit="req", desc="generate", dynamic_ncols=True)
        start, generated = time.perf_counter(), self.stats.generated_tokens
        while self.has_unfinished():
            outs = self.step()
            if bar is not None:
                bar.update(sum(o.request_finished for o in outs))
                rate = (self.stats.generated_tokens - generated) / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{rate:.1f}", running=len(self.scheduler.running), refresh=False)
        if bar is not None:
            bar.close()
        return [self.result(i) for i in ids]

    # ------------------------------------------------------------------------------ introspection

    def kv_usage(self) -> tuple[int, int]:
        """(slots holding a cached token, slots in allocated blocks) right now; shared blocks count once."""
        return self.core.kv_usage()

    def live_blocks(self, request_id: str, index: int = 0) -> int:
        """Blocks a running completion holds now (freed sliding-window blocks excluded)."""
        return self.core.live_blocks(request_id, index)
