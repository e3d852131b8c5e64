"""Checkpoints: a folder of ``config.json`` + ``model.safetensors`` + tokenizer (+ trainer state).

Saving writes a complete new folder beside the old one and swaps it in with renames, so a crash
mid-save never destroys the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from triform.config import DecoderConfig
from triform.errors import CheckpointError, ConfigError
from triform.models.decoder import DecoderLM
from triform.tokenizers.base import Tokenizer, load_tokenizer

FORMAT = "triform"
CHECKPOINT_DIR = "checkpoint"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """The model's tensors to store: tied output weights once, everything contiguous."""
    state = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    path: Path, model: DecoderLM, tokenizer: Tokenizer, *, trainer_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically (temp folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"format": FORMAT, "version": 1, "model": model.cfg.to_dict(), **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    save_file(model_state(model), str(tmp / "model.safetensors"))
    tokenizer.save(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_checkpoint(path: Path | str) -> Path:
    """The checkpoint folder for ``path``: the folder itself, or a run folder's ``checkpoint/``.
    Falls back to the previous copy if a crash interrupted a save."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT_DIR):
        if (candidate / "config.json").is_file():
            return candidate
        old = candidate.with_name(f".{candidate.name}.old")
        if not candidate.exists() and (old / "config.json").is_file():
            return old
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    raise CheckpointError(f"{path} is not a triform checkpoint (no config.json in it or in {path / CHECKPOINT_DIR}).")


def read_meta(path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder, checked for format."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path / 'config.json'} is corrupt (not valid JSON).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{path / 'config.json'} is not a triform checkpoint config.")
    return meta


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder's ``model.safetensors``, with a clear error if absent or damaged."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors.")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc}).") from None


def load_checkpoint(
    path: Path | str, *, device: str | torch.device = "cpu",
) -> tuple[DecoderLM, Tokenizer, dict[str, Any]]:
    """Load model (in eval mode), tokenizer and config metadata from a checkpoint or run folder."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    kind = meta.get("kind", "decoder")
    if kind != "decoder":
        what = {"seq2seq": "an encoder-decoder", "encoder": "an encoder"}.get(kind, f"a {kind!r} model")
        raise CheckpointError(f"{folder} holds {what}; this command needs a decoder checkpoint.")
    try:
        cfg = DecoderConfig.from_dict(meta["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{folder / 'config.json'}: {exc}") from None
    model = load_weights(DecoderLM(cfg), folder)
    return model.to(device).eval(), load_tokenizer(folder), meta


def load_weights(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Fill ``model`` with a checkpoint folder's tensors, which must be exactly what ``model_state``
    would save for it (same names, same shapes); any mismatch is a CheckpointError naming it."""
    weights = folder / "model.safetensors"
    state = read_weights(folder)
    expected = model_state(model)  # type: ignore[arg-type]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config (missing: {missing[:3]}, unexpected: {unexpected[:3]})."
        )
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{weights} has tensors of the wrong shape for its config (e.g. {bad[0]}).")
    model.load_state_dict(state, strict=False)
    return model


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The optimizer, RNG and progress state saved beside a checkpoint's weights."""
    file = resolve_checkpoint(path) / "trainer_state.pt"
    if not file.is_file():
        raise CheckpointError(f"{file.parent} has no trainer_state.pt, so training cannot resume from it.")
    try:
        return torch.load(file, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"{file} is corrupt or truncated ({type(exc).__name__}).") from None
