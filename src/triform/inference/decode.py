"""The decoding rules every generator shares: when a completion ends, and what text it may show.

A :class:`DecodeStream` follows one completion token by token. It turns token ids into text
incrementally, holding back only the bytes that could still be the start of a stop string or of an
incomplete UTF-8 character, and applies the finishing rules in this order:

1. the end-of-sequence token ends it with ``"eos"`` (and is not kept), unless ``ignore_eos``;
2. a stop string ends it with ``"stop"``; the text is cut just before the stop string;
3. ``max_new_tokens`` kept tokens, or no room left in the context window, end it with ``"length"``.

:func:`generate`, the engine, both chat sessions and :func:`seq2seq_generate` all decode through it,
so a prompt finishes the same way and shows the same text whichever of them runs it.

Seeding rule: completion ``j`` (0-based) of a request with seed ``s`` samples from
``torch.Generator(device=<the model's device>).manual_seed((s + j * 0x9E3779B97F4A7C15) % 2**64)``
(the increment is 2^64 divided by the golden ratio, so the completions of requests with nearby seeds
do not collide). Completion 0 therefore uses ``s`` itself (taken modulo 2^64, which torch treats the
same), which is what :func:`generate` uses for every prompt, so one seed gives one stream of tokens
through ``generate()``, the engine and chat, whatever else is in the batch. Seed ``None`` gives no
generator: sampling then draws from torch's default generator for the device and is not
reproducible per request.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from triform.errors import GenerationError
from triform.inference.sampling import SamplingParams

SEED_STRIDE = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Weyl-sequence step between completions


@dataclass
class Completion:
    """One completion's result: generated text and ids, and why it stopped ("stop", "eos", "length",
    or "abort" in the engine)."""

    text: str
    token_ids: list[int]
    finish_reason: str


def make_generator(seed: int | None, index: int, device: torch.device | str) -> torch.Generator | None:
    """The random generator of completion ``index`` of a request seeded with ``seed``, on ``device``
    (the model's): seeded with ``(seed + index * SEED_STRIDE) % 2**64`` as the module docstring
    describes, or None (torch's default generator, not reproducible) when ``seed`` is None."""
    if seed is None:
        return None
    if isinstance(index, bool) or index < 0:
        raise GenerationError(f"completion index must be a non-negative integer, got {index!r}.")
    return torch.Generator(device=device).manual_seed((seed + index * SEED_STRIDE) % 2**64)


class DecodeStream:
    """One completion being decoded: its kept token ids, its text, and the finishing rules.

    ``token_bytes[i]`` is the exact bytes of token ``i`` (ids past its end, such as an
    encoder-decoder's extra vocabulary, show nothing); ``eos_id`` ends the completion unless
    ``params.ignore_eos``; the stop strings are ``params.stop`` plus ``extra_stop`` (a chat template's
    own); ``room``, when given, is how many new tokens still fit in the context window, and caps
    ``params.max_new_tokens``.
    """

    def __init__(
        self, params: SamplingParams, token_bytes: Sequence[bytes], eos_id: int | None, *,
        extra_stop: tuple[str, ...] = (), room: int | None = None,
    ) -> None:
        if room is not None and room < 1:
            raise GenerationError(f"no room is left in the context window for a new token (room={room}).")
        self.token_bytes = token_bytes
        self.eos_id = None if params.ignore_eos else eos_id
        self.max_tokens = params.max_new_tokens if room is None else min(params.max_new_tokens, room)
        # surrogateescape: a stop string typed with invalid UTF-8 on a command line matches those bytes
        self.stops = [s.encode("utf-8", errors="surrogateescape") for s in params.stop + tuple(extra_stop)]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.data = bytearray()  # every byte of the completion so far (cut at a stop string)
        self.shown = 0  # bytes of `data` already handed to the UTF-8 decoder
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def text(self) -> str:
        """The completion's whole text so far (invalid UTF-8 shown as U+FFFD)."""
        return self.data.decode("utf-8", errors="replace")

    def accept(self, token: int) -> tuple[str, str | None]:
        """Take the next sampled token and return (text now safe to show, finish reason or None).
        An end-of-sequence token that ends the completion is not kept in ``token_ids``; once a finish
        reason is returned the completion is over and every held-back byte has been shown."""
        if self.finish_reason is not None:
            raise GenerationError(f"this completion has already finished ({self.finish_reason}).")
        if token == self.eos_id:
            return self._finish("eos")
        self.token_ids.append(token)
        start = max(0, len(self.data) - self.longest + 1)  # a new match must end in the new bytes
        self.data += self.token_bytes[token] if 0 <= token < len(self.token_bytes) else b""
        hits = [i for s in self.stops if (i := self.data.find(s, start)) >= 0]
        if hits:
            del self.data[min(hits) :]
            return self._finish("stop")
        if len(self.token_ids) >= self.max_tokens:
            return self._finish("length")
        return self._show(len(self.data) - self._held()), None

    def abort(self) -> str:
        """End the completion early with ``"abort"`` (the engine's abort) and return the text still
        held back, so the pieces shown add up to ``text``."""
        if self.finish_reason is not None:
            raise GenerationError(f"this completion has already finished ({self.finish_reason}).")
        return self._finish("abort")[0]

    def _held(self) -> int:
        """Length of the longest unshown tail of the bytes that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(self.data) - self.shown), 0, -1):
            tail = bytes(self.data[-k:])
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _show(self, upto: int, *, final: bool = False) -> str:
        chunk = bytes(self.data[self.shown : upto])
        self.shown = upto
        return self._utf8.decode(chunk, final=final)

    def _finish(self, reason: str) -> tuple[str, str]:
        self.finish_reason = reason
        return self._show(len(self.data), final=True), reason


def accept_rows(
    streams: Sequence[DecodeStream], tokens: Tensor, on_text: Callable[[int, str], None] | None = None,
) -> list[bool]:
    """Hand row ``i`` of ``tokens`` (B,) to ``streams[i]``, skipping rows that have finished, and pass
    the text each shows to ``on_text(i, piece)``; return which rows are still running."""
    for i, (stream, token) in enumerate(zip(streams, tokens.tolist())):
        if stream.finish_reason is None:
            piece, _ = stream.accept(token)
            if piece and on_text is not None:
                on_text(i, piece)
    return [s.finish_reason is None for s in streams]
