"""Image datasets for triform's vision models (ViT classifiers and CLIP-style image-text pairs).

Three sources, all offline:

* :func:`digits` and :func:`captioned_digits`: scikit-learn's 1,797 handwritten 8×8 digits (the data
  ships inside the scikit-learn package), with a fixed stratified train/test split and, for CLIP,
  captions drawn from templates; the test templates are held out from training.
* :func:`shapes`: synthetic scenes of two coloured shapes side by side, captioned "a red circle left
  of a blue square", so a model's grasp of word order can be checked against the reordered caption.
* :func:`image_folder`: users' own PNG/JPEG images listed in a ``labels.csv`` with class labels,
  captions or both.

Every loader returns an :class:`ImageSet`: float32 images (N, C, H, W) in [0, 1] and long labels (N,).
Mistakes in user input raise :class:`triform.errors.DataError` carrying one sentence.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from triform.errors import DataError

__all__ = [
    "COLOURS",
    "DIGIT_WORDS",
    "SHAPES",
    "TEST_TEMPLATES",
    "TRAIN_TEMPLATES",
    "ImageSet",
    "Scene",
    "caption",
    "captioned_digits",
    "digits",
    "image_folder",
    "render_scene",
    "shapes",
]


@dataclass
class ImageSet:
    """Images (N, C, H, W) float32 in [0, 1], integer labels (N,), class names, and optional captions (one per
    image). ``name`` says where the set came from; ``scenes`` holds the :class:`Scene` behind each image
    for sets made by :func:`shapes` and is None otherwise. Construction checks that every per-image field
    has N entries."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    captions: list[str] | None = None
    name: str = ""
    scenes: list[Scene] | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}.")
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise DataError(f"labels must have shape ({n},) to match the images, got {tuple(self.labels.shape)}.")
        if self.captions is not None and len(self.captions) != n:
            raise DataError(f"there are {len(self.captions)} captions for {n} images.")
        if self.scenes is not None and len(self.scenes) != n:
            raise DataError(f"there are {len(self.scenes)} scenes for {n} images.")

    def __len__(self) -> int:
        """The number of images."""
        return self.images.shape[0]

    def subset(self, idx: list[int] | torch.Tensor) -> ImageSet:
        """The images at the positions ``idx`` (a list of indices, an index tensor or a boolean mask of
        length N), with their labels, captions and scenes; class names and the name are kept."""
        index = torch.as_tensor(idx)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise DataError(f"a boolean mask must have {len(self)} entries, got {tuple(index.shape)}.")
            index = index.nonzero().flatten()
        index = index.long().flatten()
        if index.numel() and (int(index.max()) >= len(self) or int(index.min()) < -len(self)):
            raise DataError(f"an index in the subset is out of range for {len(self)} images.")
        positions = [int(i) % len(self) for i in index.tolist()] if len(self) else []
        return ImageSet(
            images=self.images[index].clone(),
            labels=self.labels[index].clone(),
            class_names=list(self.class_names),
            captions=None if self.captions is None else [self.captions[i] for i in positions],
            name=self.name,
            scenes=None if self.scenes is None else [self.scenes[i] for i in positions],
        )


