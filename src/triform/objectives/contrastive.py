"""Objectives for the vision models: image classification (a ViT with a linear head) and CLIP's
contrastive image-text loss, both over finite sets drawn in shuffled epochs.

``ImageClassification`` is cross-entropy per image. ``Contrastive`` is CLIP's symmetric InfoNCE
(arXiv 2103.00020, Figure 3): within a micro-batch of B pairs every image is scored against every
caption, and the loss is the mean of the image→text and the text→image cross-entropies against the
matching pairs. Both take images in [0, 1], already at the model's size, and normalise each batch
after the optional augmentation, so the border a shift uncovers is real black (or the image's own
edge), never a normalised zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.errors import ConfigError
from triform.objectives.base import Batch, BatchRng
from triform.objectives.finetune import _Finetune

PadMode = Literal["zeros", "edge"]


def random_shift(images: Tensor, max_shift: int, gen: torch.Generator, *, pad: PadMode = "zeros") -> Tensor:
    """Each image moved by its own whole-pixel offset (dy, dx), each drawn uniformly from
    [-max_shift, max_shift] by ``gen``; the uncovered border is black ("zeros") or repeats the
    image's edge pixels ("edge"). The size is unchanged."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    k = max_shift
    offsets = torch.randint(-k, k + 1, (2, b), generator=gen)  # (2, B): dy, dx per image
    padded = F.pad(images, (k, k, k, k), mode="constant" if pad == "zeros" else "replicate")  # (B, C, H+2k, W+2k)
    rows = torch.arange(h)[None, :] + k - offsets[0][:, None]  # (B, H)
    cols = torch.arange(w)[None, :] + k - offsets[1][:, None]  # (B, W)
    picked = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return picked.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


class _ImageEpochs(_Finetune):
    """What both objectives share: images in [0, 1] drawn in shuffled epochs (the fine-tuning
    objectives' order, summary and saved state), the per-batch augmentation and normalisation."""

    def __init__(self, images: Tensor, normalize: Callable[[Tensor], Tensor], *, batch_size: int, max_shift: int,
                 pad: PadMode, eval_batch_size: int) -> None:
        if max_shift < 0:
            raise ConfigError(f"the augmentation shift must be a whole number of pixels >= 0, got {max_shift!r}.")
        if pad not in ("zeros", "edge"):
            raise ConfigError(f"the augmentation padding must be zeros or edge, got {pad!r}.")
        super().__init__(len(images), batch_size)
        self.images, self.normalize = images, normalize
        self.max_shift, self.pad, self.eval_batch_size = max_shift, pad, eval_batch_size

    def pixels(self, idx: list[int], rng: BatchRng | None) -> Tensor:
        """Normalised pixels (B, C, H, W) of the images at ``idx``, shifted when training (``rng``)."""
        unit = self.images[idx]
        if rng is not None:
            unit = random_shift(unit, self.max_shift, rng.gen, pad=self.pad)
        return self.normalize(unit)


class ImageClassification(_ImageEpochs):
    """Cross-entropy per image of a classifier ``model(pixels) -> logits (B, K)``, summed over a
    micro-batch with count = images; the held-out batches also report ``accuracy``.

    ``images`` (N, C, H, W) are in [0, 1] at the model's size and ``normalize`` maps them to the
    model's inputs (an ``ImageProcessor``'s ``normalize``). Training batches come in shuffled epochs,
    each image shifted by up to ``max_shift`` pixels (0: no augmentation) with the offsets drawn from
    the run's torch generator, so a resumed run draws the same ones. ``val_images`` / ``val_labels``
    are the held-out subset scored at every evaluation (none: the run has no held-out loss)."""

    name = "image-classify"

    def __init__(self, images: Tensor, labels: Tensor, normalize: Callable[[Tensor], Tensor], *, batch_size: int,
                 val_images: Tensor | None = None, val_labels: Tensor | None = None, max_shift: int = 0,
                 pad: PadMode = "zeros", eval_batch_size: int = 256) -> None:
        super().__init__(images, normalize, batch_size=batch_size, max_shift=max_shift, pad=pad,
                         eval_batch_size=eval_batch_size)
        self.labels, self.val_images, self.val_labels = labels, val_images, val_labels

    def batch(self, rng: BatchRng) -> Batch:
        idx = self.take(rng)
        tensors = {"pixels": self.pixels(idx, rng), "y": self.labels[idx]}
        return Batch(tensors, self.counts(tensors))

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        n = len(tensors["y"])
        return {"loss": n, "accuracy": n}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = model(batch["pixels"]).float()  # (B, K)
        y = batch["y"]
        return {"loss": F.cross_entropy(logits, y, reduction="sum"), "accuracy": (logits.argmax(-1) == y).sum().float()}

    def eval_batches(self, final: bool) -> Iterator[Batch]:
        if self.val_images is None or self.val_labels is None or not len(self.val_labels):
            return
        for start in range(0, len(self.val_labels), self.eval_batch_size):
            idx = list(range(start, min(start + self.eval_batch_size, len(self.val_labels))))
            tensors = {"pixels": self.normalize(self.val_images[idx]), "y": self.val_labels[idx]}
            yield Batch(tensors, self.counts(tensors))


