"""What turns raw inputs into a vision model's tensors, saved with its checkpoint in place of a
tokenizer: ``ImageProcessor`` (resize and normalise images) and ``CLIPProcessor`` (that, plus the
text tokenizer and the caption layout ``<bos> text <eos> <pad>...``).

``ImageProcessor.save`` writes ``preprocessor_config.json`` with Hugging Face's field names (size,
image_mean, image_std), so an exported folder is also read by ``transformers``' image processors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from triform.errors import CheckpointError, DataError
from triform.tokenizers.base import Tokenizer, load_tokenizer

PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageProcessor:
    """Images -> (B, C, S, S) float tensors: converted to ``channels``, resized to ``image_size``
    (bicubic with antialiasing), scaled to [0, 1], then ``(x - mean) / std`` per channel.

    The resize goes straight to a square; Hugging Face's CLIP processor resizes the shortest edge and
    crops the centre instead, so a non-square photo is framed differently (square inputs agree up to
    the resampling filter)."""

    image_size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    kind: str = "image"

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # one value stands for every channel
            values = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, values * self.channels if len(values) == 1 else values)
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise DataError(f"an image processor needs {self.channels} means and {self.channels} positive standard deviations.")

    @classmethod
    def fitted(cls, images: Tensor, image_size: int | None = None) -> ImageProcessor:
        """A processor whose mean and std are the per-channel statistics of ``images`` (N, C, H, W) in [0, 1]."""
        c = images.shape[1]
        flat = images.transpose(0, 1).reshape(c, -1).double()
        std = flat.std(dim=1).clamp(min=1e-3)
        return cls(image_size=image_size or images.shape[-1], channels=c, mean=tuple(flat.mean(dim=1).tolist()),
                   std=tuple(std.tolist()))

    def to_unit(self, images: Any) -> Tensor:
        """(B, C, S, S) in [0, 1] from a tensor or array (B, C, H, W) in [0, 1], uint8 arrays
        (B, H, W[, C]), or a list of PIL images; resized to ``image_size`` when needed."""
        if isinstance(images, Tensor):
            x = images.float()
        elif isinstance(images, np.ndarray):
            x = torch.from_numpy(images)
            if images.dtype == np.uint8:
                x = (x.float() / 255.0)
                x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
            x = x.float()
        elif isinstance(images, Sequence):  # PIL images, each resized on its own (their sizes may differ)
            if not images:
                raise DataError("no images given.")
            return torch.cat([self.to_unit(self._from_pil(im)[None]) for im in images])
        else:
            raise DataError(f"cannot read images from a {type(images).__name__}.")
        if x.dim() != 4:
            raise DataError(f"expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}.")
        if x.shape[1] != self.channels:
            if x.shape[1] == 3 and self.channels == 1:
                x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            elif x.shape[1] == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise DataError(f"images have {x.shape[1]} channels; this model reads {self.channels}.")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        return x

    def _from_pil(self, image: Any) -> Tensor:
        mode = "L" if self.channels == 1 else "RGB"
        a = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())

    def normalize(self, unit: Tensor) -> Tensor:
        """(x - mean) / std per channel of images in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=unit.dtype, device=unit.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=unit.dtype, device=unit.device).view(1, -1, 1, 1)
        return (unit - mean) / std

    def __call__(self, images: Any) -> Tensor:
        return self.normalize(self.to_unit(images))

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std),
            "triform": {"kind": self.kind, "channels": self.channels},
        }

    def save(self, directory: Path) -> None:
        (Path(directory) / PREPROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageProcessor:
        size = data.get("size", {})
        side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
        mean, std = data.get("image_mean", [0.5]), data.get("image_std", [0.5])
        mean, std = ([v] if isinstance(v, (int, float)) else v for v in (mean, std))  # one value for every channel
        channels = int(data.get("triform", {}).get("channels", len(mean)))
        return cls(image_size=int(side), channels=channels, mean=tuple(mean), std=tuple(std))

    @classmethod
    def load(cls, directory: Path) -> ImageProcessor:
        path = Path(directory) / PREPROCESSOR_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise CheckpointError(f"{directory} has no {PREPROCESSOR_FILE}; it is not a complete vision checkpoint.") from None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError, DataError):
            raise CheckpointError(f"{path} is corrupt (not an image processor config).") from None


@dataclass(frozen=True)
class CLIPProcessor:
    """CLIP's inputs: ``images(...)`` through the image processor, ``texts(...)`` as right-padded
    rows ``<bos> tokens <eos> <pad>...`` of at most ``context`` tokens (longer captions are cut
    before their end-of-text token, which is always kept: the text tower pools there)."""

    tokenizer: Tokenizer
    image: ImageProcessor
    context: int
    kind: str = "clip"

    def images(self, images: Any) -> Tensor:
        return self.image(images)

    def encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise DataError("empty caption: every text needs at least one character.")
        ids = self.tokenizer.encode(text)[: self.context - 2]
        return [self.tokenizer.bos_id, *ids, self.tokenizer.eos_id]

    def texts(self, texts: Sequence[str]) -> Tensor:
        rows = [self.encode_text(t) for t in texts]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out  # (B, T)

    def save(self, directory: Path) -> None:
        self.tokenizer.save(directory)
        data = self.image.to_dict()
        data["triform"].update(kind="clip", context=self.context)
        (Path(directory) / PREPROCESSOR_FILE).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, directory: Path) -> CLIPProcessor:
        image = ImageProcessor.load(directory)
        data = json.loads((Path(directory) / PREPROCESSOR_FILE).read_text())
        return cls(load_tokenizer(Path(directory)), image, int(data.get("triform", {}).get("context", 77)))


__all__ = ["ImageProcessor", "CLIPProcessor", "PREPROCESSOR_FILE"]
