"""Training vision models: a ViT image classifier or a CLIP image-text model, through the one loop.

Data is scikit-learn's handwritten digits (the default), synthetic two-shape scenes, or a folder
of the user's images listed in a ``labels.csv`` (see ``triform.data.images``). The image processor
is fitted on the training images (per-channel mean and std), the model's image size and channels
follow the data, and a validation subset held out of the training split is scored at every
evaluation. After training, the held-out result is measured: test accuracy for a classifier; for
CLIP on digits, zero-shot accuracy on the test digits with templates never seen in training, and
image→text / text→image recall@1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from triform.checkpoint import load_checkpoint
from triform.config import CLIPConfig, VisionConfig, get_vision_preset
from triform.data.images import (
    DIGIT_WORDS,
    TEST_TEMPLATES,
    TRAIN_TEMPLATES,
    ImageSet,
    captioned_digits,
    digits,
    image_folder,
    shapes,
)
from triform.data.processor import CLIPProcessor, ImageProcessor
from triform.errors import ConfigError, DataError
from triform.inference.vision import classify_images, embed_images, embed_texts, retrieval_recall, zero_shot
from triform.models.clip import CLIP
from triform.models.vision import VisionClassifier
from triform.objectives.contrastive import Contrastive, ImageClassification, caption_groups
from triform.tokenizers.byte import ByteTokenizer
from triform.training.args import TrainArgs, check_choice, check_positive_int, with_shared_docs
from triform.training.distributed import print_main
from triform.training.loop import FitResult, check_run_dir, claim_run_dir, fit

Task = Literal["classify", "clip"]
COMMAND = "train-vision"

# Defaults that differ by task (tuned on digits, one CPU thread: a ViT at ~97% test accuracy and a
# CLIP at ~94% zero-shot accuracy, each in under half a minute).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classify": {"preset": "vit-digits", "batch_size": 64, "lr": 1e-2, "weight_decay": 0.3, "epochs": 40},
    "clip": {"preset": "clip-digits", "batch_size": 32, "lr": 3e-3, "weight_decay": 0.1, "epochs": 12},
}
DIGITS_WORD_DROPOUT = 0.5


@with_shared_docs
@dataclass(frozen=True, kw_only=True)
class VisionTrainConfig(TrainArgs):
    """A vision training run: the shared training arguments (see ``TrainArgs``) and these. The step
    count is epochs over the training images, bounded by max_steps and time_budget; warm-up is 10%
    of it unless warmup_steps is given, then cosine decay to a tenth of lr. Fields left unset take
    the task's default (classify: vit-digits, batch 64, lr 1e-2, weight decay 0.3, 40 epochs;
    clip: clip-digits, batch 32, lr 3e-3, weight decay 0.1, 12 epochs).

    Args:
        task: classify (a ViT with a linear head on class labels) or clip (image-caption pairs,
            CLIP's contrastive loss).
        data: digits (scikit-learn's 8x8 handwritten digits; for clip captioned from templates),
            shapes (synthetic two-shape scenes), or a folder or CSV file listing images with a label
            and/or caption column (see ``triform.data.images.image_folder``).
        preset: Model shape by exact name (see `triform presets`): a ViT preset for classify, a CLIP
            preset for clip.
        image_size: Train at this image size (default: the data's own size); the preset's patch
            size must divide it.
        epochs: Passes over the training images (bounded by max_steps and time_budget).
        val_fraction: Share of the training images held out for the periodic evaluation (and, for a
            folder, for the final held-out scores).
        shift: Augmentation: move each training image by up to this many pixels (0: none).
        pad: What fills the border a shift uncovers: zeros (black) or edge (the edge pixels).
        word_dropout: Drop each word of a training caption with this probability, never the class
            word (unset: 0.5 for captioned digits, 0 for other data).
        scenes: With data=shapes, the number of training scenes (a quarter as many are held out).
    """

    task: Task = "classify"
    data: str = "digits"
    preset: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    val_fraction: float = 0.05
    shift: int = 0
    pad: Literal["zeros", "edge"] = "zeros"
    word_dropout: float | None = None
    scenes: int = 2000
    batch_size: int | None = None  # type: ignore[assignment]
    lr: float | None = None  # type: ignore[assignment]
    weight_decay: float | None = None  # type: ignore[assignment]
    max_steps: int | None = None
    warmup_steps: int | None = None
    beta2: float = 0.99
    eval_interval: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("task", self.task, ("classify", "clip"))
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.word_dropout is None:
            digit_captions = self.task == "clip" and self.data == "digits"
            object.__setattr__(self, "word_dropout", DIGITS_WORD_DROPOUT if digit_captions else 0.0)
        super().__post_init__()
        preset = get_vision_preset(self.preset)  # type: ignore[arg-type]
        if self.task == "classify" and not isinstance(preset, VisionConfig):
            raise ConfigError(f"preset {self.preset!r} is a CLIP model; use --task clip, or a ViT preset for classify.")
        if self.task == "clip" and not isinstance(preset, CLIPConfig):
            raise ConfigError(f"preset {self.preset!r} is a ViT; use --task classify, or a CLIP preset for clip.")
        if not isinstance(self.data, str) or not self.data.strip():
            raise ConfigError("data must be digits, shapes or a folder or CSV file of images.")
        check_positive_int("image_size", self.image_size, allow_none=True)
        check_positive_int("epochs", self.epochs)
        check_positive_int("scenes", self.scenes, minimum=2)
        check_positive_int("shift", self.shift, minimum=0)
        check_choice("pad", self.pad, ("zeros", "edge"))
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction <= 0.5:
            raise ConfigError(f"val_fraction must be between 0 and 0.5, got {self.val_fraction!r}.")
        if not isinstance(self.word_dropout, (int, float)) or not 0 <= self.word_dropout < 1:
            raise ConfigError(f"word_dropout must be in [0, 1), got {self.word_dropout!r}.")

    def bounded_by_data(self) -> bool:
        return True

    def steps_for(self, n: int) -> int:
        """Optimizer steps for ``n`` training images: epochs of them, bounded by max_steps."""
        steps = -(-n // self.micro_batch_size) * int(self.epochs) // self.micro_batches  # type: ignore[arg-type]
        return max(1, steps if self.max_steps is None else min(self.max_steps, steps))


@dataclass
class VisionData:
    """The images of one run: training and validation subsets, the held-out set scored at the end,
    and for captioned digits the templates (the held-out ones never appear in training)."""

    name: str
    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    templates: list[str] = field(default_factory=list)
    test_templates: list[str] = field(default_factory=list)

    @property
    def by_label(self) -> bool:
        """Whether a caption says nothing but its image's class (captioned digits): pairs of one
        class are then interchangeable in the contrastive loss and in retrieval."""
        return self.name == "digits"


def _split(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """``images`` cut into (kept, held out) by a seeded permutation; nothing is held out at 0."""
    n_held = int(round(fraction * len(images)))
    if fraction > 0 and len(images) >= 2:
        n_held = min(max(n_held, 1), len(images) - 1)
    if n_held == 0:
        return images, None
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.subset(order[n_held:].sort().values), images.subset(order[:n_held].sort().values)


def load_vision_data(cfg: VisionTrainConfig, channels: int) -> VisionData:
    """The run's images (see ``VisionTrainConfig.data``); a folder is read with ``channels``."""
    if cfg.data == "digits":
        if cfg.task == "clip":
            train = captioned_digits("train", TRAIN_TEMPLATES, seed=cfg.seed)
            test = captioned_digits("test", TEST_TEMPLATES, seed=cfg.seed)
        else:
            train, test = digits("train"), digits("test")
        kept, val = _split(train, cfg.val_fraction, cfg.seed)
        templates = list(TRAIN_TEMPLATES) if cfg.task == "clip" else []
        return VisionData("digits", kept, val, test, templates, list(TEST_TEMPLATES) if cfg.task == "clip" else [])
    if cfg.data == "shapes":
        size = cfg.image_size or 32
        train = shapes(cfg.scenes, size=size, seed=cfg.seed)
        kept, val = _split(train, cfg.val_fraction, cfg.seed)
        return VisionData("shapes", kept, val, shapes(max(2, cfg.scenes // 4), size=size, seed=cfg.seed + 1))
    images = image_folder(cfg.data, size=cfg.image_size, channels=channels)
    if cfg.task == "classify" and len(images.class_names) < 2:
        raise DataError(f"{cfg.data} needs a 'label' column with at least two classes for --task classify.")
    if cfg.task == "clip" and images.captions is None:
        raise DataError(f"{cfg.data} needs a 'caption' column for --task clip.")
    if len(images) < 2:
        raise DataError(f"{cfg.data} lists {len(images)} image; training needs at least 2.")
    kept, held = _split(images, cfg.val_fraction, cfg.seed)
    return VisionData(images.name or "images", kept, held, held)


def _model_size(cfg: VisionTrainConfig, data: VisionData, preset_size: int) -> int:
    h, w = data.train.images.shape[-2:]
    return cfg.image_size or (int(h) if h == w else preset_size)


def _vision_config(vision: VisionConfig, size: int, channels: int, preset: str) -> dict[str, Any]:
    """The image-size and channel changes for a preset's image tower (empty when they already fit)."""
    if size % vision.patch_size:
        raise ConfigError(f"preset {preset!r} has {vision.patch_size}-pixel patches, which do not divide the image "
                          f"size {size}; pass --image-size with a multiple of {vision.patch_size}.")
    changes = {}
    if size != vision.image_size:
        changes["image_size"] = size
    if channels != vision.channels:
        changes["channels"] = channels
    return changes


def build_vision_model(cfg: VisionTrainConfig, data: VisionData) -> tuple[nn.Module, ImageProcessor | CLIPProcessor]:
    """A fresh model for the run (the preset with the data's image size and channels) and its
    processor, fitted on the training images."""
    preset = get_vision_preset(cfg.preset)  # type: ignore[arg-type]
    channels = int(data.train.images.shape[1])
    if isinstance(preset, VisionConfig):
        size = _model_size(cfg, data, preset.image_size)
        vcfg = preset.replace(**_vision_config(preset, size, channels, cfg.preset))  # type: ignore[arg-type]
        image = ImageProcessor.fitted(data.train.images, image_size=size)
        return VisionClassifier(vcfg, len(data.train.class_names)), image
    size = _model_size(cfg, data, preset.vision.image_size)
    tok = ByteTokenizer()
    vocab = 8 * math.ceil(tok.vocab_size / 8)
    changes: dict[str, Any] = {"vocab_size": vocab, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    vision = _vision_config(preset.vision, size, channels, cfg.preset)  # type: ignore[arg-type]
    if vision:
        changes["vision"] = vision
    ccfg = preset.replace(**changes)
    image = ImageProcessor.fitted(data.train.images, image_size=size)
    return CLIP(ccfg), CLIPProcessor(tok, image, ccfg.max_tokens)


def _image_processor(processor: ImageProcessor | CLIPProcessor) -> ImageProcessor:
    return processor.image if isinstance(processor, CLIPProcessor) else processor


def build_objective(cfg: VisionTrainConfig, data: VisionData, processor: ImageProcessor | CLIPProcessor) -> Any:
    """The task's objective over the run's training images and validation subset."""
    proc = _image_processor(processor)
    unit = proc.to_unit(data.train.images)  # (N, C, S, S) in [0, 1] at the model's size
    val = data.val
    val_unit = proc.to_unit(val.images) if val is not None else None
    common = {"batch_size": cfg.micro_batch_size, "max_shift": cfg.shift, "pad": cfg.pad}
    if cfg.task == "classify":
        return ImageClassification(unit, data.train.labels, proc.normalize, val_images=val_unit,
                                   val_labels=val.labels if val is not None else None, **common)
    assert isinstance(processor, CLIPProcessor) and data.train.captions is not None
    keep = [DIGIT_WORDS[int(y)] for y in data.train.labels] if data.by_label else None
    return Contrastive(
        unit, data.train.captions, processor.texts, proc.normalize, pad_id=processor.tokenizer.pad_id,
        groups=data.train.labels if data.by_label else None, word_dropout=float(cfg.word_dropout or 0.0), keep=keep,
        val_images=val_unit, val_captions=val.captions if val is not None else None,
        val_groups=val.labels if val is not None and data.by_label else None, **common,
    )


@dataclass
class VisionResult:
    """What a vision run produced: the loop's result and the held-out scores (None where the task
    or data has none). ``accuracy``: a classifier's test accuracy; ``zero_shot``: CLIP's zero-shot
    accuracy with the held-out templates; ``image_to_text`` / ``text_to_image``: recall@1 over the
    held-out pairs; ``word_order``: for shapes, how often an image's caption beats its reordered one."""

    fit: FitResult
    task: str
    data: str
    held_out: int
    parameters: int
    accuracy: float | None = None
    zero_shot: float | None = None
    image_to_text: float | None = None
    text_to_image: float | None = None
    word_order: float | None = None
    confusion: Tensor | None = None  # a classifier's (K, K) counts on the held-out images: true rows, predicted columns
    class_names: list[str] | None = None

    @property
    def checkpoint(self) -> Path | None:
        return self.fit.checkpoint


def _held_out_scores(model: nn.Module, processor: Any, data: VisionData, result: VisionResult) -> None:
    test = data.test
    if test is None or not len(test):
        return
    result.held_out = len(test)
    if isinstance(model, VisionClassifier):
        probs = classify_images(model, processor, test.images)
        predicted, k = probs.argmax(dim=-1), len(test.class_names)
        result.accuracy = float((predicted == test.labels).float().mean())
        result.confusion = torch.bincount(test.labels * k + predicted, minlength=k * k).view(k, k)
        result.class_names = list(test.class_names)
        return
    if data.by_label:
        probs = zero_shot(model, processor, test.images, list(test.class_names), data.test_templates)
        result.zero_shot = float((probs.argmax(dim=-1) == test.labels).float().mean())
    if test.captions is None or len(test) < 2:
        return
    images = embed_images(model, processor, test.images)  # (N, P)
    texts = embed_texts(model, processor, test.captions)  # (N, P), row i describes image i
    groups = test.labels if data.by_label else caption_groups(processor.texts(test.captions))
    result.image_to_text, result.text_to_image = retrieval_recall(images, texts, 1, groups=groups)
    if test.scenes is not None:
        reordered = embed_texts(model, processor, [s.reordered() for s in test.scenes])
        result.word_order = float(((images * texts).sum(-1) > (images * reordered).sum(-1)).float().mean())


def train_vision(
    cfg: VisionTrainConfig, *, out_dir: Path | str = "runs/vision", resume: bool = False, overwrite: bool = False,
    stop_after: int | None = None, log: Callable[[str], None] | None = None,
) -> VisionResult:
    """Train a ViT classifier or a CLIP model with the one loop; saves ``out_dir/checkpoint`` with
    the class names (and for captioned digits the training and held-out templates) in its
    metadata, then scores the held-out images. ``resume`` continues the run in ``out_dir``
    bit-exactly with its saved configuration; ``stop_after`` pauses at that step."""
    say = log or print_main
    out = Path(out_dir)
    check_run_dir(out, command=COMMAND, resume=resume, overwrite=overwrite)
    processor: ImageProcessor | CLIPProcessor
    if resume:
        model, processor, meta = load_checkpoint(out, kind=("vision", "clip"))
        saved = dict(meta.get("train", {}))
        if not saved:
            raise ConfigError(f"{out} was not written by triform {COMMAND}, so it cannot be resumed here.")
        cfg = VisionTrainConfig.from_saved(saved, **cfg.launch_settings())  # type: ignore[assignment]
        say(f"resuming {out} with its saved configuration")
    preset = get_vision_preset(cfg.preset)  # type: ignore[arg-type]
    channels = preset.channels if isinstance(preset, VisionConfig) else preset.vision.channels
    data = load_vision_data(cfg, channels)
    torch.manual_seed(cfg.seed)
    if not resume:
        model, processor = build_vision_model(cfg, data)
    objective = build_objective(cfg, data, processor)
    n_params = sum(p.numel() for p in model.parameters())
    steps = cfg.steps_for(len(data.train))
    say(f"{cfg.task} on {data.name}: {len(data.train)} training images"
        + (f", {len(data.val)} validation" if data.val is not None else "")
        + f"; model {cfg.preset}: {n_params / 1e6:.2f}M parameters; {steps} steps")
    meta: dict[str, Any] = {
        "task": cfg.task, "data": data.name, "labels": list(data.train.class_names),
        "templates": data.templates, "test_templates": data.test_templates,
        "train": cfg.saved_fields(),
    }
    claim_run_dir(out, command=COMMAND, resume=resume, overwrite=overwrite)
    fitted = fit(model, objective, cfg.replace(max_steps=steps), out_dir=out, tokenizer=processor, meta=meta,  # type: ignore[arg-type]
                 resume=resume, stop_after=stop_after, title=f"{cfg.preset} {cfg.task} on {data.name}", log=say)
    result = VisionResult(fitted, cfg.task, data.name, 0, n_params)
    _held_out_scores(model, processor, data, result)
    return result


__all__ = [
    "VisionTrainConfig", "VisionData", "VisionResult", "train_vision", "load_vision_data", "build_vision_model",
    "build_objective", "TASK_DEFAULTS",
]

