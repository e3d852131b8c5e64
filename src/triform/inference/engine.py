"""The serving engine: paged KV cache + continuous batching + prefix sharing, behind a small API.

    engine = Engine(model, tokenizer, EngineConfig(kv_cache_memory=2 << 30))
    rid = engine.submit("Once upon a time", SamplingParams(temperature=0.8, seed=1, n=2))
    for out in engine.stream():           # RequestOutput: request id, completion index, new text
        print(out.request_id, out.index, out.text, end="")

``step()`` runs one scheduler step: it asks the scheduler which sequences compute how many tokens,
carries out copy-on-write orders, packs every new token into one forward pass (``PagedBatch``),
samples for the sequences whose known tokens are now all cached, and returns what each produced.
A server drives the same ``submit`` / ``step`` / ``abort`` calls from its own loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from triform.errors import ConfigError, GenerationError
from triform.inference.blocks import NULL_BLOCK
from triform.inference.decode import Completion, DecodeStream, make_generator
from triform.inference.paged import MIN_ROWS, PagedBatch, PagedKVStore, RowSpec
from triform.inference.sampling import SamplingParams, sample_next
from triform.inference.scheduler import Scheduler, SchedulerConfig, Sequence, Status
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


@dataclass
class RequestOutput:
    """What one completion of a request produced in one step: new text and token ids (``finished``
    with its ``finish_reason``, "stop", "eos", "length" or "abort", on the last one)."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class RequestResult:
    """A finished request: its prompt ids and its completions, in index order."""

    request_id: str
    prompt_ids: list[int]
    completions: list[Completion]


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    seqs: dict[int, Sequence] = field(default_factory=dict)
    streams: dict[int, DecodeStream] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.status is Status.FINISHED for s in self.seqs.values())


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    computed_tokens: int = 0
    peak_blocks: int = 0
    blocks_allocated: int = 0  # blocks taken from the pool over the whole run (prefix hits take none)


