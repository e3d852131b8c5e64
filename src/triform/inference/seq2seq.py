"""Generation with an encoder-decoder: the encoder runs once per request, cross-attention keys/values
are computed once and kept, and the decoder steps one token at a time against its KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from triform.errors import GenerationError
from triform.inference.sampling import SamplingParams, sample_next
from triform.models.encoder_decoder import Seq2Seq


@torch.inference_mode()
def seq2seq_generate(
    model: Seq2Seq, source: Tensor, source_mask: Tensor | None = None, *, params: SamplingParams | None = None,
) -> list[list[int]]:
    """Target token ids per source row (B, S), up to and without the end-of-sequence token;
    greedy when ``params.temperature == 0``."""
    params = params or SamplingParams(temperature=0.0)
    if source.shape[1] == 0 or (source_mask is not None and bool((source_mask.sum(dim=1) == 0).any())):
        raise GenerationError("empty source: every input needs at least one token.")
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
        if all(done):
            break
        token = torch.where(torch.tensor(done, device=dev), torch.full_like(nxt, cfg.pad_id), nxt)[:, None]
    return out
