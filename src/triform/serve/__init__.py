"""An OpenAI-compatible HTTP server over the engine (``triform serve``).

- ``protocol``: OpenAI's request JSON checked field by field, its error and logprobs shapes.
- ``app``: ``build_app(engine, tokenizer, model_name=..., settings=ServeSettings(...))``, the
  FastAPI app and its routes (completions, chat, embeddings, models, tokenize, health, metrics, the
  playground page).
- ``metrics``: Prometheus metrics in a registry per app.
- ``runner``: ``app_from_checkpoint``, socket binding and uvicorn with a graceful drain on SIGTERM.

Importing this package imports FastAPI; nothing else in triform does.
"""

from triform.serve.app import ServeSettings, ServerState, build_app
from triform.serve.runner import app_from_checkpoint, bind_socket, serve_forever

__all__ = ["ServeSettings", "ServerState", "build_app", "app_from_checkpoint", "bind_socket", "serve_forever"]
