"""``triform serve``: argument handling over ``triform.serve`` (FastAPI and uvicorn are imported
only when the command runs)."""

from __future__ import annotations

import os

from triform.errors import ConfigError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def serve(
    checkpoint: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
    api_key: str | None = None, max_body_bytes: int = 1 << 20, max_waiting: int | None = 256,
    grace_period: float = 30.0, kv_cache_gib: float = 1.0, block_size: int = 16, max_num_seqs: int = 64,
    max_num_batched_tokens: int = 512, no_prefix_caching: bool = False, device: str = "auto",
    trust_pickle: bool = False, weights: str = "float32", log_level: str = "info",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a web playground at /.

    A decoder (triform checkpoint, Hugging Face folder or .gguf file) answers POST /v1/completions
    and /v1/chat/completions (with its chat template) through the serving engine: paged KV cache,
    continuous batching, streaming as server-sent events. A BERT-family encoder folder such as
    all-MiniLM-L6-v2 answers POST /v1/embeddings instead. Both answer GET /v1/models, GET /health,
    GET /metrics (Prometheus), POST /tokenize and POST /detokenize. SIGTERM (or Ctrl-C) stops
    admitting requests, lets running ones finish within --grace-period, and exits 0.

    Args:
        checkpoint: A triform checkpoint or run folder, a Hugging Face folder, or a .gguf file.
        host: Address to listen on (0.0.0.0 for every interface).
        port: Port to listen on (0 picks a free one; the URL printed says which).
        model_name: The name clients give as "model" (default: the checkpoint's folder or file name).
        api_key: Require "Authorization: Bearer KEY" on /v1/*, /tokenize and /detokenize (default:
            the TRIFORM_API_KEY environment variable, if set). /health, /metrics and / stay open.
        max_body_bytes: Largest request body accepted; larger ones get 413.
        max_waiting: Most requests waiting for the engine before new ones get 429 (null: no limit).
        grace_period: Seconds running requests get to finish after SIGTERM before they are aborted.
        kv_cache_gib: KV cache memory of the engine, in GiB.
        block_size: Tokens per KV block.
        max_num_seqs: Most sequences decoding at once (also the largest n per request).
        max_num_batched_tokens: Tokens computed per engine step (decode tokens plus prompt chunks).
        no_prefix_caching: Do not share KV blocks between prompts with a common prefix.
        device: "auto", "cpu" or "cuda".
        trust_pickle: Allow PyTorch pickle weights (.bin/.pt); unpickling can run arbitrary code.
        weights: Inference weights of a decoder: float32, bf16, int8 or int8-weight-only (see
            benchmarks/decode_smollm2.py; bf16 halves the bytes each decode step reads).
        log_level: uvicorn's log level: critical, error, warning, info or debug.
    """
    import logging

    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}.")
    if max_waiting is not None and (isinstance(max_waiting, bool) or max_waiting < 0):
        raise ConfigError(f"--max-waiting must be an integer >= 0 (or null for no limit), got {max_waiting!r}.")
    if isinstance(max_body_bytes, bool) or max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be a positive integer, got {max_body_bytes!r}.")
    if not grace_period >= 0:
        raise ConfigError(f"--grace-period must be a number of seconds >= 0, got {grace_period!r}.")
    from triform.cli.common import WEIGHT_MODES

    if weights not in WEIGHT_MODES:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}.")
    if api_key == "":
        raise ConfigError("--api-key must not be empty.")
    from triform.device import resolve_device
    from triform.inference.core import EngineConfig
    from triform.serve import ServeSettings, app_from_checkpoint, bind_socket, serve_forever
    from triform.serve.runner import default_model_name, url_of

    settings = ServeSettings(
        api_key=api_key if api_key is not None else os.environ.get("TRIFORM_API_KEY") or None,
        max_body_bytes=max_body_bytes, grace_period=grace_period,
    )
    engine_config = EngineConfig(
        block_size=block_size, kv_cache_memory=int(kv_cache_gib * 2**30), max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, prefix_caching=not no_prefix_caching,
    )
    sock = bind_socket(host, port)  # before loading: a port in use fails at once
    try:
        name = model_name or default_model_name(checkpoint)
        app = app_from_checkpoint(
            checkpoint, model_name=name, settings=settings, engine_config=engine_config, max_waiting=max_waiting,
            device=str(resolve_device(device)), trust_pickle=trust_pickle, weights=weights,
        )
    except BaseException:
        sock.close()
        raise
    logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")
    print(f"serving {name} on {url_of(sock)} (OpenAI-compatible API at /v1, playground at /)", flush=True)
    serve_forever(app, sock, log_level=log_level)
