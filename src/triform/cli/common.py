"""Helpers the command modules share: the bytes a user typed, streaming text to the terminal, and
the choices behind ``--weights`` and ``--device``."""

from __future__ import annotations

import os
import sys

from triform.errors import ConfigError

WEIGHT_MODES = ("float32", "bf16", "int8", "int8-weight-only")


def prompt_bytes(text: str) -> bytes:
    """The exact bytes the user typed: invalid UTF-8 in argv arrives as surrogate escapes."""
    return os.fsencode(text)


def write_text(text: str) -> None:
    """Print a piece of streamed text at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def unescape(text: str) -> str:
    """Interpret backslash escapes (\\n, \\t, \\\\) typed on a command line."""
    return text.encode("utf-8", errors="surrogateescape").decode("unicode_escape").encode("latin-1").decode(
        "utf-8", errors="surrogateescape"
    )


def inference_weights(model, weights: str):
    """``model`` with its linear layers in the ``--weights`` format (CPU only; a GPU keeps float32)."""
    from triform.inference.quantize import quantize_weights

    if weights not in WEIGHT_MODES:
        raise ConfigError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}.")
    if next(model.parameters()).device.type != "cpu":
        return model
    return quantize_weights(model, weights)  # type: ignore[arg-type]
