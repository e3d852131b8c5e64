"""Multi-turn chat that keeps one KV cache for the whole conversation.

Each turn renders the transcript with the tokenizer's chat template, finds how many of its tokens
the cache already holds (the longest common prefix), and runs only the rest. A decoder-only model
therefore pays for each new message once, instead of re-encoding the transcript every turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from triform.errors import GenerationError
from triform.inference.decode import DecodeStream, make_generator
from triform.inference.sampling import SamplingParams, sample_next
from triform.layers.cache import ContiguousKVCache
from triform.models.decoder import DecoderLM
from triform.tokenizers.base import Tokenizer

PLAIN_STOP = "\nuser:"


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # surrogateescape: bytes that were not UTF-8 on stdin reach a byte-level tokenizer unchanged
    return tokenizer.encode(text.encode("utf-8", errors="surrogateescape"))


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[str, tuple[str, ...]]:
    """The prompt text for ``messages`` plus the assistant's cue, and extra stop strings.

    Tokenizers with a chat template (instruct models) use it; others get a plain ``role: text`` transcript.
    """
    template = getattr(tokenizer, "apply_chat_template", None)
    if template is not None and getattr(tokenizer, "chat_template", None):
        return template(messages, add_generation_prompt=True), ()
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return lines + "assistant: ", (PLAIN_STOP,)


@dataclass
class TurnStats:
    """How much of a turn's prompt came from the cache and how much had to be computed."""

    prompt_tokens: int
    reused_tokens: int
    new_tokens: int
    generated_tokens: int


class ChatSession:
    """A conversation with ``model``; ``reply(text)`` returns the assistant's answer. Its tensors and
    its random generator (one for the whole conversation, seeded by ``params.seed`` as completion 0)
    live on the model's device."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer, params: SamplingParams, *, system: str | None = None) -> None:
        self.model, self.tokenizer, self.params = model.eval(), tokenizer, params
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.context = model.cfg.stack.max_seq_len
        self.cache = model.new_cache(1, self.context)
        if not isinstance(self.cache, ContiguousKVCache):
            raise GenerationError("chat needs a model whose cache can hold the whole conversation (no sliding window).")
        self.ids: list[int] = []  # the tokens whose keys/values the cache holds, in order
        self.device = model.tok_emb.weight.device
        self.generator = make_generator(params.seed, 0, self.device)
        self.last: TurnStats | None = None

    @torch.inference_mode()
    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the answer (streamed to ``on_text``) and remember both."""
        self.messages.append({"role": "user", "content": text})
        prompt, stops = render_chat(self.tokenizer, self.messages)
        ids = _encode(self.tokenizer, prompt)
        if len(ids) >= self.context:
            self.messages.pop()
            raise GenerationError(f"the conversation is {len(ids)} tokens, beyond the context window of {self.context}.")
        keep = 0
        while keep < min(len(ids) - 1, len(self.ids)) and ids[keep] == self.ids[keep]:
            keep += 1
        self.cache.truncate(keep)
        self.ids = ids[:keep]
        fresh = torch.tensor([ids[keep:]], device=self.device)  # (1, T): only what the cache lacks
        logits = self.model(fresh, cache=self.cache, last_only=True)[:, -1]  # (1, V)
        self.ids += ids[keep:]
        stream = DecodeStream(
            self.params, self.tokenizer.token_bytes(), self.tokenizer.eos_id, extra_stop=stops,
            room=self.context - len(self.ids),
        )
        while True:
            token = int(sample_next(logits[:, : self.tokenizer.vocab_size], self.params, [self.generator])[0])
            piece, reason = stream.accept(token)
            if piece and on_text:
                on_text(piece)
            if reason is not None:
                break
            logits = self.model(torch.tensor([[token]], device=self.device), cache=self.cache)[:, -1]
            self.ids.append(token)
        answer = stream.text
        self.messages.append({"role": "assistant", "content": answer})  # verbatim, so it re-encodes to the cached tokens
        self.last = TurnStats(len(ids), keep, len(ids) - keep, len(stream.token_ids))
        return answer


class Seq2SeqChatSession:
    """A conversation with an encoder-decoder model. Its decoder cannot continue the transcript: each
    turn the encoder reads the whole transcript again (``TurnStats.new_tokens`` grows every turn,
    ``reused_tokens`` is always 0) and the decoder writes the reply from a fresh cache.
    ``mode_id`` (a UL2 mode token) is put in front of every source."""

    def __init__(self, model, tokenizer: Tokenizer, params: SamplingParams, *, system: str | None = None,
                 mode_id: int | None = None) -> None:
        self.model, self.tokenizer, self.params, self.mode_id = model.eval(), tokenizer, params, mode_id
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.limit = model.cfg.encoder.max_seq_len
        self.last: TurnStats | None = None

    @torch.inference_mode()
    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the answer (streamed to ``on_text``) and remember both."""
        from triform.inference.seq2seq import seq2seq_complete

        self.messages.append({"role": "user", "content": text})
        prompt, stops = render_chat(self.tokenizer, self.messages)
        mode = [self.mode_id] if self.mode_id is not None else []
        ids = mode + _encode(self.tokenizer, prompt) + [self.model.cfg.eos_id]
        if len(ids) > self.limit:
            self.messages.pop()
            raise GenerationError(f"the conversation is {len(ids)} tokens, beyond the encoder's limit of {self.limit}.")
        source = torch.tensor([ids], device=self.model.shared.weight.device)  # (1, S)
        show = None if on_text is None else (lambda _, piece: on_text(piece))
        out = seq2seq_complete(
            self.model, self.tokenizer, source, params=self.params, extra_stop=stops, on_text=show,
        )[0]
        self.messages.append({"role": "assistant", "content": out.text})
        self.last = TurnStats(len(ids), 0, len(ids), len(out.token_ids))
        return out.text
