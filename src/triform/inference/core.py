"""The engine core: scheduler, KV pages, model and live request state, driven by one thread.

    core = EngineCore(model, tokenizer, EngineConfig(num_blocks=512))
    core.add_request("a", prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=32))
    while core.has_unfinished():
        for out in core.step():          # RequestOutput: new text/ids, counts, times
            ...

``step()`` runs one scheduler step: it asks the scheduler which sequences compute how many tokens,
carries out copy-on-write orders, packs every new token into one forward pass (``PagedBatch``),
samples for the sequences whose known tokens are now all cached, and returns what each produced.

The core keeps a request only while it runs: the output that finishes its last completion carries
``request_finished`` and the core forgets the request in the same call, and ``abort_request`` frees
its blocks and forgets it at once. Everything a caller needs afterwards (text, token counts, arrival /
first-token / per-token times for latency metrics) travels in the outputs, so nothing has to read
core state after the fact. Only the thread that drives the core may call ``add_request``,
``abort_request``, ``step`` and the introspection methods (``check_thread=True`` enforces it);
``limits.check`` (request validation against the fixed limits) and ``stats()`` (an immutable
snapshot the core republishes after every call that changes it) are safe from any thread. The
offline ``Engine`` (engine.py) drives a core in its caller's thread; ``AsyncEngine``
(async_engine.py) drives one on a thread of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from triform.errors import ConfigError, GenerationError
from triform.inference.blocks import NULL_BLOCK
from triform.inference.decode import DecodeStream, make_generator
from triform.inference.paged import MIN_ROWS, PagedBatch, PagedKVStore, RowSpec
from triform.inference.sampling import SamplingParams, TokenLogprob, sample_next, token_logprobs
from triform.inference.scheduler import Scheduler, SchedulerConfig, Sequence, Status, check_fits
from triform.models.decoder import DecoderLM
from triform.tokenizers.base import Tokenizer


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the engine lays out KV memory and batches work.

    Args:
        block_size: tokens per KV block (PagedAttention's block; 16 as in vLLM).
        kv_cache_memory: bytes of KV cache to allocate, when ``num_blocks`` is not given.
        num_blocks: exact number of KV blocks (overrides ``kv_cache_memory``).
        max_num_seqs: most sequences decoding at once.
        max_num_batched_tokens: tokens computed per step (decode tokens plus prompt chunks).
        prefill_chunk: longest piece of a prompt computed in one step.
        prefix_caching: reuse cached blocks of identical prompt prefixes.
        attention_partition: tokens per partition of the paged decode kernel. Fixed partitions keep
            every request's arithmetic independent of the batch; None picks 128 on CPU, and one
            partition per step on GPUs, where kernel launches cost more than the extra reads.
    """

    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    prefill_chunk: int = 256
    prefix_caching: bool = True
    attention_partition: int | None = None

    def __post_init__(self) -> None:
        if self.attention_partition is not None and not (
            isinstance(self.attention_partition, int) and self.attention_partition > 0
        ):
            raise ConfigError(f"attention_partition must be a positive integer, got {self.attention_partition!r}.")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}.")
        if self.num_blocks is None and not self.kv_cache_memory > 0:
            raise ConfigError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}.")