def positive_mask(groups: Tensor) -> Tensor:
    """(B, B) float targets: row i spreads probability 1 evenly over the pairs whose group equals
    pair i's (always including i itself)."""
    same = (groups[:, None] == groups[None, :]).float()  # (B, B)
    return same / same.sum(dim=1, keepdim=True)


def contrastive_loss(logits_per_image: Tensor, groups: Tensor | None = None) -> Tensor:
    """CLIP's symmetric InfoNCE, summed over the B pairs of a batch: for each pair the mean of its
    image→text cross-entropy (row of ``logits_per_image`` (B, B)) and its text→image cross-entropy
    (column), each against its own pair. With ``groups`` (B,), pairs that share a group are all
    correct answers for each other and the target spreads evenly over them; all groups distinct (or
    None) is exactly the diagonal target of the paper."""
    logits = logits_per_image.float()
    b = logits.shape[0]
    if groups is None:
        target = torch.arange(b, device=logits.device)
        image_to_text = F.cross_entropy(logits, target, reduction="sum")
        return (image_to_text + F.cross_entropy(logits.t(), target, reduction="sum")) / 2
    soft = positive_mask(groups.to(logits.device))  # symmetric: the same targets serve both directions
    image_to_text = -(soft * logits.log_softmax(dim=1)).sum()
    text_to_image = -(soft * logits.t().log_softmax(dim=1)).sum()
    return (image_to_text + text_to_image) / 2