# --------------------------------------------------------------------------------------------- digits

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_TEST_FRACTION = 0.2
_SPLIT_SEED = 0
_SPLITS = ("train", "test", "all")


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float32 in [0, 1], labels, train indices, test indices), all read-only."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float64) / 16.0).astype(np.float32)
    labels = np.asarray(data.target, dtype=np.int64)
    rng = np.random.default_rng(_SPLIT_SEED)
    test: list[np.ndarray] = []
    for c in range(len(DIGIT_WORDS)):
        members = np.flatnonzero(labels == c)
        n_test = int(round(_TEST_FRACTION * len(members)))
        test.append(members[rng.permutation(len(members))[:n_test]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    for a in (images, labels, train_idx, test_idx):
        a.setflags(write=False)
    return images, labels, train_idx, test_idx


def _split_indices(split: str) -> np.ndarray:
    if split not in _SPLITS:
        raise DataError(f"unknown digits split {split!r}; choose 'train', 'test' or 'all'.")
    images, _, train_idx, test_idx = _digits_arrays()
    return {"train": train_idx, "test": test_idx, "all": np.arange(len(images))}[split]


def digits(split: Literal["train", "test", "all"] = "train") -> ImageSet:
    """scikit-learn's handwritten digits as (N, 1, 8, 8) images in [0, 1] (pixel values 0..16 divided by
    16), labelled 0..9 with class names :data:`DIGIT_WORDS`. The split is fixed forever: within each class
    20% of the images (rounded) are held out for ``"test"``, picked by a permutation from
    ``numpy.random.default_rng(0)``, giving 1,438 train and 359 test images; ``"all"`` is all 1,797 in
    scikit-learn's order. Images keep scikit-learn's order within each split."""
    idx = _split_indices(split)
    images, labels, _, _ = _digits_arrays()
    return ImageSet(
        images=torch.tensor(images[idx]).unsqueeze(1),
        labels=torch.tensor(labels[idx]),
        class_names=list(DIGIT_WORDS),
        name=f"digits-{split}",
    )


TRAIN_TEMPLATES: tuple[str, ...] = (
    "a handwritten {}",
    "the digit {}",
    "a photo of the number {}",
    "a picture of a {}",
    "a drawing of {}",
    "the number {} written by hand",
    "a small image of a {}",
    "a blurry {}",
)

TEST_TEMPLATES: tuple[str, ...] = (
    "a scan of the numeral {}",
    "an image showing {}",
    "someone wrote {} here",
    "this looks like {} to me",
)


def caption(label_word: str, template: str) -> str:
    """The template with its ``{}`` replaced by the class word, e.g. ``caption("seven", "a handwritten {}")``
    is ``"a handwritten seven"``; other braces in the template are left alone."""
    if "{}" not in template:
        raise DataError(f"caption template {template!r} has no '{{}}' for the class word.")
    return template.replace("{}", label_word)


def captioned_digits(split: str = "train", templates: Sequence[str] = TRAIN_TEMPLATES, seed: int = 0) -> ImageSet:
    """The :func:`digits` split with one caption per image, for CLIP-style training: each image's template
    is drawn uniformly from ``templates`` by ``numpy.random.default_rng(seed)``, so the same seed always
    gives the same captions. Use :data:`TRAIN_TEMPLATES` for training and :data:`TEST_TEMPLATES` (never
    seen in training) to test how captions generalise."""
    templates = list(templates)
    if not templates:
        raise DataError("captioned_digits needs at least one caption template.")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise DataError(f"caption template {t!r} has no '{{}}' for the class word.")
    base = digits(split)  # type: ignore[arg-type]  # validated inside
    rng = np.random.default_rng(seed)
    choice = rng.integers(len(templates), size=len(base))
    base.captions = [caption(DIGIT_WORDS[int(y)], templates[int(k)]) for y, k in zip(base.labels, choice)]
    base.name = f"captioned-digits-{split}"
    return base


# --------------------------------------------------------------------------------------------- shapes

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
_OBJECTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
_BACKGROUND = (255, 255, 255)

# geometry, as fractions of the image size; with the largest jitter an object stays inside its half
_RADIUS = 0.16
_RADIUS_JITTER = 0.15  # relative: the radius is scaled by a factor in [0.85, 1.15]
_X_JITTER = 0.05
_Y_JITTER = 0.12


def _check_object(obj: object, where: str) -> tuple[str, str]:
    if not (isinstance(obj, tuple) and len(obj) == 2):
        raise DataError(f"the {where} object must be a (colour, shape) pair, got {obj!r}.")
    colour, shape = obj
    if colour not in COLOURS:
        raise DataError(f"unknown colour {colour!r}; choose one of {', '.join(COLOURS)}.")
    if shape not in SHAPES:
        raise DataError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}.")
    return colour, shape


@dataclass(frozen=True)
class Scene:
    """Two objects side by side, each a (colour, shape) pair with the colour from :data:`COLOURS` and the
    shape from :data:`SHAPES`; its caption says which is on the left. :func:`shapes` only makes scenes
    whose two objects differ, so the reordered caption is false for the image."""

    left: tuple[str, str]
    right: tuple[str, str]

    def __post_init__(self) -> None:
        _check_object(self.left, "left")
        _check_object(self.right, "right")

    def caption(self) -> str:
        """The true description, e.g. ``"a red circle left of a blue square"``."""
        return f"a {self.left[0]} {self.left[1]} left of a {self.right[0]} {self.right[1]}"

    def reordered(self) -> str:
        """The same words with the objects swapped, e.g. ``"a blue square left of a red circle"``: a
        caption that is false for this image (when the objects differ)."""
        return f"a {self.right[0]} {self.right[1]} left of a {self.left[0]} {self.left[1]}"


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y as a column, x as a row) for an image of this size."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    return centres[:, None], centres[None, :]


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    y, x = _pixel_grid(size)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        half = 0.85 * r
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    # triangle pointing up: apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
    return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)


