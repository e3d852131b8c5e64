"""The playground page (``GET /``) in headless Chromium against live servers on the trained fixture:
one offline file; a streamed completion equal to the server's greedy answer, with live stats;
Stop aborting the request on the server (which frees its blocks); the API key sent as a Bearer
token and kept across reloads; errors shown in the page. The byte-level fixture has no chat
template, so the page offers it completion mode only; a conversation in chat mode runs against the
same weights served with a byte tokenizer that has a template."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_utils import HANG, metrics, serve_in_thread, small_app, wait_for_metrics

from triform.inference.async_engine import AsyncEngine
from triform.inference.core import EngineConfig
from triform.interop import load_pretrained
from triform.serve import build_app
from triform.serve.app import STATIC
from triform.tokenizers.byte import ByteTokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PROMPT = "KING:\nThe "
MAX_TOKENS = 24
PAGE_IDS = ("prompt", "send", "stop", "mode", "temperature", "top-p", "max-tokens", "output", "tps", "kv",
            "ttft", "running", "api-key", "system", "model", "error", "status")


class ChatBytes(ByteTokenizer):
    """The byte tokenizer with a chat template: one line per turn, then the corpus's speaker cue."""

    chat_template = "role initial, '> ', content; then KING:"  # the server asks only whether there is one

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        turns = "".join(f"{m['role'][0]}> {m['content']}\n" for m in messages)
        return turns + ("KING:\n" if add_generation_prompt else "")


class Gate:
    """Holds the engine core before a step once it has generated ``tokens`` more tokens, until
    ``release()``: a request then stays running, in a known state, for as long as a test needs."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.opened = threading.Event()
        self.opened.set()
        self.holding = threading.Event()
        self._limit = 0
        step = core.step

        def gated() -> Any:
            if not self.opened.is_set() and core.stats().generated_tokens >= self._limit:
                self.holding.set()
                assert self.opened.wait(HANG), "the gate was never released"
            return step()

        core.step = gated  # runs on the core thread, like the step it wraps

    def arm(self, tokens: int) -> None:
        self._limit = self.core.stats().generated_tokens + tokens
        self.holding.clear()
        self.opened.clear()

    def release(self) -> None:
        self.opened.set()


@pytest.fixture(scope="module")
def server(trained_run: Path) -> Iterator[tuple[str, Gate]]:
    app = small_app(trained_run, model_name="tiny")
    gate = Gate(app.state.server.engine.core)
    with serve_in_thread(app) as url:
        try:
            yield url, gate
        finally:
            gate.release()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # no skip: `make test` installs Debian's chromium and chromium-driver, and this test must run
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), "install Chromium: apt-get install chromium chromium-driver"
    mp = pytest.MonkeyPatch()
    mp.setenv("SE_OFFLINE", "true")  # Selenium Manager: never look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    drv = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield drv
    finally:
        drv.quit()
        mp.undo()


def _wait(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, HANG, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}; status: {_text(driver, 'status')!r}, "
                             f"error: {_text(driver, 'error')!r}") from None


def _text(driver: Any, element_id: str) -> str:
    """An element's text exactly as it is in the DOM (newlines and spaces kept)."""
    return driver.execute_script("return document.getElementById(arguments[0]).textContent;", element_id)


def _state(driver: Any) -> str:
    return driver.execute_script("return document.body.dataset.state;")


def _open(driver: Any, url: str) -> None:
    """Load the page with nothing remembered from an earlier test, and wait until it has polled
    the server once."""
    driver.get(url + "/")
    driver.execute_script("localStorage.clear();")
    driver.refresh()
    _wait(driver, lambda d: re.fullmatch(r"\d+\.\d%", _text(d, "kv")), "the KV-cache usage")