class Contrastive(_ImageEpochs):
    """CLIP's contrastive objective over image-caption pairs, for ``model(pixels, tokens) ->
    CLIPOutput``: the symmetric InfoNCE of ``contrastive_loss`` summed over each micro-batch's pairs,
    count = pairs; the held-out batches also report ``image_to_text`` and ``text_to_image``, the
    fraction of queries whose best match within the batch is a correct one.

    Negatives come from the micro-batch only: each micro-batch is scored on its own, so under
    gradient accumulation or several ranks every micro-batch has its own B - 1 negatives (open_clip
    instead gathers the features of every rank into one large similarity matrix). A larger
    micro-batch means more negatives.

    Duplicate captions: in a batch drawn at random from captioned digits many pairs show the same
    digit, often with the very same caption; identical captions have identical embeddings, so a
    one-hot diagonal target is unreachable and teaches the towers noise. ``groups`` (N,) says which
    pairs are interchangeable (by default pairs with identical captions; ``train_vision`` passes the
    class labels for digits, whose captions carry nothing but the class), and the target of each
    pair spreads evenly over the pairs of its group in the batch (soft targets). This keeps batches
    of any size drawn in plain shuffled epochs, rather than capping a batch at one pair per class;
    with all groups distinct the loss is exactly the paper's.

    ``images`` (N, C, H, W) are in [0, 1] at the model's size, ``captions`` one per image, and
    ``texts`` lays captions out as token rows (``CLIPProcessor.texts``: right-padded with
    ``pad_id``); each batch is trimmed to its longest caption. ``word_dropout`` drops each word of a
    training caption with that probability (drawn from the run's Python stream), except the pair's
    word in ``keep`` (e.g. its class word), so the text tower cannot lean on a template's wording;
    held-out captions are never changed. ``normalize`` and the image augmentation are as in
    ``ImageClassification``."""

    name = "contrastive"

    def __init__(self, images: Tensor, captions: list[str], texts: Callable[[list[str]], Tensor],
                 normalize: Callable[[Tensor], Tensor], *, pad_id: int, batch_size: int, groups: Tensor | None = None,
                 word_dropout: float = 0.0, keep: list[str] | None = None, val_images: Tensor | None = None,
                 val_captions: list[str] | None = None, val_groups: Tensor | None = None, max_shift: int = 0,
                 pad: PadMode = "zeros", eval_batch_size: int = 256) -> None:
        if batch_size < 2:
            raise ConfigError("a contrastive batch needs at least 2 pairs, so every image has a negative caption.")
        if not 0 <= word_dropout < 1:
            raise ConfigError(f"word_dropout must be in [0, 1), got {word_dropout!r}.")
        super().__init__(images, normalize, batch_size=batch_size, max_shift=max_shift, pad=pad,
                         eval_batch_size=eval_batch_size)
        self.captions, self.texts, self.pad_id = list(captions), texts, pad_id
        self.word_dropout, self.keep = word_dropout, keep
        self.tokens = texts(self.captions)  # (N, T)
        self.groups = caption_groups(self.tokens) if groups is None else groups
        self.val_images = val_images
        self.val_tokens = texts(list(val_captions)) if val_captions else None
        if self.val_tokens is not None and val_groups is None:
            val_groups = caption_groups(self.val_tokens)
        self.val_groups = val_groups

    def _tensors(self, pixels: Tensor, tokens: Tensor, groups: Tensor) -> dict[str, Tensor]:
        width = int((tokens != self.pad_id).sum(dim=1).max())  # trim the batch's padding
        return {"pixels": pixels, "tokens": tokens[:, :width], "groups": groups}

    def _dropped(self, i: int, rng: BatchRng) -> str:
        words = self.captions[i].split()
        kept = self.keep[i] if self.keep is not None else None
        out = [w for w in words if w == kept or rng.py.random() >= self.word_dropout]
        return " ".join(out) if out else self.captions[i]

    def batch(self, rng: BatchRng) -> Batch:
        idx = self.take(rng)
        if self.word_dropout > 0:
            tokens = self.texts([self._dropped(i, rng) for i in idx])
        else:
            tokens = self.tokens[idx]
        tensors = self._tensors(self.pixels(idx, rng), tokens, self.groups[idx])
        return Batch(tensors, self.counts(tensors))

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        n = len(tensors["groups"])
        tokens = int((tensors["tokens"] != self.pad_id).sum())
        return {"loss": n, "image_to_text": n, "text_to_image": n, "tokens": tokens}

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        out = model(batch["pixels"], batch["tokens"])
        logits, groups = out.logits_per_image.float(), batch["groups"]  # (B, B), (B,)
        hit_i2t = (groups[logits.argmax(dim=1)] == groups).sum().float()
        hit_t2i = (groups[logits.argmax(dim=0)] == groups).sum().float()
        return {"loss": contrastive_loss(logits, groups), "image_to_text": hit_i2t, "text_to_image": hit_t2i}

    def eval_batches(self, final: bool) -> Iterator[Batch]:
        if self.val_images is None or self.val_tokens is None or self.val_groups is None:
            return
        n = len(self.val_tokens)
        for start in range(0, n, self.eval_batch_size):
            end = min(start + self.eval_batch_size, n)
            if end - start < 2:
                break  # a lone pair has no negative to score against
            idx = list(range(start, end))
            tensors = self._tensors(self.normalize(self.val_images[idx]), self.val_tokens[idx], self.val_groups[idx])
            yield Batch(tensors, self.counts(tensors))


def caption_groups(tokens: Tensor) -> Tensor:
    """(N,) group ids of caption rows (N, T): equal ids exactly for identical rows."""
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


__all__ = ["ImageClassification", "Contrastive", "contrastive_loss", "positive_mask", "caption_groups", "random_shift"]