@dataclass(frozen=True)
class RequestOutput:
    """What one completion of a request produced in one step.

    ``text`` and ``token_ids`` are new since the completion's previous output (``token_ids`` holds at
    most one id; an end-of-sequence token that ends the completion is not kept). The completion's
    last output has ``finished`` and its ``finish_reason`` ("stop", "eos", "length" or "abort"); the
    request's last output also has ``request_finished``, after which the core has forgotten it.
    Each of the request's ``n`` completions ends with exactly one finished output, even one an abort
    stopped before it began. ``prompt_tokens`` and ``completion_tokens`` (tokens this completion has
    kept so far) are the usage counts. ``logprobs`` holds one entry per id in ``token_ids`` when the
    request asked for them (``SamplingParams.logprobs``), else None. Times come from the core's clock
    (``time.monotonic`` unless given): ``arrival_time`` of the request, ``first_token_time`` of this
    completion's first sampled token (None before it), and ``time`` when this output was made; time
    to first token, inter-token latency and end-to-end latency are differences of these.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    request_finished: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    time: float = 0.0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the core, published after every step, add and abort; immutable, so any thread
    may read it. ``requests`` are live in the core, ``running`` of them have a sequence running and
    ``waiting`` have none (queued, or preempted); ``running_seqs`` / ``waiting_seqs`` count
    completions. ``kv_blocks_used`` of ``kv_blocks_total`` are held now (blocks that are free but
    still hold a cached prefix count as free). The rest are cumulative over the core's life:
    ``prompt_tokens`` submitted, ``generated_tokens`` kept, ``computed_tokens`` run through the model,
    ``prefix_hit_tokens`` served from cached blocks, ``blocks_allocated`` taken from the pool (prefix
    hits take none), ``peak_blocks`` held at once, ``steps`` and ``preemptions``."""

    requests: int = 0
    running: int = 0
    waiting: int = 0
    running_seqs: int = 0
    waiting_seqs: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    computed_tokens: int = 0
    prefix_hit_tokens: int = 0
    blocks_allocated: int = 0
    peak_blocks: int = 0
    steps: int = 0
    preemptions: int = 0

    @property
    def kv_usage(self) -> float:
        """Share of the KV blocks held now, in [0, 1]."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class RequestLimits:
    """The fixed limits a request is checked against (vocabulary, context window, pool size).
    Immutable, so a front end on any thread can refuse a request before it reaches the core."""

    vocab: int
    max_len: int | None  # None: relative positions with a sliding window run on without end
    max_num_seqs: int
    scheduler: SchedulerConfig
    window: int | None

    def check(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ``GenerationError`` with one clear sentence if the request could never run: an empty
        prompt, token ids outside the vocabulary, a prompt that leaves no room in the context window,
        more completions than ``max_num_seqs``, or more KV blocks than the pool holds."""
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"request {request_id}: params must be SamplingParams, got {type(params).__name__}.")
        if not prompt_ids:
            raise GenerationError(f"request {request_id}: the prompt is empty; give at least one token.")
        if any(not 0 <= t < self.vocab for t in prompt_ids):
            raise GenerationError(f"request {request_id}: token ids must lie in [0, {self.vocab}).")
        if self.max_len is not None and len(prompt_ids) >= self.max_len:
            raise GenerationError(
                f"request {request_id}: the prompt is {len(prompt_ids)} tokens but the model's context window is "
                f"{self.max_len} (room is needed for at least one new token)."
            )
        if params.n > self.max_num_seqs:
            raise GenerationError(f"request {request_id}: n={params.n} exceeds max_num_seqs={self.max_num_seqs}.")
        total = len(prompt_ids) + params.max_new_tokens
        check_fits(self.scheduler, self.window, total if self.max_len is None else min(total, self.max_len))


@dataclass(eq=False)
class _Live:
    """A request while the core runs it."""

    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: dict[int, Sequence] = field(default_factory=dict)
    streams: dict[int, DecodeStream] = field(default_factory=dict)
    first_token_time: dict[int, float] = field(default_factory=dict)
    open: int = 0  # completions started and not finished

    @property
    def done(self) -> bool:
        return len(self.seqs) == self.params.n and self.open == 0


