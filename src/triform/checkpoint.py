"""Checkpoints for every model kind: a folder of ``config.json`` + ``model.safetensors`` + tokenizer
(+ ``trainer_state.pt`` for a run that can resume).

One registry maps a model kind ("decoder", "encoder", "seq2seq", ...) to its config class and a
builder, so every loader in the package goes through ``load_checkpoint`` and none checks
``meta["kind"]`` itself. Saving writes a complete new folder beside the old one and swaps it in with
renames, so a crash mid-save never destroys the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from triform.config import CLIPConfig, DecoderConfig, EncoderConfig, Seq2SeqConfig, VisionConfig
from triform.errors import CheckpointError, ConfigError
from triform.tokenizers.base import Tokenizer, load_tokenizer

FORMAT = "triform"
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class ModelKind:
    """How to rebuild one kind of model from its ``config.json``: the config class, a builder from
    (config, metadata) to an empty model, the model classes that are saved as this kind, and the
    words an error message uses for it."""

    name: str
    config_class: type
    build: Callable[[Any, dict[str, Any]], nn.Module]
    classes: tuple[type, ...]
    described: str
    tokenizer: Callable[[Path], Any] = load_tokenizer  # a tokenizer, or a vision model's processor
    describe: Callable[[nn.Module], dict[str, Any]] = lambda model: {}  # metadata the builder needs (a head)


REGISTRY: dict[str, ModelKind] = {}


def register_kind(kind: ModelKind) -> ModelKind:
    """Add a model kind to the registry (each model family registers itself here)."""
    REGISTRY[kind.name] = kind
    return kind


def _build_encoder(cfg: EncoderConfig, meta: dict[str, Any]) -> nn.Module:
    from triform.models.encoder import (
        EncoderForPreTraining,
        EncoderForQuestionAnswering,
        EncoderForSequenceClassification,
        EncoderForTokenClassification,
    )

    head = meta.get("head", "pretraining")
    n = int(meta.get("num_labels", 2))
    builders: dict[str, Callable[[], nn.Module]] = {
        "pretraining": lambda: EncoderForPreTraining(cfg, pair_head=bool(meta.get("pair_head", cfg.pooler))),
        "sequence": lambda: EncoderForSequenceClassification(cfg, n),
        "token": lambda: EncoderForTokenClassification(cfg, n),
        "qa": lambda: EncoderForQuestionAnswering(cfg),
    }
    if head not in builders:
        raise CheckpointError(f"unknown encoder head {head!r} (expected one of {', '.join(builders)}).")
    return builders[head]()


def _encoder_head(model: nn.Module) -> dict[str, Any]:
    from triform.models.encoder import (
        EncoderForPreTraining,
        EncoderForQuestionAnswering,
        EncoderForSequenceClassification,
        EncoderForTokenClassification,
    )

    if isinstance(model, EncoderForPreTraining):
        return {"head": "pretraining", "pair_head": model.pair is not None}
    if isinstance(model, EncoderForSequenceClassification):
        return {"head": "sequence", "num_labels": model.num_labels}
    if isinstance(model, EncoderForTokenClassification):
        return {"head": "token", "num_labels": model.num_labels}
    if isinstance(model, EncoderForQuestionAnswering):
        return {"head": "qa"}
    return {}


def _build_vision(cfg: Any, meta: dict[str, Any]) -> nn.Module:
    from triform.models.vision import VisionClassifier, VisionEncoder

    n = int(meta.get("num_labels", 0))
    return VisionClassifier(cfg, n) if n else VisionEncoder(cfg)


def _vision_head(model: nn.Module) -> dict[str, Any]:
    return {"num_labels": int(getattr(model, "num_labels", 0))}


def _load_image_processor(folder: Path) -> Any:
    from triform.data.processor import ImageProcessor

    return ImageProcessor.load(folder)


def _load_clip_processor(folder: Path) -> Any:
    from triform.data.processor import CLIPProcessor

    return CLIPProcessor.load(folder)


def _register_builtin() -> None:
    from triform.models.decoder import DecoderLM
    from triform.models.encoder import (
        EncoderForPreTraining,
        EncoderForQuestionAnswering,
        EncoderForSequenceClassification,
        EncoderForTokenClassification,
    )
    from triform.models.encoder_decoder import Seq2Seq

    register_kind(ModelKind("decoder", DecoderConfig, lambda cfg, _: DecoderLM(cfg), (DecoderLM,), "a decoder"))
    register_kind(ModelKind(
        "encoder", EncoderConfig, _build_encoder,
        (EncoderForPreTraining, EncoderForSequenceClassification, EncoderForTokenClassification, EncoderForQuestionAnswering),
        "an encoder", describe=_encoder_head,
    ))
    register_kind(ModelKind("seq2seq", Seq2SeqConfig, lambda cfg, _: Seq2Seq(cfg), (Seq2Seq,), "an encoder-decoder"))
    from triform.models.clip import CLIP
    from triform.models.vision import VisionClassifier, VisionEncoder

    register_kind(ModelKind("vision", VisionConfig, _build_vision, (VisionClassifier, VisionEncoder), "a vision encoder (ViT)",
                            tokenizer=_load_image_processor, describe=_vision_head))
    register_kind(ModelKind("clip", CLIPConfig, lambda cfg, _: CLIP(cfg), (CLIP,), "a CLIP model",
                            tokenizer=_load_clip_processor))


_register_builtin()


def kind_of(model: nn.Module) -> ModelKind:
    """The registered kind a model is saved as."""
    for kind in REGISTRY.values():
        if isinstance(model, kind.classes):
            return kind
    raise CheckpointError(f"no checkpoint kind is registered for {type(model).__name__}.")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors to store (``state``: its state dict gathered elsewhere, e.g. from FSDP
    shards): tied output weights once, everything contiguous."""
    state = dict(model.state_dict() if state is None else state)
    if getattr(model.cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    path: Path, model: nn.Module, tokenizer: Tokenizer, *, trainer_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically (temp folder, fsync, rename). ``tokenizer`` is
    what turns inputs into ids (for ViT and CLIP, their processor: anything with ``save(folder)``).
    The model's kind (and its head) are recorded from the registry; ``extra`` adds run metadata; ``state``
    replaces ``model.state_dict()`` (a full state dict gathered from shards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    kind = kind_of(model)
    head = kind.describe(model)
    meta = {"format": FORMAT, "version": 1, "kind": kind.name, **head, "model": model.cfg.to_dict(), **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    save_file(model_state(model, state), str(tmp / "model.safetensors"))
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


def checkpoint_kind(path: Path | str) -> str:
    """The model kind stored in a checkpoint or run folder (checkpoints from before kinds were
    recorded hold decoders)."""
    return read_meta(resolve_checkpoint(path)).get("kind", "decoder")


PREFIX_LM_OBJECTIVES = ("prefix-lm", "ul2", "span")


def trained_as_prefix_lm(meta: dict[str, Any]) -> bool:
    """Whether a decoder checkpoint was trained as a prefix-LM (bidirectional over its input), so its
    prompts are read that way and end with </s>, as in training."""
    return meta.get("kind", "decoder") == "decoder" and meta.get("objective") in PREFIX_LM_OBJECTIVES


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder's ``model.safetensors``, with a clear error if absent or damaged."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors.")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc}).") from None


_NEEDS = {
    "decoder": "this command needs a decoder checkpoint.",
    "encoder": "this command needs an encoder checkpoint (from triform pretrain).",
    "seq2seq": "this command needs an encoder-decoder checkpoint.",
    "vision": "this command needs a ViT checkpoint (from triform train-vision --task classify).",
    "clip": "this command needs a CLIP checkpoint (from triform train-vision --task clip).",
}


def load_checkpoint(
    path: Path | str, *, device: str | torch.device = "cpu", kind: str | tuple[str, ...] | None = "decoder",
) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """Model (in eval mode), tokenizer and config metadata from a checkpoint or run folder.

    ``kind`` is the model kind (or kinds) the caller accepts — "decoder" by default, None for any;
    a checkpoint of another kind is a CheckpointError saying what it holds."""
    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    name = meta.get("kind", "decoder")
    accepted = (kind,) if isinstance(kind, str) else kind
    entry = REGISTRY.get(name)
    if accepted is not None and name not in accepted:
        what = entry.described if entry is not None else f"a {name!r} model"
        needs = _NEEDS.get(accepted[0], f"this command needs {' or '.join(accepted)}.") if len(accepted) == 1 else (
            f"this command needs {' or '.join(REGISTRY[a].described if a in REGISTRY else a for a in accepted)}.")
        raise CheckpointError(f"{folder} holds {what}; {needs}")
    if entry is None:
        raise CheckpointError(f"{folder / 'config.json'} names an unknown model kind {name!r}.")
    try:
        cfg = entry.config_class.from_dict(meta["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: {exc}") from None
    model = load_weights(entry.build(cfg, meta), folder)
    return model.to(device).eval(), entry.tokenizer(folder), meta


def load_weights(model: nn.Module, folder: Path) -> nn.Module:
    """Fill ``model`` with a checkpoint folder's tensors, which must be exactly what ``model_state``
    would save for it (same names, same shapes); any mismatch is a CheckpointError naming it."""
    weights = folder / "model.safetensors"
    state = read_weights(folder)
    expected = model_state(model)
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
