"""Batched autoregressive generation with a KV cache: left-padded prefill, then one token per step.

The prefill / decode split follows gpt-fast: the prompt is run once to fill the cache, then each step
feeds only the newest token with its explicit position. Finished rows keep their slot (fed padding)
until every row is done. Each row's tokens go through a ``DecodeStream`` (``decode.py``), which
applies the EOS / stop-string / length rules and streams text as soon as it is safe to show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from triform.errors import GenerationError
from triform.inference.decode import Completion, DecodeStream, accept_rows, make_generator
from triform.inference.sampling import SamplingParams, sample_next
from triform.models.decoder import DecoderLM
from triform.tokenizers.base import Tokenizer


def encode_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str | bytes | list[int]], context: int, *, truncate: bool = False,
) -> list[list[int]]:
    """Token ids per prompt (a list of ids is taken as it is); a prompt that leaves no room in the
    context window is an error unless ``truncate`` keeps its last ``context - 1`` tokens."""
    out = []
    for i, p in enumerate(prompts):
        ids = list(p) if isinstance(p, list) else tokenizer.encode(p)
        if not ids:
            raise GenerationError(f"prompt {i + 1} is empty; give at least one character.")
        if len(ids) >= context:
            if not truncate:
                raise GenerationError(
                    f"prompt {i + 1} is {len(ids)} tokens but the model's context window is {context} "
                    f"(room is needed for at least one new token); shorten it or pass --truncate."
                )
            ids = ids[-(context - 1) :]
        out.append(ids)
    return out


@torch.inference_mode()
def generate(
    model: DecoderLM, tokenizer: Tokenizer, prompts: Sequence[str | bytes | list[int]], params: SamplingParams, *,
    use_cache: bool = True, truncate: bool = False, on_text: Callable[[int, str], None] | None = None,
    prefix_lm: bool = False,
) -> list[Completion]:
    """Continue each prompt; ``on_text(row, piece)`` receives text as soon as it is safe to show.
    With ``prefix_lm`` the prompt is read bidirectionally (a model trained as a prefix-LM, e.g. UL2)."""
    if params.n != 1:
        raise GenerationError("n > 1 completions per prompt need the engine (triform.inference.engine).")
    model.eval()
    context = model.cfg.stack.max_seq_len
    ids = encode_prompts(tokenizer, prompts, context, truncate=truncate)
    device = model.tok_emb.weight.device
    b, longest = len(ids), max(len(x) for x in ids)
    max_new = params.max_new_tokens
    # Past the context window, a model with relative positions (RoPE, ALiBi, none) keeps a rolling
    # cache of the last context-1 tokens, so every query still sees exactly `context` tokens;
    # a model with absolute positions re-encodes the last `context` tokens each step (nanoGPT's crop).
    beyond = longest + max_new > context
    relative = model.abs_pos is None
    tokens = torch.full((b, longest), tokenizer.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((b, longest), dtype=torch.bool, device=device)
    for i, row in enumerate(ids):  # left padding: every row's last prompt token sits in the last column
        tokens[i, longest - len(row) :] = torch.tensor(row, device=device)
        mask[i, longest - len(row) :] = True
    gens = [make_generator(params.seed, 0, device) for _ in ids]  # every prompt is completion 0 of its request
    token_bytes = tokenizer.token_bytes()
    streams = [DecodeStream(params, token_bytes, tokenizer.eos_id) for _ in ids]
    lengths = torch.tensor([len(r) for r in ids], device=device)
    use_cache = use_cache and (relative or not beyond)
    if prefix_lm and beyond:
        raise GenerationError(f"a prefix-LM prompt plus {max_new} new tokens must fit the context of {context} tokens.")
    prefix = lengths if prefix_lm else None
    cache = model.new_cache(b, longest + max_new, window=context - 1 if beyond else None) if use_cache else None
    vocab = tokenizer.vocab_size  # the model's output may be padded past the tokenizer's ids
    logits = model(tokens, attention_mask=mask, cache=cache, last_only=True, prefix_lengths=prefix)[:, -1]
    for step in range(max_new):
        nxt = sample_next(logits[:, :vocab], params, gens)  # (B,)
        running = accept_rows(streams, nxt, on_text)
        if not any(running):
            break
        nxt = torch.where(torch.tensor(running, device=device), nxt, tokenizer.pad_id)
        if use_cache:
            logits = model(nxt[:, None], positions=(lengths + step)[:, None], cache=cache)[:, -1]
        else:
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)[:, -context:]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)[:, -context:]
            logits = model(tokens, attention_mask=mask, last_only=True, prefix_lengths=prefix)[:, -1]
    return [Completion(s.text, s.token_ids, s.finish_reason or "length") for s in streams]