class Engine:
    """Continuous-batching generation over a paged KV cache (see the module docstring)."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
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
        self.scheduler = Scheduler(
            SchedulerConfig(
                block_size=c.block_size, num_blocks=num_blocks, max_num_seqs=c.max_num_seqs,
                max_num_batched_tokens=c.max_num_batched_tokens, prefill_chunk=c.prefill_chunk,
                prefix_caching=c.prefix_caching,
            ),
            window=self.window,
        )
        self.store = PagedKVStore(
            s.n_layers, num_blocks, s.n_kv_heads, c.block_size, s.head_dim, dtype=kv_dtype, device=self.device,
        )
        self.groups = s.n_heads // s.n_kv_heads
        partition = c.attention_partition or (128 if self.device.type == "cpu" else None)
        self.partition_blocks = None if partition is None else max(1, partition // c.block_size)
        self.alibi_slopes: Tensor | None = model.alibi.slopes if model.alibi is not None else None
        self.vocab = min(tokenizer.vocab_size, model.cfg.vocab_size)
        self.token_bytes = tokenizer.token_bytes()
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self.last_logits: dict[str, Tensor] = {}  # "request/index" -> next-token logits of the last step
        self._ids = itertools.count()
        self._arrivals = itertools.count()

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
        if not ids:
            raise GenerationError(f"request {rid}: the prompt is empty; give at least one token.")
        if any(not 0 <= t < self.vocab for t in ids):
            raise GenerationError(f"request {rid}: token ids must lie in [0, {self.vocab}).")
        if self.max_len is not None and len(ids) >= self.max_len:
            raise GenerationError(
                f"request {rid}: the prompt is {len(ids)} tokens but the model's context window is "
                f"{self.max_len} (room is needed for at least one new token)."
            )
        if params.n > self.config.max_num_seqs:
            raise GenerationError(f"request {rid}: n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}.")
        total = len(ids) + params.max_new_tokens
        self.scheduler.check_fits(total if self.max_len is None else min(total, self.max_len))
        req = _Request(list(ids), params)
        self.requests[rid] = req
        self._start(rid, req, 0, list(ids), next(self._arrivals))
        self.scheduler.add(req.seqs[0])
        self.stats.prompt_tokens += len(ids)
        return rid

    def _start(self, rid: str, req: _Request, index: int, tokens: list[int], arrival: float) -> Sequence:
        seq = Sequence(
            seq_id=f"{rid}/{index}", request_id=rid, index=index, tokens=tokens, prompt_len=len(req.prompt_ids),
            params=req.params, arrival=arrival, generator=make_generator(req.params.seed, index, self.device),
        )
        req.seqs[index] = seq
        room = None if self.max_len is None else self.max_len - len(req.prompt_ids)
        req.streams[index] = DecodeStream(req.params, self.token_bytes, self.tokenizer.eos_id, room=room)
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks."""
        req = self.requests.get(request_id)
        if req is None:
            raise GenerationError(f"no request with id {request_id!r}.")
        for seq in req.seqs.values():
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")
        req.params = dataclasses.replace(req.params, n=len(req.seqs))  # no more forks

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def result(self, request_id: str) -> RequestResult:
        """The completions of a finished request (and forget it)."""
        req = self.requests[request_id]
        if not req.finished:
            raise GenerationError(f"request {request_id!r} has not finished.")
        del self.requests[request_id]
        completions = [
            Completion(req.streams[i].text, req.seqs[i].output_ids, req.seqs[i].finish_reason or "length")
            for i in sorted(req.seqs)
        ]
        return RequestResult(request_id, req.prompt_ids, completions)

    # ---------------------------------------------------------------------------------- stepping

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return what every completion that advanced produced."""
        sched = self.scheduler.schedule()
        if not sched.work:
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
        st = self.stats
        st.steps += 1
        st.computed_tokens += sched.num_tokens
        st.blocks_allocated = self.scheduler.pool.num_allocations
        st.peak_blocks = max(st.peak_blocks, self.scheduler.config.num_blocks - self.scheduler.pool.num_free)
        self.scheduler.after_step(sched)
        if not ready:
            return []
        index = [batch.last_index[i] for i in ready]
        index += [index[0]] * (MIN_ROWS - len(index))  # as in PagedBatch: small products take other kernels
        logits = self.model.lm_head(hidden[0, index])[: len(ready), : self.vocab].float()  # (R, V)
        self.last_logits = {sched.work[i][0].seq_id: logits[r] for r, i in enumerate(ready)}
        greedy = logits.argmax(dim=-1).tolist()
        outputs: list[RequestOutput] = []
        for r, i in enumerate(ready):
            seq = sched.work[i][0]
            req = self.requests[seq.request_id]
            if req.params.n > 1 and not seq.forked and seq.index == 0:
                seq.forked = True  # split the other completions off now that the prompt is cached
                for j in range(1, req.params.n):
                    child = self._start(seq.request_id, req, j, list(seq.tokens), seq.arrival + j / (req.params.n + 1))
                    child.num_computed = seq.num_computed
                    self.scheduler.fork(seq, child)
                    outputs.append(self._accept(child, req, self._pick(logits[r], greedy[r], child)))
            outputs.append(self._accept(seq, req, self._pick(logits[r], greedy[r], seq)))
        return outputs

    @staticmethod
    def _pick(logits: Tensor, greedy: int, seq: Sequence) -> int:
        if seq.params.greedy:
            return greedy
        return int(sample_next(logits[None], seq.params, [seq.generator])[0])

    def _accept(self, seq: Sequence, req: _Request, token: int) -> RequestOutput:
        """Hand a sampled token to the completion's decode stream; keep it unless it ended the
        completion as end-of-sequence, and finish the sequence when the stream says so."""
        piece, reason = req.streams[seq.index].accept(token)
        new = [] if reason == "eos" else [token]
        seq.tokens += new
        self.stats.generated_tokens += len(new)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return RequestOutput(seq.request_id, seq.index, piece, new, reason is not None, reason)

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
        done: set[str] = set()
        while self.has_unfinished():
            outs = self.step()
            if bar is not None:
                for o in outs:
                    if o.finished and o.request_id not in done and self.requests[o.request_id].finished:
                        done.add(o.request_id)
                        bar.update(1)
                rate = (self.stats.generated_tokens - generated) / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{rate:.1f}", running=len(self.scheduler.running), refresh=False)
        if bar is not None:
            bar.close()
        return [self.result(i) for i in ids]

    # ------------------------------------------------------------------------------ introspection

    def kv_usage(self) -> tuple[int, int]:
        """(slots holding a cached token, slots in allocated blocks) right now; shared blocks count once."""
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
        return self.scheduler.kv.live_blocks(f"{request_id}/{index}")
