"""Load a checkpoint into a servable app, bind its socket, and run uvicorn until SIGTERM drains it.

``app_from_checkpoint`` picks what to serve from what the checkpoint holds: a decoder (triform
checkpoint, Hugging Face folder or GGUF file) behind an ``AsyncEngine``, or a BERT-family encoder
(such as all-MiniLM-L6-v2) behind ``/v1/embeddings``, pooled and normalised exactly as
``triform embed`` does. ``serve_forever`` runs uvicorn on a socket bound beforehand (so a port in
use fails at once, before any loading, and port 0 works); SIGTERM or Ctrl-C starts the app's drain
(stop admitting, let running requests finish within the grace period, abort the rest), uvicorn
then waits for the open responses and runs the lifespan shutdown, and the process exits 0.
"""

from __future__ import annotations

import errno
import signal
import socket
from pathlib import Path
from typing import Any

from triform.errors import CheckpointError, ConfigError
from triform.inference.core import EngineConfig
from triform.serve.app import ServeSettings, build_app

SHUTDOWN_MARGIN = 5.0  # seconds past the grace period before uvicorn cancels what is still open


def default_model_name(checkpoint: str | Path) -> str:
    """The name a checkpoint is served under when none is given: its file stem or folder name."""
    path = Path(checkpoint)
    return path.stem if path.suffix == ".gguf" else (path.resolve().name or str(path))


def app_from_checkpoint(
    checkpoint: str | Path, *, model_name: str | None = None, settings: ServeSettings | None = None,
    engine_config: EngineConfig | None = None, max_waiting: int | None = None, device: str = "cpu",
    trust_pickle: bool = False, weights: str = "float32",
) -> Any:
    """The FastAPI app for ``checkpoint``: a decoder behind an ``AsyncEngine`` (``engine_config``,
    ``max_waiting``; its linear layers in the ``weights`` format, as ``triform generate --weights``),
    or a BERT-family encoder for embeddings. Encoder-decoder models and
    prefix-LM decoders are refused with a ``CheckpointError`` (the engine runs causal decoders)."""
    from triform.checkpoint import checkpoint_kind, trained_as_prefix_lm
    from triform.interop import _hf_model_type, detect_format, load_encoder, load_pretrained
    from triform.inspect.load import ENCODER_TYPES

    path = Path(checkpoint)
    fmt = detect_format(path)
    name = model_name or default_model_name(path)
    if fmt == "triform":
        kind = checkpoint_kind(path)
    elif fmt == "hf":
        mt = _hf_model_type(path)
        kind = "encoder" if mt in ENCODER_TYPES else "seq2seq" if mt in ("t5", "mt5") else "decoder"
    else:
        kind = "decoder"
    if kind == "seq2seq":
        raise CheckpointError(
            f"{path} holds an encoder-decoder model; triform serve runs decoders, and encoders for embeddings."
        )
    if kind == "encoder":
        from triform.inference.embed import SentenceEncoder

        if fmt == "hf":
            encoder = SentenceEncoder.from_folder(path, device=device)
        else:
            bare, tokenizer = load_encoder(path, trust_pickle=trust_pickle)
            if not hasattr(tokenizer, "batch"):
                raise CheckpointError(
                    f"{path} is an encoder with a {getattr(tokenizer, 'kind', 'non-WordPiece')} tokenizer; embeddings "
                    "are served for BERT-family (WordPiece) encoders such as all-MiniLM-L6-v2."
                )
            encoder = SentenceEncoder(bare.to(device), tokenizer)
        return build_app(None, encoder.tokenizer, model_name=name, settings=settings, encoder=encoder)
    from triform.inference.async_engine import AsyncEngine

    model, tokenizer, meta = load_pretrained(path, trust_pickle=trust_pickle, device=device)
    if trained_as_prefix_lm(meta):
        raise CheckpointError(f"{path} is a prefix-LM (UL2) decoder; the serving engine runs causal decoders.")
    if weights != "float32":  # the engine batches many rows: plain float32 layers suit it
        from triform.cli.common import inference_weights

        model = inference_weights(model, weights)
    engine = AsyncEngine(model, tokenizer, engine_config, max_waiting=max_waiting)
    return build_app(engine, tokenizer, model_name=name, settings=settings)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port) and listening, or a
    ``ConfigError`` saying in one sentence why it cannot be."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be an integer in [0, 65535], got {port!r}.")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: the host is not known ({exc.strerror}).") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)  # connections from now on wait in the backlog until uvicorn takes them
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use; choose another --port.") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"no permission to listen on {host}:{port}; ports below 1024 need privileges.") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}).") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_forever(app: Any, sock: socket.socket, *, log_level: str = "info") -> None:
    """Run uvicorn on ``sock`` until SIGTERM or Ctrl-C, which drain the app (see the module
    docstring); returns normally once everything has stopped. A second Ctrl-C quits at once."""
    import uvicorn

    state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                state.request_drain()

    config = uvicorn.Config(
        app, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=int(state.settings.grace_period + SHUTDOWN_MARGIN),
    )
    # uvicorn re-raises the signal it caught once it has shut down, to the handler it found; a
    # handler that does nothing makes that a clean exit (status 0) instead of death by SIGTERM.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()


def _ignore(sig: int, frame: Any) -> None:
    """A signal handler that does nothing (see ``serve_forever``)."""
