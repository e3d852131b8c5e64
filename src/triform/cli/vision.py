"""``triform train-vision``, ``triform classify-image`` and ``triform zero-shot``: argument handling
over the vision parts of the library (``triform.training.vision``, ``triform.inference.vision``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from triform.errors import CheckpointError, ConfigError
from triform.training.vision import VisionTrainConfig


def train_vision(
    out: str = "runs/vision", resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
    *, cfg: VisionTrainConfig | None = None,
) -> None:
    """Train a ViT image classifier (--task classify) or a CLIP image-text model (--task clip) on
    handwritten digits, synthetic shapes or your own images, then report held-out scores.

    Args:
        out: Run folder: checkpoint/, loss.png and metrics.jsonl are written here.
        resume: Continue the run in `out` from its last checkpoint, bit-exactly, with its saved settings.
        overwrite: Start again in `out` even though it holds a run.
        stop_after: Pause after this many steps without changing the schedule (resume later).
    """
    from triform.training.vision import train_vision as run

    r = run(cfg or VisionTrainConfig(), out_dir=out, resume=resume, overwrite=overwrite, stop_after=stop_after)
    f = r.fit
    print(f"trained {r.task} on {r.data}: {f.steps} steps in {f.seconds:.0f} s ({f.train_seconds:.0f} s training, "
          f"{f.eval_seconds:.0f} s evaluation, {f.precision}), {r.parameters / 1e6:.2f}M parameters")
    scores = []
    if r.accuracy is not None:
        scores.append(f"test accuracy {r.accuracy:.4f}")
    if r.zero_shot is not None:
        scores.append(f"zero-shot accuracy {r.zero_shot:.4f} (held-out templates)")
    if r.image_to_text is not None and r.text_to_image is not None:
        scores.append(f"recall@1 image->text {r.image_to_text:.4f}, text->image {r.text_to_image:.4f}")
    if r.word_order is not None:
        scores.append(f"caption beats its reordered caption {r.word_order:.4f}")
    if scores:
        print(f"held-out ({r.held_out} images): " + "; ".join(scores))
    print(f"checkpoint: {r.checkpoint}")
    if r.confusion is not None and r.class_names and os.environ.get("RANK", "0") in ("", "0"):
        from triform.inspect.vision import plot_confusion

        path = plot_confusion(r.confusion, r.class_names, Path(out) / "confusion.png",
                              title=f"held-out confusion matrix, accuracy {r.accuracy:.3f}")
        print(f"confusion matrix: {path}")


def _load_images(images: list[str] | None) -> tuple[list[Path], list[Any]]:
    from triform.inference.vision import image_files, open_images

    files = image_files(images or [])
    return files, open_images(files)


def _print_top(files: list[Path], probs: Any, names: list[str], top_k: int) -> None:
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    for f, vs, ix in zip(files, values.tolist(), indices.tolist()):
        print(f"{f}: " + ", ".join(f"{names[i]} {v:.3f}" for v, i in zip(vs, ix)))


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"--top-k must be a positive integer, got {top_k!r}.")


def classify_image(checkpoint: str, images: list[str] | None = None, top_k: int = 3, device: str = "auto") -> None:
    """Classify images with a ViT classifier checkpoint: the top labels of each with their probabilities.

    Args:
        checkpoint: A checkpoint or run folder from `triform train-vision --task classify`.
        images: Image files (PNG, JPEG, ...) or folders of them; each is converted to the model's
            channels and resized to its image size.
        top_k: How many labels to show per image.
        device: "auto", "cpu" or "cuda".
    """
    from triform.checkpoint import checkpoint_kind, load_checkpoint
    from triform.device import resolve_device
    from triform.inference.vision import classify_images

    _check_top_k(top_k)
    if checkpoint_kind(checkpoint) == "clip":
        raise CheckpointError(f"{checkpoint} holds a CLIP model, which has no classifier head; use "
                              f"triform zero-shot {checkpoint} IMAGE... --labels a,b,c instead.")
    model, processor, meta = load_checkpoint(checkpoint, device=resolve_device(device), kind="vision")
    if not getattr(model, "num_labels", 0):
        raise CheckpointError(f"{checkpoint} holds a ViT without a classification head; train one with "
                              "triform train-vision --task classify.")
    files, pil = _load_images(images)
    names = list(meta.get("labels") or [])
    if len(names) != model.num_labels:
        names = [f"class {i}" for i in range(model.num_labels)]
    _print_top(files, classify_images(model, processor, pil), names, top_k)


def zero_shot(
    checkpoint: str, images: list[str] | None = None, labels: str | None = None, templates: list[str] | None = None,
    top_k: int = 3, device: str = "auto",
) -> None:
    """Classify images with a CLIP checkpoint by comparing them with captions of each class name
    (zero-shot, prompt-ensembled over the templates): the top labels with their probabilities.

    Args:
        checkpoint: A checkpoint or run folder from `triform train-vision --task clip`.
        images: Image files (PNG, JPEG, ...) or folders of them.
        labels: Class names separated by commas, e.g. "cat,dog,bird" (default: the class names the
            checkpoint recorded).
        templates: A caption template with {} where the class name goes, e.g. "a photo of a {}";
            repeat the flag for several (default: the held-out templates the checkpoint recorded).
        top_k: How many labels to show per image.
        device: "auto", "cpu" or "cuda".
    """
    from triform.checkpoint import load_checkpoint
    from triform.device import resolve_device
    from triform.inference.vision import check_class_names, check_templates, saved_templates
    from triform.inference.vision import zero_shot as run_zero_shot

    _check_top_k(top_k)
    names: list[str] | None = None
    if labels is not None:
        names = [n.strip() for n in labels.split(",") if n.strip()]
        if len(names) < 2:
            raise ConfigError(f"--labels needs at least 2 class names separated by commas, got {labels!r}.")
        check_class_names(names)
    if templates is not None:
        check_templates(templates)
    model, processor, meta = load_checkpoint(checkpoint, device=resolve_device(device), kind="clip")
    if names is None:
        names = list(meta.get("labels") or [])
        if len(names) < 2:
            raise ConfigError(f"{checkpoint} records no class names; give them with --labels a,b,c.")
    chosen = list(templates) if templates is not None else saved_templates(meta)
    files, pil = _load_images(images)
    _print_top(files, run_zero_shot(model, processor, pil, names, chosen), names, top_k)
