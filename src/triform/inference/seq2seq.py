"""Generation with an encoder-decoder: the encoder runs once per request, cross-attention keys/values
are computed once and kept, and the decoder steps one token at a time against its KV cache. Sampled
tokens go through ``DecodeStream`` (``decode.py``), so EOS, stop strings and length end a row by the
same rules as every other generator."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from triform.errors import GenerationError
from triform.inference.decode import Completion, DecodeStream, accept_rows, make_generator
from triform.inference.sampling import SamplingParams, sample_next
from triform.models.encoder_decoder import Seq2Seq
from triform.tokenizers.base import Tokenizer


def _check_source(source: Tensor, source_mask: Tensor | None) -> None:
    if source.shape[1] == 0 or (source_mask is not None and bool((source_mask.sum(dim=1) == 0).any())):
        raise GenerationError("empty source: every input needs at least one token.")


def check_lengths(model: Seq2Seq, source_len: int, max_new_tokens: int) -> None:
    """A source longer than the encoder's limit, or a target longer than the decoder's, is an error."""
    e, d = model.cfg.encoder.max_seq_len, model.cfg.decoder.max_seq_len
    if source_len > e:
        raise GenerationError(f"the source is {source_len} tokens; the encoder takes at most {e}.")
    if max_new_tokens < 1 or max_new_tokens > d:
        raise GenerationError(f"the target may be 1 to {d} tokens (the decoder's limit), got max_new_tokens={max_new_tokens}.")


@torch.inference_mode()
def seq2seq_generate(
    model: Seq2Seq, source: Tensor, source_mask: Tensor | None = None, *, params: SamplingParams | None = None,
) -> list[list[int]]:
    """Target token ids per source row (B, S), up to and without the end-of-sequence token;
    greedy when ``params.temperature == 0`` (the default). Without a tokenizer there is no text, so
    stop strings do not apply; :func:`seq2seq_complete` has them."""
    params = params or SamplingParams(temperature=0.0)
    streams = [DecodeStream(params, (), model.cfg.eos_id) for _ in range(source.shape[0])]
    _decode(model, source, source_mask, params, streams, None)
    return [s.token_ids for s in streams]


@torch.inference_mode()
def seq2seq_complete(
    model: Seq2Seq, tokenizer: Tokenizer, source: Tensor, source_mask: Tensor | None = None, *,
    params: SamplingParams, extra_stop: tuple[str, ...] = (), on_text: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Text, ids and finish reason per source row (B, S), decoded with ``tokenizer``'s bytes; stop
    strings are ``params.stop`` plus ``extra_stop``, and ``on_text(row, piece)`` receives text as soon
    as it is safe to show."""
    token_bytes = tokenizer.token_bytes()
    streams = [
        DecodeStream(params, token_bytes, model.cfg.eos_id, extra_stop=extra_stop) for _ in range(source.shape[0])
    ]
    _decode(model, source, source_mask, params, streams, on_text)
    return [Completion(s.text, s.token_ids, s.finish_reason or "length") for s in streams]


def _decode(
    model: Seq2Seq, source: Tensor, source_mask: Tensor | None, params: SamplingParams,
    streams: list[DecodeStream], on_text: Callable[[int, str], None] | None,
) -> None:
    """Encode once, then step the decoder until every row's stream has finished."""
    _check_source(source, source_mask)
    check_lengths(model, source.shape[1], params.max_new_tokens)
    model.eval()
    cfg = model.cfg
    b, dev = source.shape[0], source.device
    memory = model.encode(source, source_mask)  # (B, S, d)
    cache = model.new_cache(b, params.max_new_tokens + 1)
    cross: dict = {}
    gens = [make_generator(params.seed, 0, dev) for _ in range(b)]  # every row is completion 0 of its request
    token = torch.full((b, 1), cfg.decoder_start_id, dtype=torch.long, device=dev)
    for _ in range(params.max_new_tokens):
        logits = model.decode(token, memory, source_mask, cache=cache, memory_cache=cross)[:, -1]  # (B, V)
        nxt = sample_next(logits, params, gens)  # (B,)
        running = accept_rows(streams, nxt, on_text)
        if not any(running):
            break
        token = torch.where(torch.tensor(running, device=dev), nxt, cfg.pad_id)[:, None]  # (B, 1)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, K, ...) indexed along dim 1 by idx (B, J) -> (B, J, ...)."""
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.gather(x, 1, idx.expand(*idx.shape[:2], *x.shape[2:]))