def render_scene(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene drawn as a (size, size, 3) uint8 RGB image on a white background: the left object centred
    at a quarter of the width, the right one at three quarters, both half-way down with radius 0.16·size.
    Given ``rng``, each object's centre moves by up to 0.05·size across and 0.12·size down or up and its
    size by up to ±15%, always staying inside its own half; without ``rng`` the layout is exact."""
    if not isinstance(size, int) or size < 8:
        raise DataError(f"the image size must be a whole number of at least 8 pixels, got {size!r}.")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = _BACKGROUND
    for (colour, shape), x_frac in ((scene.left, 0.25), (scene.right, 0.75)):
        cx, cy, r = x_frac * size, 0.5 * size, _RADIUS * size
        if rng is not None:
            dx, dy, dr = rng.uniform(-1.0, 1.0, size=3)
            cx += dx * _X_JITTER * size
            cy += dy * _Y_JITTER * size
            r *= 1.0 + dr * _RADIUS_JITTER
        image[_shape_mask(shape, cx, cy, r, size)] = COLOURS[colour]
    return image


def shapes(n: int, *, size: int = 32, seed: int = 0) -> ImageSet:
    """``n`` random two-object scenes as (n, 3, size, size) images in [0, 1], captioned with
    :meth:`Scene.caption`. The two objects always differ in colour, shape or both; the label is the index
    of the left object among the 12 (colour, shape) combinations named in ``class_names`` ("red circle",
    "red square", ...), and ``scenes`` keeps each scene. Everything (scenes and jitter) comes from
    ``numpy.random.default_rng(seed)``, so a seed always gives the same set."""
    if not isinstance(n, int) or n < 0:
        raise DataError(f"the number of scenes must be a whole number of at least 0, got {n!r}.")
    if not isinstance(size, int) or size < 8:
        raise DataError(f"the image size must be a whole number of at least 8 pixels, got {size!r}.")
    rng = np.random.default_rng(seed)
    pixels = np.empty((n, size, size, 3), dtype=np.uint8)
    scenes: list[Scene] = []
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        a = int(rng.integers(len(_OBJECTS)))
        b = int(rng.integers(len(_OBJECTS) - 1))
        b += b >= a
        scene = Scene(_OBJECTS[a], _OBJECTS[b])
        pixels[i] = render_scene(scene, size, rng)
        scenes.append(scene)
        labels[i] = a
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return ImageSet(
        images=images,
        labels=torch.from_numpy(labels),
        class_names=[f"{c} {s}" for c, s in _OBJECTS],
        captions=[s.caption() for s in scenes],
        name="shapes",
        scenes=scenes,
    )


# --------------------------------------------------------------------------------------- image folder


def _read_csv(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The CSV's header and its rows, each with its line number."""
    try:
        raw = csv_path.read_bytes()
    except OSError as exc:
        raise DataError(f"{csv_path} could not be read ({exc.strerror or type(exc).__name__}).") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{csv_path}:{line} is not UTF-8 text.") from None
    if not text.strip():
        raise DataError(f"{csv_path} is empty; it needs a header row with 'file' and 'label' or 'caption'.")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in r.items() if isinstance(k, str)}) for r in reader]
    except csv.Error as exc:
        raise DataError(f"{csv_path}:{reader.line_num} is not valid CSV ({exc}).") from None
    return header, rows


