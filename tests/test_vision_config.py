"""Vision configs, processors and checkpoints: round trips, validation and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from triform.checkpoint import load_checkpoint, save_checkpoint
from triform.config import (
    BYTE_EOS,
    BYTE_PAD,
    CLIP_PRESETS,
    VISION_PRESETS,
    CLIPConfig,
    VisionConfig,
    count_clip_parameters,
    count_vision_parameters,
    get_vision_preset,
    vit_config,
)
from triform.data.processor import CLIPProcessor, ImageProcessor
from triform.errors import CheckpointError, ConfigError, DataError
from triform.models.clip import CLIP
from triform.models.decoder import DecoderLM
from triform.models.vision import VisionClassifier, VisionEncoder
from triform.tokenizers.byte import ByteTokenizer


@pytest.mark.parametrize("name", sorted(VISION_PRESETS))
def test_vision_presets_round_trip_and_count(name: str) -> None:
    cfg = VISION_PRESETS[name]
    assert VisionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.stack.max_seq_len == cfg.n_patches + 1
    if cfg.stack.d_model <= 128:
        model = VisionClassifier(cfg, 7)
        assert sum(p.numel() for p in model.parameters()) == count_vision_parameters(cfg, 7)


@pytest.mark.parametrize("name", sorted(CLIP_PRESETS))
def test_clip_presets_round_trip_and_count(name: str) -> None:
    cfg = CLIP_PRESETS[name]
    assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    if cfg.text.d_model <= 128:
        assert sum(p.numel() for p in CLIP(cfg).parameters()) == count_clip_parameters(cfg)


def test_byte_level_clip_pools_at_the_byte_tokenizers_eos() -> None:
    tok = ByteTokenizer()
    assert (BYTE_EOS, BYTE_PAD) == (tok.eos_id, tok.pad_id)
    assert CLIP_PRESETS["clip-digits"].vision.channels == 1 and CLIP_PRESETS["clip-digits"].vision.image_size == 8


def test_bad_vision_configs_name_the_field() -> None:
    with pytest.raises(ConfigError, match="patch_size .* must divide image_size"):
        vit_config(32, 1, 4, 64, image=30, patch=4)
    with pytest.raises(ConfigError, match="pool"):
        VISION_PRESETS["vit-digits"].replace(pool="max")
    with pytest.raises(ConfigError, match="pre-norm"):
        VISION_PRESETS["vit-digits"].replace(norm_placement="post")
    with pytest.raises(ConfigError, match="eos_id"):
        CLIP_PRESETS["clip-digits"].replace(eos_id=10_000)
    with pytest.raises(ConfigError, match="logit_scale_init"):
        CLIP_PRESETS["clip-digits"].replace(logit_scale_init=9.0)
    with pytest.raises(ConfigError, match="unknown vision preset 'vit-huge'; choose one of: clip-digits"):
        get_vision_preset("vit-huge")
    patch = CLIP_PRESETS["clip-digits"].vision.patch_size
    assert CLIP_PRESETS["clip-digits"].replace(vision={"image_size": 16}).vision.n_patches == (16 // patch) ** 2 > 4


def test_image_processor_normalises_resizes_and_round_trips(tmp_path: Path) -> None:
    proc = ImageProcessor(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    out = proc(x)
    torch.testing.assert_close(out[:, 1], (x[:, 1] - 0.4) / 0.25)
    assert proc(torch.rand(2, 3, 40, 24, generator=g)).shape == (2, 3, 16, 16)
    grey = ImageProcessor(16, 1)
    assert grey(x).shape == (2, 1, 16, 16)  # RGB converted to luminance
    torch.testing.assert_close(grey.to_unit(x)[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    u8 = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    torch.testing.assert_close(proc.to_unit(u8), torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)
    proc.save(tmp_path)
    assert ImageProcessor.load(tmp_path) == proc
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        ImageProcessor.load(tmp_path)
    with pytest.raises(DataError, match="channels"):
        ImageProcessor(8, 3)(torch.rand(1, 2, 8, 8))


def test_clip_processor_lays_out_captions() -> None:
    proc = CLIPProcessor(ByteTokenizer(), ImageProcessor(8, 1), context=8)
    rows = proc.texts(["ab", "a long caption"])
    tok = ByteTokenizer()
    assert rows[0].tolist() == [tok.bos_id, ord("a"), ord("b"), tok.eos_id] + [tok.pad_id] * 4
    assert rows[1].tolist() == [tok.bos_id, *b"a long", tok.eos_id]  # cut, but the eos is kept
    with pytest.raises(DataError, match="empty caption"):
        proc.texts(["  "])


def test_vision_checkpoints_round_trip_and_refuse_other_kinds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = VisionClassifier(VISION_PRESETS["vit-digits"], 10).eval()
    save_checkpoint(tmp_path / "vit", vit, ImageProcessor(8, 1, (0.3,), (0.4,)), extra={"labels": list("0123456789")})
    model, proc, meta = load_checkpoint(tmp_path / "vit", kind="vision")
    x = torch.randn(3, 1, 8, 8)
    assert isinstance(model, VisionClassifier) and meta["num_labels"] == 10 and proc.mean == (0.3,)
    torch.testing.assert_close(model(x), vit(x), rtol=0, atol=0)
    save_checkpoint(tmp_path / "bare", VisionEncoder(VISION_PRESETS["vit-digits"]), ImageProcessor(8, 1))
    assert isinstance(load_checkpoint(tmp_path / "bare", kind="vision")[0], VisionEncoder)

    clip = CLIP(CLIP_PRESETS["clip-digits"]).eval()
    save_checkpoint(tmp_path / "clip", clip, CLIPProcessor(ByteTokenizer(), ImageProcessor(8, 1), 64))
    loaded, cproc, _ = load_checkpoint(tmp_path / "clip", kind="clip")
    t = cproc.texts(["a seven", "the digit two"])
    torch.testing.assert_close(loaded(x, t).logits_per_image, clip(x, t).logits_per_image, rtol=0, atol=0)

    with pytest.raises(CheckpointError, match="holds a CLIP model; this command needs a ViT checkpoint"):
        load_checkpoint(tmp_path / "clip", kind="vision")
    with pytest.raises(CheckpointError, match="holds a vision encoder"):
        load_checkpoint(tmp_path / "vit")  # the default: a decoder
    (tmp_path / "vit" / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        load_checkpoint(tmp_path / "vit", kind="vision")
    assert not isinstance(model, DecoderLM)


def test_image_processor_reads_pil_images_of_different_sizes_and_modes() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8))  # greyscale, already the model's size
    out = ImageProcessor(8, 1).to_unit([a, b])
    assert out.shape == (2, 1, 8, 8)
    torch.testing.assert_close(out[1, 0], torch.from_numpy(np.asarray(b, dtype=np.float32) / 255))