@torch.inference_mode()
def seq2seq_beam_search(
    model: Seq2Seq, source: Tensor, source_mask: Tensor | None = None, *, num_beams: int = 4, max_new_tokens: int = 64,
    length_penalty: float = 1.0, early_stopping: bool = False,
) -> list[list[int]]:
    """The best beam per source row, without start and end tokens.

    Each step keeps the 2·``num_beams`` best continuations of the live beams (by summed log-probability);
    those ending in the end-of-sequence token (or at ``max_new_tokens``) become finished hypotheses
    scored by summed log-probability / generated length ^ ``length_penalty``, the best ``num_beams`` of
    the rest stay live. The search stops when no live beam can beat the worst kept hypothesis (judged
    at the current length), or, with ``early_stopping``, once ``num_beams`` hypotheses are finished.
    These are the rules of Hugging Face's ``generate(num_beams=...)``, so outputs can be compared.
    """
    if isinstance(num_beams, bool) or num_beams < 1:
        raise GenerationError(f"beam width must be at least 1, got {num_beams}.")
    _check_source(source, source_mask)
    check_lengths(model, source.shape[1], max_new_tokens)
    model.eval()
    cfg = model.cfg
    b, k, dev = source.shape[0], num_beams, source.device
    memory = model.encode(source, source_mask).repeat_interleave(k, dim=0)  # (B·K, S, d)
    mask = source_mask.repeat_interleave(k, dim=0) if source_mask is not None else None
    cache = model.new_cache(b * k, max_new_tokens + 1)
    cross: dict = {}
    max_length, prompt = 1 + max_new_tokens, 1
    running = torch.full((b, k, max_length), cfg.pad_id, dtype=torch.long, device=dev)
    running[:, :, 0] = cfg.decoder_start_id
    finished = running.clone()
    running_scores = torch.zeros(b, k, device=dev)
    running_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    finished_scores = torch.full((b, k), -1e9, device=dev)
    is_finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    first_k = torch.arange(2 * k, device=dev) < k
    cur = 1
    tokens = running[:, :, 0].reshape(b * k, 1)
    while True:
        logits = model.decode(tokens, memory, mask, cache=cache, memory_cache=cross)[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1).view(b, k, -1) + running_scores[:, :, None]
        v = logp.shape[-1]
        top_lp, top_idx = torch.topk(logp.view(b, -1), 2 * k)  # (B, 2K)
        origin, tok = top_idx // v, top_idx % v
        top_seq = _gather(running, origin)
        top_seq[:, :, cur] = tok
        hits = (tok == cfg.eos_id) | (cur + 1 >= max_length)
        # live beams for the next step: the best K continuations that did not finish
        live_lp = top_lp + hits.float() * -1e9
        keep = torch.topk(live_lp, k).indices
        running, running_scores, parent = _gather(top_seq, keep), _gather(live_lp, keep), _gather(origin, keep)
        # finished hypotheses: merge the newly finished (among the top K) with the kept ones
        just = hits & first_k[None, :]
        scored = top_lp / ((cur + 1 - prompt) ** length_penalty)
        scored = scored + (is_finished.all(dim=-1, keepdim=True) & early_stopping).float() * -1e9
        scored = scored + (~improvable).float() * -1e9 + (~just).float() * -1e9
        merged_scores = torch.cat([finished_scores, scored], dim=1)
        best = torch.topk(merged_scores, k).indices
        finished = _gather(torch.cat([finished, top_seq], dim=1), best)
        finished_scores = _gather(merged_scores, best)
        is_finished = _gather(torch.cat([is_finished, just], dim=1), best)
        # reorder the decoder cache to follow each live beam's parent
        flat = (parent + torch.arange(b, device=dev)[:, None] * k).reshape(-1)
        cache.k = cache.k[:, flat]
        cache.v = cache.v[:, flat]
        cur += 1
        best_running = running_scores[:, :1] / ((cur - prompt) ** length_penalty)
        worst_kept = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, torch.tensor(-1e9, device=dev))
        improvable = improvable & (best_running > worst_kept).any(dim=-1, keepdim=True)
        open_beam = not (bool(is_finished.all()) and early_stopping)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break
        tokens = running[:, :, cur - 1].reshape(b * k, 1)
    out = []
    for row in finished[:, 0].tolist():
        row = row[1:]
        out.append(row[: row.index(cfg.eos_id)] if cfg.eos_id in row else [t for t in row])
    return out


def mode_token_id(tokenizer: Tokenizer, mode: str | None) -> int | None:
    """The id of UL2 mode token ``mode`` (R, X, S or the token itself), or None without a mode."""
    if mode is None:
        return None
    from triform.objectives.ul2 import MODE_TOKENS

    name = MODE_TOKENS.get(mode.upper(), mode)
    if name not in MODE_TOKENS.values():
        raise GenerationError(f"unknown UL2 mode {mode!r}; choose R ([NLU]), X ([NLG]) or S ([S2S]).")
    if name not in getattr(tokenizer, "specials", ()):
        raise GenerationError(f"this model's vocabulary has no {name} token (it was not trained with --objective ul2).")
    return tokenizer.special_id(name)


def source_ids(tokenizer: Tokenizer, text: bytes, mode_id: int | None, eos_id: int, *, index: int = 0) -> list[int]:
    """A prompt as the model read its inputs in training (T5's convention): the UL2 mode token if any,
    the text (sentinels such as ``<extra_id_0>`` written in it become those tokens for byte-level
    tokenizers), then </s>. An encoder-decoder's source, or a prefix-LM decoder's prefix."""
    from triform.tokenizers.byte import ByteTokenizer, encode_with_specials

    ids = encode_with_specials(tokenizer, text) if isinstance(tokenizer, ByteTokenizer) else tokenizer.encode(text)
    if not ids:
        raise GenerationError(f"prompt {index + 1} is empty; give at least one character.")
    return ([mode_id] if mode_id is not None else []) + ids + [eos_id]


def render_target(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Generated target ids as text, with sentinels and mode tokens written by name."""
    from triform.tokenizers.byte import ByteTokenizer, render_with_specials

    return render_with_specials(tokenizer, ids) if isinstance(tokenizer, ByteTokenizer) else tokenizer.decode(ids)
