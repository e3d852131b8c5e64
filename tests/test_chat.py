"""Chat keeps one KV cache across turns: replies equal re-encoding the transcript, at a fraction of the work."""

from __future__ import annotations

import pytest
import torch

from triform.config import get_preset
from triform.errors import GenerationError
from triform.inference.chat import ChatSession, render_chat
from triform.inference.sampling import SamplingParams
from triform.models.decoder import DecoderLM
from triform.tokenizers import ByteTokenizer


def _model() -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(get_preset("llama3-8b-tiny").replace(max_seq_len=512)).eval()
    # An untrained model babbles arbitrary bytes; keep it to printable ASCII, as a trained one would
    # write valid text that re-encodes to the same tokens.
    penalty = torch.full((model.cfg.vocab_size,), -1e4)
    penalty[32:127] = 0.0
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + penalty)
    return model


def test_cached_turns_equal_fresh_transcripts() -> None:
    model, tok = _model(), ByteTokenizer()
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    session = ChatSession(model, tok, params, system="be brief")
    for turn, text in enumerate(["hello there", "what is the weather", "and tomorrow?"]):
        history = list(session.messages)
        answer = session.reply(text)
        fresh = ChatSession(model, tok, params)
        fresh.messages = history  # the same conversation so far, but an empty cache
        assert fresh.reply(text) == answer
        assert fresh.last.reused_tokens == 0
        if turn > 0:
            # Only the new message (and the template around it) was computed this turn.
            assert session.last.reused_tokens > 0
            assert session.last.new_tokens < fresh.last.new_tokens / 2


def test_plain_transcript_format() -> None:
    prompt, stops = render_chat(ByteTokenizer(), [{"role": "user", "content": "hi"}])
    assert prompt == "user: hi\nassistant: " and stops == ("\nuser:",)


def test_conversation_longer_than_context() -> None:
    session = ChatSession(_model(), ByteTokenizer(), SamplingParams(temperature=0.0, max_new_tokens=4))
    with pytest.raises(GenerationError, match="context window of 512"):
        session.reply("x" * 600)
    assert session.messages == []  # the rejected message is not kept
