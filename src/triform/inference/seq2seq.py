"""Generation with an encoder-decoder: the encoder runs once per request, cross-attention keys/values
are computed once and kept, and the decoder steps one token at a time against its KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from triform.errors import GenerationError
from triform.inference.sampling import SamplingParams, sample_next
from triform.models.encoder_decoder import Seq2Seq


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
    on_token: Callable[[int, int], bool | None] | None = None,
) -> list[list[int]]:
    """Target token ids per source row (B, S), up to and without the end-of-sequence token;
    greedy when ``params.temperature == 0``. ``on_token(row, id)`` sees each token as it is chosen and
    may return True to end that row."""
    params = params or SamplingParams(temperature=0.0)
    _check_source(source, source_mask)
    check_lengths(model, source.shape[1], params.max_new_tokens)
    model.eval()
    cfg = model.cfg
    b, dev = source.shape[0], source.device
    memory = model.encode(source, source_mask)
    cache = model.new_cache(b, params.max_new_tokens + 1)
    cross: dict = {}
    gens = [None if params.seed is None else torch.Generator(device=dev).manual_seed(params.seed) for _ in range(b)]
    token = torch.full((b, 1), cfg.decoder_start_id, dtype=torch.long, device=dev)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for _ in range(params.max_new_tokens):
        logits = model.decode(token, memory, source_mask, cache=cache, memory_cache=cross)[:, -1]  # (B, V)
        nxt = sample_next(logits, params, gens)
        for i in range(b):
            if done[i]:
                continue
            t = int(nxt[i])
            if t == cfg.eos_id and not params.ignore_eos:
                done[i] = True
            else:
                out[i].append(t)
                if on_token is not None and on_token(i, t):
                    done[i] = True  # the caller stops this row (a stop string)
        if all(done):
            break
        token = torch.where(torch.tensor(done, device=dev), torch.full_like(nxt, cfg.pad_id), nxt)[:, None]
    return out


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