def _open_image(file: Path, shown: str, mode: str, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im.load()
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise DataError(f"{shown} could not be read as a PNG or JPEG image.") from None


def image_folder(path: str | Path, *, size: int | None = None, channels: int = 3) -> ImageSet:
    """Users' own images: ``path`` is a folder holding a ``labels.csv``, or the CSV file itself. The CSV has
    a header row with a ``file`` column (image paths relative to the CSV's folder) and a ``label`` column
    (class names; ``class_names`` is their sorted set and labels index into it), a ``caption`` column
    (labels are then all 0 and ``class_names`` empty) or both. Images become RGB (``channels=3``) or
    greyscale (``channels=1``) and are resized to size×size with bicubic filtering when ``size`` is
    given; otherwise they must all share one size."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}.")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise DataError(f"the image size must be a whole number of at least 1 pixel, got {size!r}.")
    p = Path(path)
    if not p.exists():
        raise DataError(f"image folder {p} does not exist.")
    csv_path = p / "labels.csv" if p.is_dir() else p
    if not csv_path.is_file():
        raise DataError(f"{p} has no labels.csv listing its images with 'file' and 'label' or 'caption' columns.")
    header, rows = _read_csv(csv_path)
    if "file" not in header:
        raise DataError(f"{csv_path} has no 'file' column in its header (found: {', '.join(header) or 'nothing'}).")
    has_label, has_caption = "label" in header, "caption" in header
    if not (has_label or has_caption):
        raise DataError(f"{csv_path} needs a 'label' or 'caption' column next to 'file'.")
    if not rows:
        raise DataError(f"{csv_path} has a header but lists no images.")

    mode = "RGB" if channels == 3 else "L"
    root = csv_path.parent
    pixels: list[np.ndarray] = []
    names: list[str] = []
    captions: list[str] = []
    first: str | None = None
    for line, row in rows:
        name = row.get("file", "")
        if not name:
            raise DataError(f"{csv_path}:{line} has no file name.")
        if has_label and not row.get("label", ""):
            raise DataError(f"{csv_path}:{line} has no label for {name}.")
        if has_caption and not row.get("caption", ""):
            raise DataError(f"{csv_path}:{line} has no caption for {name}.")
        file = root / name
        if not file.is_file():
            raise DataError(f"{csv_path}:{line} lists {name}, which does not exist in {root}.")
        array = _open_image(file, name, mode, size)
        if pixels and array.shape != pixels[0].shape:
            h, w = array.shape[:2]
            h0, w0 = pixels[0].shape[:2]
            raise DataError(f"{name} is {w}x{h} pixels but {first} is {w0}x{h0}; pass --image-size to resize them all.")
        if first is None:
            first = name
        pixels.append(array)
        if has_label:
            names.append(row["label"])
        if has_caption:
            captions.append(row["caption"])

    stacked = np.stack(pixels)
    if stacked.ndim == 3:  # greyscale: (N, H, W)
        stacked = stacked[..., None]
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if has_label:
        class_names = sorted(set(names))
        index = {c: i for i, c in enumerate(class_names)}
        labels = torch.tensor([index[c] for c in names], dtype=torch.long)
    else:
        class_names = []
        labels = torch.zeros(len(pixels), dtype=torch.long)
    return ImageSet(
        images=images,
        labels=labels,
        class_names=class_names,
        captions=captions if has_caption else None,
        name=csv_path.parent.name if csv_path.name == "labels.csv" else csv_path.stem,
    )
