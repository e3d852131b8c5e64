"""Using trained vision models: class probabilities from a ViT classifier, CLIP's zero-shot
classification with prompt ensembling, and image-text retrieval recall.

Zero-shot classification (CLIP, arXiv 2103.00020, section 3.1.4): each class name is written into
every template ("a photo of a {}"), the captions are embedded and normalised, their mean per class
is renormalised into that class's weight vector, and an image's class probabilities are the
softmax of its scaled cosine similarities to those vectors. Everything runs batched under
``torch.inference_mode`` on the model's device and returns float32 tensors on the CPU.

Images may be a tensor or array (N, C, H, W) in [0, 1], uint8 arrays, or a list of PIL images (of
any sizes and modes: each is converted to the model's channels and resized by the processor).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from triform.data.processor import CLIPProcessor, ImageProcessor
from triform.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {}",)  # zero-shot templates for a checkpoint that recorded none


def _image_processor(processor: ImageProcessor | CLIPProcessor) -> ImageProcessor:
    return processor.image if isinstance(processor, CLIPProcessor) else processor


def _count(images: Any) -> int:
    return images.shape[0] if hasattr(images, "shape") else len(images)


def _pixel_batches(processor: ImageProcessor | CLIPProcessor, images: Any, batch_size: int,
                   device: torch.device) -> Iterator[Tensor]:
    """Normalised pixels (b, C, S, S) on ``device``, ``batch_size`` images at a time."""
    proc = _image_processor(processor)
    for start in range(0, _count(images), batch_size):
        chunk = images[start : start + batch_size]
        if isinstance(chunk, (list, tuple)):  # PIL images of mixed sizes: each resized on its own
            unit = torch.cat([proc.to_unit([im]) for im in chunk])
        else:
            unit = proc.to_unit(chunk)
        yield proc.normalize(unit).to(device)  # (b, C, S, S)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def classify_images(model: nn.Module, processor: ImageProcessor, images: Any, *, batch_size: int = 256) -> Tensor:
    """Class probabilities (N, K) of a ``VisionClassifier`` for ``images``, in their order."""
    model.eval()
    batches = _pixel_batches(processor, images, batch_size, _device(model))
    out = [model(px).float().softmax(dim=-1).cpu() for px in batches]
    return torch.cat(out) if out else torch.zeros(0, model.num_labels)


@torch.inference_mode()
def embed_images(model: nn.Module, processor: CLIPProcessor, images: Any, *, batch_size: int = 256) -> Tensor:
    """Unit-length CLIP image embeddings (N, P)."""
    model.eval()
    out = [model.embed_images(px).float().cpu() for px in _pixel_batches(processor, images, batch_size, _device(model))]
    return torch.cat(out) if out else torch.zeros(0, model.cfg.projection_dim)


@torch.inference_mode()
def embed_texts(model: nn.Module, processor: CLIPProcessor, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
    """Unit-length CLIP text embeddings (N, P) of captions, in their order."""
    model.eval()
    device = _device(model)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = processor.texts(list(texts[start : start + batch_size])).to(device)  # (b, T)
        out.append(model.embed_texts(tokens).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.projection_dim)


def check_class_names(class_names: Sequence[str]) -> None:
    """A ConfigError unless there are at least two distinct class names, none of them blank."""
    names = list(class_names)
    if len(names) < 2:
        raise ConfigError(f"zero-shot classification needs at least 2 class names, got {len(names)}.")
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise ConfigError("every class name must have at least one character.")
    repeated = [n for n in names if names.count(n) > 1]
    if repeated:
        raise ConfigError(f"class name {repeated[0]!r} is given twice.")


def check_templates(templates: Sequence[str]) -> None:
    """A ConfigError unless there is at least one template and each has a ``{}`` for the class name."""
    if not templates:
        raise ConfigError("zero-shot classification needs at least one template such as 'a photo of a {}'.")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ConfigError(f"template {t!r} has no '{{}}' where the class name goes.")


def zero_shot_weights(model: nn.Module, processor: CLIPProcessor, class_names: Sequence[str],
                      templates: Sequence[str]) -> Tensor:
    """Class weight vectors (K, P): per class, the mean of the normalised embeddings of its name in
    every template, renormalised (the CLIP paper's prompt ensembling)."""
    check_class_names(class_names)
    check_templates(templates)
    captions = [t.replace("{}", name) for name in class_names for t in templates]
    emb = embed_texts(model, processor, captions)  # (K·M, P), class-major
    mean = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # (K, P)
    return torch.nn.functional.normalize(mean, dim=-1)


def zero_shot(model: nn.Module, processor: CLIPProcessor, images: Any, class_names: Sequence[str],
              templates: Sequence[str], *, batch_size: int = 256) -> Tensor:
    """Zero-shot class probabilities (N, K): softmax over classes of the model's scaled cosine
    similarity between each image and each class's ``zero_shot_weights`` vector."""
    weights = zero_shot_weights(model, processor, class_names, templates)  # (K, P)
    images_emb = embed_images(model, processor, images, batch_size=batch_size)  # (N, P)
    with torch.inference_mode():
        scale = float(model.scale())
    return (scale * images_emb @ weights.t()).softmax(dim=-1)  # (N, K)


def retrieval_recall(image_embeds: Tensor, text_embeds: Tensor, k: int = 1, *,
                     groups: Tensor | None = None) -> tuple[float, float]:
    """(image→text R@k, text→image R@k) for paired rows: row i of ``image_embeds`` (N, P) belongs
    with row i of ``text_embeds`` (N, P), and a query counts as found when its partner is among the k
    most similar rows of the other side. With ``groups`` (N,), any row of the query's group counts
    (identical captions, or captions of the same class, are then all correct answers)."""
    n = image_embeds.shape[0]
    if text_embeds.shape[0] != n or n == 0:
        raise DataError(f"retrieval needs as many texts as images (paired rows), got {n} images and "
                        f"{text_embeds.shape[0]} texts.")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}.")
    g = torch.arange(n) if groups is None else groups.cpu()
    sims = image_embeds.float().cpu() @ text_embeds.float().cpu().t()  # (N_images, N_texts)
    top = min(k, n)
    i2t = (g[sims.topk(top, dim=1).indices] == g[:, None]).any(dim=1).float().mean()
    t2i = (g[sims.t().topk(top, dim=1).indices] == g[:, None]).any(dim=1).float().mean()
    return float(i2t), float(t2i)


def saved_templates(meta: dict[str, Any]) -> list[str]:
    """The zero-shot templates a checkpoint's metadata records (its held-out ones, else its training
    ones), or ``DEFAULT_TEMPLATES``."""
    return list(meta.get("test_templates") or meta.get("templates") or DEFAULT_TEMPLATES)


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders as their image files (by suffix,
    sorted by name); a missing path, or a folder without images, is a DataError."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image {p} does not exist.")
    if not files:
        raise DataError("give at least one image file or folder.")
    return files


def open_images(files: Sequence[Path]) -> list[Any]:
    """The files as PIL images, fully read (mode and size as stored; the processor converts them);
    a file that is not a readable image is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise DataError(f"{f} could not be read as an image.") from None
    return images


__all__ = [
    "classify_images", "embed_images", "embed_texts", "zero_shot_weights", "zero_shot", "retrieval_recall",
    "check_class_names", "check_templates", "saved_templates", "image_files", "open_images", "DEFAULT_TEMPLATES",
]
