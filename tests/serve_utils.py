"""Helpers for tests of the HTTP server: run an app on 127.0.0.1 in a background thread, start
``triform serve`` as a subprocess, build a small app from a checkpoint, and read ``/metrics``.

    with serve_in_thread(small_app(trained_run)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    with serve_process([str(trained_run), "--grace-period", "5"]) as (proc, url):
        ...  # proc.send_signal(signal.SIGTERM); proc.wait(timeout=...)

Every wait polls with a deadline (a hang guard), never a blind sleep. Servers bind port 0, so the
kernel picks a free port and no two servers race for one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

HANG = 120.0  # seconds: hang guards only, never timing assertions
URL_LINE = re.compile(r"serving .* on (http://\S+)")


def _bound_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


def free_port() -> int:
    """A port that was free a moment ago (prefer binding port 0 directly where a race matters)."""
    with contextlib.closing(_bound_socket()) as sock:
        return sock.getsockname()[1]


def _until(condition: Any, what: str, timeout: float = HANG, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def serve_in_thread(app: Any, *, timeout: float = HANG, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` (an ASGI app, such as ``triform.serve.build_app``'s) with uvicorn on 127.0.0.1 and
    a free port in a background thread; yield its base URL (``http://127.0.0.1:PORT``). Leaving the
    block asks the server to exit (``should_exit``), which runs the app's lifespan shutdown, and
    waits for the thread. An app serves once: build a new one for the next server."""
    import uvicorn

    sock = _bound_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        _until(lambda: server.started or not thread.is_alive(), "the server to start", timeout)
        if not server.started:
            raise AssertionError("the server thread ended before it started (see the log above)")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        if thread.is_alive():
            raise AssertionError(f"the server on port {port} did not stop within {timeout:.0f}s")


def small_app(checkpoint: str | Path, *, engine: dict[str, Any] | None = None, max_waiting: int | None = None,
              model_name: str | None = None, **settings: Any) -> Any:
    """The FastAPI app ``triform serve`` would build for ``checkpoint``, in this process, with a small
    KV cache (``engine`` overrides ``EngineConfig`` fields) on the CPU; ``settings`` are
    ``ServeSettings`` fields (``api_key``, ``max_body_bytes``, ``grace_period`` ...)."""
    from triform.inference.core import EngineConfig
    from triform.serve import ServeSettings, app_from_checkpoint

    fields = dict(num_blocks=256, block_size=16, max_num_seqs=16)
    fields.update(engine or {})
    return app_from_checkpoint(
        checkpoint, engine_config=EngineConfig(**fields), max_waiting=max_waiting, model_name=model_name,
        settings=ServeSettings(**settings), device="cpu",
    )


class ServeProcess:
    """A running ``triform serve`` subprocess: ``proc`` (its Popen), ``url`` (base URL), and the
    ``output()`` it has printed so far (stdout and stderr, read by background threads so the pipes
    never fill)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.url: str | None = None
        self._lines: list[str] = []
        self._stdout: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._read, args=(proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, pipe: Any, is_stdout: bool) -> None:
        for line in pipe:
            self._lines.append(line)
            if is_stdout:
                self._stdout.put(line)
        if is_stdout:
            self._stdout.put(None)

    def output(self) -> str:
        """Everything the process has printed so far."""
        return "".join(self._lines)

    def wait_ready(self, timeout: float = HANG) -> str:
        """Wait for the ``serving ... on http://...`` line, then until ``/health`` answers 200."""
        deadline = time.monotonic() + timeout
        while self.url is None:
            try:
                line = self._stdout.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"triform serve printed no URL within {timeout:.0f}s:\n{self.output()}") from None
            if line is None:
                self.proc.wait(timeout=HANG)
                raise AssertionError(f"triform serve exited with {self.proc.returncode}:\n{self.output()}")
            match = URL_LINE.search(line)
            if match:
                self.url = match.group(1).rstrip("/")

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"triform serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return httpx.get(self.url + "/health", timeout=5.0).status_code == 200
            except httpx.HTTPError:
                return False

        _until(healthy, "/health to answer", max(0.0, deadline - time.monotonic()), interval=0.05)
        return self.url

    def stop(self) -> None:
        """Kill the process if it is still running and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=HANG)
        for t in self._threads:
            t.join(HANG)


def start_serve_process(args: list[str], *, timeout: float = HANG, env: dict[str, str] | None = None) -> ServeProcess:
    """Start ``python -m triform serve ARGS --host 127.0.0.1 --port 0`` (the kernel picks a free
    port, which the server prints) and return once ``/health`` answers."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "triform", "serve", *args, "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    server = ServeProcess(proc)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def serve_process(
    args: list[str], *, timeout: float = HANG, env: dict[str, str] | None = None,
) -> Iterator[ServeProcess]:
    """``start_serve_process`` as a context manager that kills the process on exit if it still runs."""
    server = start_serve_process(args, timeout=timeout, env=env)
    try:
        yield server
    finally:
        server.stop()


def metrics(url: str, *, headers: dict[str, str] | None = None) -> dict[str, float]:
    """``GET url/metrics`` parsed into {series: value}; a series is its name plus labels as printed,
    e.g. ``triform_kv_blocks_used`` or ``triform_requests_total{status="200"}``."""
    resp = httpx.get(url + "/metrics", headers=headers, timeout=30.0)
    resp.raise_for_status()
    out: dict[str, float] = {}
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def wait_for_metrics(url: str, condition: Any, what: str, *, timeout: float = HANG,
                     headers: dict[str, str] | None = None) -> dict[str, float]:
    """Poll ``/metrics`` until ``condition(metrics)`` holds (a hang guard fails the test if it never
    does); return the metrics that satisfied it."""
    seen: dict[str, float] = {}

    def check() -> bool:
        seen.clear()
        seen.update(metrics(url, headers=headers))
        return bool(condition(seen))

    _until(check, what, timeout, interval=0.05)
    return dict(seen)