def _fill(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(value)


def _completion_mode(driver: Any) -> None:
    """Wait until the page has found that the model has no chat template (the chat option is off
    and completion mode chosen), then set greedy sampling with ``MAX_TOKENS`` new tokens."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _wait(driver, lambda d: not d.find_element(By.CSS_SELECTOR, '#mode option[value="chat"]').is_enabled(),
          "chat mode turned off for a model without a chat template")
    mode = Select(driver.find_element(By.ID, "mode"))
    mode.select_by_value("completion")
    assert mode.first_selected_option.get_attribute("value") == "completion"
    _fill(driver, "temperature", "0")
    _fill(driver, "top-p", "1")
    _fill(driver, "max-tokens", str(MAX_TOKENS))


def _send(driver: Any, prompt: str) -> None:
    from selenium.webdriver.common.by import By

    _fill(driver, "prompt", prompt)
    driver.find_element(By.ID, "send").click()


def _greedy(url: str, prompt: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The server's non-streamed greedy completion of ``prompt`` with the page's settings."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "top_p": 1}
    resp = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=HANG)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_the_page_is_one_offline_file() -> None:
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "url(" not in page and "@import" not in page
    assert not re.search(r"<(script|link|img|iframe)[^>]*\ssrc=", page)
    links = re.findall(r"""\shref\s*=\s*["']([^"']*)""", page)
    assert links == ["data:,"]  # the empty favicon, so the browser asks the server for nothing else
    for element_id in PAGE_IDS:
        assert page.count(f'id="{element_id}"') == 1, element_id


def test_a_streamed_completion_in_chromium_equals_the_greedy_answer(
    server: tuple[str, Gate], driver: Any, tmp_path: Path,
) -> None:
    from PIL import Image

    url, _ = server
    served = httpx.get(url + "/", timeout=HANG)
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/html")
    assert served.text == (STATIC / "index.html").read_text(encoding="utf-8")
    no_template = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=HANG)
    assert no_template.status_code == 400 and no_template.json()["error"]["code"] == "no_chat_template"
    expected = _greedy(url, PROMPT)
    text = expected["choices"][0]["text"]
    assert text and expected["usage"]["completion_tokens"] == MAX_TOKENS

    _open(driver, url)
    assert driver.title == "triform playground"
    assert driver.execute_script("return document.getElementById('model').value;") == "tiny"
    _completion_mode(driver)
    _send(driver, PROMPT)
    _wait(driver, lambda d: _text(d, "output"), "streamed text")
    _wait(driver, lambda d: _state(d) != "streaming", "the end of the generation")
    assert _state(driver) == "done", _text(driver, "error")
    assert _text(driver, "output") == text
    assert _text(driver, "output-prompt") == PROMPT
    assert _text(driver, "tokens") == str(MAX_TOKENS)  # from the usage chunk of the stream
    tps, ttft = float(_text(driver, "tps")), float(_text(driver, "ttft"))
    assert math.isfinite(tps) and tps > 0 and math.isfinite(ttft) and ttft >= 0
    assert re.fullmatch(r"\d+\.\d%", _text(driver, "kv"))
    assert _text(driver, "status").startswith(f"Finished: {MAX_TOKENS} tokens")
    assert driver.execute_script("return document.getElementById('stop').disabled;") is True

    shot = tmp_path / "playground.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size[0] >= 1000 and im.size[1] >= 700
        grey = im.convert("L")
        low, high = grey.getextrema()
        assert high - low > 100 and len(grey.getcolors(maxcolors=256) or []) > 20  # text on a page, not one colour


def test_stop_aborts_the_request_on_the_server(server: tuple[str, Gate], driver: Any) -> None:
    from selenium.webdriver.common.by import By

    url, gate = server
    full = _greedy(url, PROMPT)["choices"][0]["text"]
    before = metrics(url)
    _open(driver, url)
    _completion_mode(driver)
    gate.arm(tokens=5)  # the core holds after five tokens, so the request is running when Stop comes
    _send(driver, PROMPT)
    assert gate.holding.wait(HANG)
    # the page's poll of /metrics shows the request running and its KV blocks held
    _wait(driver, lambda d: _text(d, "running") == "1" and _text(d, "kv") != "0.0%", "the running request")
    _wait(driver, lambda d: len(_text(d, "output")) >= 4, "the first tokens")
    stop = driver.find_element(By.ID, "stop")
    assert stop.is_enabled() and not driver.find_element(By.ID, "send").is_enabled()
    stop.click()
    _wait(driver, lambda d: _state(d) == "stopped", "the stopped state")
    partial = _text(driver, "output")
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert _text(driver, "status").startswith("Stopped after")
    key = 'triform_requests_total{status="499"}'
    wait_for_metrics(url, lambda m: m.get(key, 0) == before.get(key, 0) + 1, "the disconnect to be counted")
    gate.release()
    idle = wait_for_metrics(url, lambda m: m["triform_requests_running"] == 0 and m["triform_kv_blocks_used"] == 0,
                            "the aborted request to free its blocks")
    assert idle["triform_requests_waiting"] == 0
    _wait(driver, lambda d: _text(d, "running") == "0" and _text(d, "kv") == "0.0%", "the server idle again")


def test_the_api_key_is_sent_and_kept_and_errors_are_shown(trained_run: Path, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    with serve_in_thread(small_app(trained_run, model_name="tiny", api_key="s3cret")) as url:
        expected = _greedy(url, PROMPT, headers={"Authorization": "Bearer s3cret"})["choices"][0]["text"]
        _open(driver, url)  # /metrics stays open without the key
        _fill(driver, "temperature", "0")
        _fill(driver, "top-p", "1")
        _fill(driver, "max-tokens", str(MAX_TOKENS))
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "mode")).select_by_value("completion")
        _send(driver, PROMPT)
        _wait(driver, lambda d: _state(d) == "error", "the refusal without a key")
        assert driver.find_element(By.ID, "error").is_displayed()
        assert "API key is required" in _text(driver, "error")

        _fill(driver, "api-key", "s3cret")
        driver.find_element(By.ID, "prompt").click()  # leaving the field stores the key
        driver.refresh()
        _wait(driver, lambda d: d.execute_script("return document.getElementById('api-key').value;") == "s3cret",
              "the key remembered across a reload")
        _completion_mode(driver)  # with the key the page can ask whether the model has a chat template
        _send(driver, PROMPT)
        _wait(driver, lambda d: _state(d) != "streaming", "the end of the generation")
        assert _state(driver) == "done", _text(driver, "error")
        assert _text(driver, "output") == expected
        assert not driver.find_element(By.ID, "error").is_displayed()

        _send(driver, "x" * 80)  # longer than the model's 64-token context
        _wait(driver, lambda d: _state(d) == "error", "the refusal of a prompt longer than the context")
        assert "context is 64 tokens" in _text(driver, "error")
        assert driver.find_element(By.ID, "error").is_displayed()
        assert _text(driver, "output") == ""
        assert driver.execute_script("return document.getElementById('send').disabled;") is False