class EngineCore:
    """Scheduler, KV store, model and live requests, stepped by one thread (see the module docstring).

    ``check_thread`` makes the first thread that adds, aborts or steps the owner and refuses calls
    from any other with ``RuntimeError`` (the async front end turns it on). ``clock`` gives the times
    in the outputs."""

    def __init__(
        self, model: DecoderLM, tokenizer: Tokenizer, config: EngineConfig | None = None, *,
        check_thread: bool = False, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.clock = clock
        s = model.cfg.stack
        assert s.n_kv_heads is not None and s.head_dim is not None
        param = model.tok_emb.weight
        self.device = param.device
        kv_dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        self.window = s.sliding_window
        # Absolute positions end at max_seq_len; relative ones with a sliding window can run on.
        self.max_len: int | None = None if (self.window is not None and model.abs_pos is None) else s.max_seq_len
        c = self.config
        per_block = 2 * s.n_layers * c.block_size * s.n_kv_heads * s.head_dim * torch.finfo(kv_dtype).bits // 8
        num_blocks = c.num_blocks if c.num_blocks is not None else max(1, int(c.kv_cache_memory // per_block))
        sched_config = SchedulerConfig(
            block_size=c.block_size, num_blocks=num_blocks, max_num_seqs=c.max_num_seqs,
            max_num_batched_tokens=c.max_num_batched_tokens, prefill_chunk=c.prefill_chunk,
            prefix_caching=c.prefix_caching,
        )
        self.scheduler = Scheduler(sched_config, window=self.window)
        self.store = PagedKVStore(
            s.n_layers, num_blocks, s.n_kv_heads, c.block_size, s.head_dim, dtype=kv_dtype, device=self.device,
        )
        self.groups = s.n_heads // s.n_kv_heads
        partition = c.attention_partition or (128 if self.device.type == "cpu" else None)
        self.partition_blocks = None if partition is None else max(1, partition // c.block_size)
        self.alibi_slopes: Tensor | None = model.alibi.slopes if model.alibi is not None else None
        self.vocab = min(tokenizer.vocab_size, model.cfg.vocab_size)
        self.token_bytes = tokenizer.token_bytes()
        self.limits = RequestLimits(self.vocab, self.max_len, c.max_num_seqs, sched_config, self.window)
        self.last_logits: dict[str, Tensor] = {}  # "request/index" -> next-token logits of the last step
        self._requests: dict[str, _Live] = {}
        self._arrivals = itertools.count()  # scheduling order (the scheduler preempts the newest)
        self._check_thread = check_thread
        self._owner: int | None = None
        self._steps = self._prompt_tokens = self._generated = self._computed = self._peak = 0
        self._stats = EngineStats(kv_blocks_total=num_blocks)

    # ------------------------------------------------------------------------------ thread guard

    def _guard(self) -> None:
        if not self._check_thread:
            return
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif me != self._owner:
            raise RuntimeError(
                f"EngineCore state belongs to thread {self._owner}; thread {me} may not touch it "
                f"(send the request through the engine's queue instead)."
            )

    @property
    def owner_thread(self) -> int | None:
        """The ident of the thread that owns the core (None until its first guarded call)."""
        return self._owner

    # ----------------------------------------------------------------------------------- requests

    def add_request(
        self, request_id: str, prompt_ids: Seq[int], params: SamplingParams, *, arrival_time: float | None = None,
    ) -> None:
        """Queue a request for scheduling. Anything wrong with it raises ``GenerationError`` before
        it changes any state (``limits.check``, and a request id already live); ``arrival_time`` is
        when the request reached the system (the core's clock now if None)."""
        self._guard()
        if request_id in self._requests:
            raise GenerationError(f"request id {request_id!r} is already in use.")
        self.limits.check(request_id, prompt_ids, params)
        ids = list(prompt_ids)
        live = _Live(ids, params, self.clock() if arrival_time is None else arrival_time)
        self._requests[request_id] = live
        self.scheduler.add(self._start(request_id, live, 0, list(ids), next(self._arrivals)))
        self._prompt_tokens += len(ids)
        self._publish()

    def _start(self, rid: str, live: _Live, index: int, tokens: list[int], arrival: float) -> Sequence:
        seq = Sequence(
            seq_id=f"{rid}/{index}", request_id=rid, index=index, tokens=tokens, prompt_len=len(live.prompt_ids),
            params=live.params, arrival=arrival, generator=make_generator(live.params.seed, index, self.device),
        )
        live.seqs[index] = seq
        live.open += 1
        room = None if self.max_len is None else self.max_len - len(live.prompt_ids)
        live.streams[index] = DecodeStream(live.params, self.token_bytes, self.tokenizer.eos_id, room=room)
        return seq

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now: free its blocks, forget it, and return the final ("abort") output of
        each completion that had not finished (held-back text included). An unknown or already
        finished request id is not an error: the answer is then an empty list."""
        self._guard()
        live = self._requests.pop(request_id, None)
        if live is None:
            return []
        now = self.clock()
        outputs: list[RequestOutput] = []
        for index in range(live.params.n):
            seq = live.seqs.get(index)
            if seq is not None and seq.status is Status.FINISHED:
                continue
            text, kept = "", 0
            if seq is not None:
                self.scheduler.finish(seq, "abort")
                text, kept = live.streams[index].abort(), len(seq.output_ids)
            outputs.append(RequestOutput(
                request_id, index, text, [], True, "abort", prompt_tokens=len(live.prompt_ids), completion_tokens=kept,
                logprobs=None if live.params.logprobs is None else (), arrival_time=live.arrival_time,
                first_token_time=live.first_token_time.get(index), time=now,
            ))
        outputs[-1] = dataclasses.replace(outputs[-1], request_finished=True)
        self._publish()
        return outputs

    def abort_all(self) -> list[RequestOutput]:
        """Abort every live request (``abort_request`` for each); returns their final outputs."""
        self._guard()
        return [out for rid in list(self._requests) for out in self.abort_request(rid)]

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        self._guard()
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """The latest published snapshot (immutable; safe to call from any thread)."""
        return self._stats

    def _publish(self) -> None:
        sched = self.scheduler
        running = {s.request_id for s in sched.running}
        self._stats = EngineStats(  # one reference swap: readers see the old snapshot or the new one
            requests=len(self._requests), running=len(running), waiting=len(self._requests) - len(running),
            running_seqs=len(sched.running), waiting_seqs=len(sched.waiting),
            kv_blocks_used=sched.config.num_blocks - sched.pool.num_free, kv_blocks_total=sched.config.num_blocks,
            prompt_tokens=self._prompt_tokens, generated_tokens=self._generated, computed_tokens=self._computed,
            prefix_hit_tokens=sched.prefix_hit_tokens, blocks_allocated=sched.pool.num_allocations,
            peak_blocks=self._peak, steps=self._steps, preemptions=sched.num_preemptions,
        )

    # ---------------------------------------------------------------------------------- stepping

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return what every completion that advanced produced."""
        self._guard()
        sched = self.scheduler.schedule()
        if not sched.work:
            self._publish()
            return []
        kv = self.scheduler.kv
        self.store.copy_blocks(kv.pending_copies)
        kv.pending_copies.clear()
        rows = [RowSpec(list(kv.seqs[seq.seq_id].table), seq.num_computed, n) for seq, n in sched.work]
        batch = PagedBatch(
            self.store, rows, window=self.window, alibi_slopes=self.alibi_slopes, groups=self.groups,
            partition_blocks=self.partition_blocks,
        )
        tokens = batch.tokens([seq.tokens[seq.num_computed : seq.num_computed + n] for seq, n in sched.work])
        hidden = self.model.hidden_states(tokens, positions=batch.positions, cache=batch)  # (1, N, d)
        ready = [i for i, (seq, n) in enumerate(sched.work) if seq.num_computed + n == len(seq.tokens)]
        self._steps += 1
        self._computed += sched.num_tokens
        self._peak = max(self._peak, self.scheduler.config.num_blocks - self.scheduler.pool.num_free)
        self.scheduler.after_step(sched)
        if not ready:
            self._publish()
            return []
        index = [batch.last_index[i] for i in ready]
        index += [index[0]] * (MIN_ROWS - len(index))  # as in PagedBatch: small products take other kernels
        logits = self.model.lm_head(hidden[0, index])[: len(ready), : self.vocab].float()  # (R, V)
        self.last_logits = {sched.work[i][0].seq_id: logits[r] for r, i in enumerate(ready)}
        greedy = logits.argmax(dim=-1).tolist()
        picks: list[tuple[Sequence, _Live, int, int]] = []  # (completion, its request, logits row, token)
        for r, i in enumerate(ready):
            seq = sched.work[i][0]
            live = self._requests[seq.request_id]
            if live.params.n > 1 and not seq.forked and seq.index == 0:
                seq.forked = True  # split the other completions off now that the prompt is cached
                for j in range(1, live.params.n):
                    arrival = seq.arrival + j / (live.params.n + 1)
                    child = self._start(seq.request_id, live, j, list(seq.tokens), arrival)
                    child.num_computed = seq.num_computed
                    self.scheduler.fork(seq, child)
                    picks.append((child, live, r, self._pick(logits[r], greedy[r], child)))
            picks.append((seq, live, r, self._pick(logits[r], greedy[r], seq)))
        logprobs = self._logprobs(logits, picks)
        now = self.clock()
        outputs = [self._accept(seq, live, token, lp, now) for (seq, live, _, token), lp in zip(picks, logprobs)]
        self._publish()
        return outputs

    @staticmethod
    def _pick(logits: Tensor, greedy: int, seq: Sequence) -> int:
        if seq.params.greedy:
            return greedy
        return int(sample_next(logits[None], seq.params, [seq.generator])[0])

    @staticmethod
    def _logprobs(logits: Tensor, picks: list[tuple[Sequence, _Live, int, int]]) -> list[TokenLogprob | None]:
        """The chosen tokens' log-probabilities for the picks whose request asked for them."""
        want = [k for k, (seq, _, _, _) in enumerate(picks) if seq.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(picks)
        found = token_logprobs(
            logits, [picks[k][2] for k in want], [picks[k][3] for k in want],
            [picks[k][0].params.logprobs or 0 for k in want],
        )
        for k, lp in zip(want, found):
            out[k] = lp
        return out

    def _accept(
        self, seq: Sequence, live: _Live, token: int, logprob: TokenLogprob | None, now: float,
    ) -> RequestOutput:
        """Hand a sampled token to the completion's decode stream; keep it unless it ended the
        completion as end-of-sequence, finish the sequence when the stream says so, and forget the
        request once its last completion has finished."""
        piece, reason = live.streams[seq.index].accept(token)
        new = [] if reason == "eos" else [token]
        seq.tokens += new
        self._generated += len(new)
        first = live.first_token_time.setdefault(seq.index, now)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            live.open -= 1
        done = reason is not None and live.done
        if done:
            del self._requests[seq.request_id]
        lps = None if seq.params.logprobs is None else (() if logprob is None or not new else (logprob,))
        return RequestOutput(
            seq.request_id, seq.index, piece, new, reason is not None, reason, done,
            prompt_tokens=len(live.prompt_ids), completion_tokens=len(seq.output_ids), logprobs=lps,
            arrival_time=live.arrival_time, first_token_time=first, time=now,
        )

    # ------------------------------------------------------------------------------ introspection

    def sequences(self, request_id: str) -> dict[int, Sequence]:
        """The live completions of a running request by index (owner thread only; the dict grows as
        a request with ``n > 1`` forks, and the core drops it when the request ends)."""
        self._guard()
        return self._requests[request_id].seqs

    def kv_usage(self) -> tuple[int, int]:
        """(slots holding a cached token, slots in allocated blocks) right now; shared blocks count once."""
        self._guard()
        b = self.config.block_size
        filled: dict[int, int] = {}
        for seq in self.scheduler.running:
            blocks = self.scheduler.kv.seqs.get(seq.seq_id)
            if blocks is None:
                continue
            for i, block in enumerate(blocks.table):
                if block != NULL_BLOCK:
                    filled[block] = max(filled.get(block, 0), min(b, max(0, seq.num_computed - i * b)))
        allocated = self.scheduler.config.num_blocks - self.scheduler.pool.num_free
        return sum(filled.values()), allocated * b

    def live_blocks(self, request_id: str, index: int = 0) -> int:
        """Blocks a running completion holds now (freed sliding-window blocks excluded)."""
        self._guard()
        return self.scheduler.kv.live_blocks(f"{request_id}/{index}")