def test_a_conversation_in_chat_mode_streams_the_server_s_greedy_replies(trained_run: Path, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    model, _, _ = load_pretrained(trained_run)
    tok = ChatBytes()
    engine = AsyncEngine(model, tok, EngineConfig(num_blocks=256, block_size=16, max_num_seqs=16))
    with serve_in_thread(build_app(engine, tok, model_name="tiny-chat")) as url:

        def reply(messages: list[dict[str, str]]) -> str:
            body = {"messages": messages, "max_tokens": 8, "temperature": 0, "top_p": 1}
            resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=HANG)
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["message"]["content"]

        _open(driver, url)
        _wait(driver, lambda d: d.execute_script("return document.getElementById('model').value;") == "tiny-chat",
              "the model list")
        assert driver.execute_script("return document.getElementById('mode').value;") == "chat"
        assert driver.find_element(By.CSS_SELECTOR, '#mode option[value="chat"]').is_enabled()
        _fill(driver, "temperature", "0")
        _fill(driver, "top-p", "1")
        _fill(driver, "max-tokens", "8")
        _fill(driver, "system", "be")
        history = [{"role": "system", "content": "be"}]
        for turn, (text, by_enter) in enumerate((("hi", False), ("so?", True))):
            history.append({"role": "user", "content": text})
            expected = reply(history)
            assert expected
            if by_enter:  # Enter sends in chat mode
                _fill(driver, "prompt", text + "\n")
            else:
                _send(driver, text)
            _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == turn + 1
                  and _state(d) != "streaming", f"reply {turn + 1}")
            assert _state(driver) == "done", _text(driver, "error")
            last = driver.find_element(By.CSS_SELECTOR, ".msg.assistant:last-child .content")
            assert last.get_attribute("textContent") == expected
            history.append({"role": "assistant", "content": expected})
        users = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user .content")]
        assert users == ["hi", "so?"]
        assert driver.execute_script("return document.getElementById('prompt').value;") == ""
        assert float(_text(driver, "tps")) > 0
