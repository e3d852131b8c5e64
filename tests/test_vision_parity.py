"""ViT and CLIP against Hugging Face transformers: tiny random HF models copied into triform and
compared in float32, triform's export loaded back by ``from_pretrained``, ``triform convert`` both
ways, the published parameter counts, and the invariances the vision models rest on (a causal text
tower, bidirectional image attention, position resizing, the patch embedding as a convolution)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.testing import assert_close

from conftest import cli_error
from triform.checkpoint import load_checkpoint, save_checkpoint
from triform.cli.main import main
from triform.config import (
    BYTE_EOS,
    BYTE_PAD,
    BYTE_VOCAB,
    CLIP_PRESETS,
    VISION_PRESETS,
    CLIPConfig,
    VisionConfig,
    clip_config,
    count_clip_parameters,
    count_vision_parameters,
    vit_config,
)
from triform.data.processor import CLIPProcessor, ImageProcessor
from triform.errors import CheckpointError, ConfigError
from triform.interop import load_pretrained
from triform.interop.hf_vision import (
    clip_config_from_hf,
    clip_config_to_hf,
    clip_from_hf,
    hf_vision_checkpoint,
    load_hf_vision,
    save_hf_vision,
    vision_from_hf,
    vit_config_from_hf,
    vit_config_to_hf,
)
from triform.models.clip import CLIP
from triform.models.vision import PatchEmbedding, VisionClassifier, VisionEncoder, resize_positions
from triform.tokenizers.byte import ByteTokenizer

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB, PAD, BOS = 99, 0, 1


def _jitter(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Every parameter moved off its initial value (unit norms, zero biases and heads would hide a swap)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _pixels(size: int | tuple[int, int] = 16, n: int = 2, channels: int = 3, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, channels, h, w, generator=torch.Generator().manual_seed(seed))


def _captions(eos: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows ``<bos> tokens <eos> <pad>...`` of lengths 12, 8 and 5, and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (3, 12), generator=g)
    ids[ids == eos] = 4
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    for row, n in enumerate((12, 8, 5)):
        ids[row, n - 1] = eos
        ids[row, n:] = PAD
        mask[row, n:] = 0
    return ids, mask


def _hf_vit(classes: int = 0) -> transformers.ViTConfig:
    extra = {"num_labels": classes} if classes else {}
    return transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  image_size=16, patch_size=4, **extra)


def _hf_clip(eos: int) -> transformers.CLIPConfig:
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=16, eos_token_id=eos, bos_token_id=BOS, pad_token_id=PAD)
    vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=16,
                  patch_size=4)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def _tiny_vit() -> VisionConfig:
    return vit_config(32, 2, 4, 37, image=16, patch=4)


def _tiny_clip() -> CLIPConfig:
    return clip_config(vision=(48, 2, 4, 40), text=(32, 2, 4, 37), image=16, patch=4, context=16, vocab=BYTE_VOCAB,
                       projection=24, eos_id=BYTE_EOS, pad_id=BYTE_PAD)


def _no_loading_issues(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info.get(key))


# ---------------------------------------------------------------------------------------------- HF -> triform


def test_vit_model_with_pooler_matches_transformers() -> None:
    hf = _jitter(transformers.ViTModel(_hf_vit()))
    ours = vision_from_hf(vit_config_from_hf(hf.config.to_dict(), pooler=True), hf.state_dict())
    x = _pixels()
    with torch.no_grad():
        want = hf(pixel_values=x)
        hidden = ours(x)
        assert_close(hidden, want.last_hidden_state, **TOL)
        assert_close(ours.pool(hidden), want.pooler_output, **TOL)
        # other image sizes: HF's interpolate_pos_encoding and triform's resize are the same bicubic resize
        for size in (24, (20, 28)):
            x = _pixels(size, seed=2)
            assert_close(ours(x), hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state, **TOL)
            h, w = x.shape[-2:]
            tokens = torch.zeros(1, 1 + (h // 4) * (w // 4), 32)  # HF reads only its shape
            theirs = hf.embeddings.interpolate_pos_encoding(tokens, h, w)[0]  # (1 + N', d)
            assert torch.equal(resize_positions(ours.position, 4, (h // 4, w // 4)), theirs)


def test_vit_classifier_matches_transformers() -> None:
    hf = _jitter(transformers.ViTForImageClassification(_hf_vit(classes=5)))
    cfg = vit_config_from_hf(hf.config.to_dict())
    ours = vision_from_hf(cfg, hf.state_dict(), num_labels=5)
    x = _pixels()
    with torch.no_grad():
        assert_close(ours(x), hf(pixel_values=x).logits, **TOL)


@pytest.mark.parametrize("legacy", [False, True], ids=["first-eos", "legacy-eos-2"])
def test_clip_matches_transformers(legacy: bool) -> None:
    """HF pools captions at their first eos_token_id; a config whose eos_token_id is 2 pools at the
    largest id instead, which triform reads as eos_id = vocab_size - 1 (CLIP's end-of-text id)."""
    hf = _jitter(transformers.CLIPModel(_hf_clip(eos=2 if legacy else 50)))
    cfg = clip_config_from_hf(hf.config.to_dict())
    assert cfg.eos_id == (VOCAB - 1 if legacy else 50)
    ours = clip_from_hf(cfg, hf.state_dict())
    ids, mask = _captions(cfg.eos_id)
    x = _pixels(n=2)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=x, attention_mask=mask)
        got = ours(x, ids)
        for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
            assert_close(getattr(got, name), getattr(want, name), **TOL)
        # real tokens' hidden states agree too (padding keys are masked in HF, behind the causal mask in triform)
        real = mask.bool()
        assert_close(ours.text(ids)[real], want.text_model_output.last_hidden_state[real], **TOL)
        x = _pixels(24, seed=3)  # CLIP's interpolate_pos_encoding
        features = hf.get_image_features(pixel_values=x, interpolate_pos_encoding=True).pooler_output  # (B, P)
        assert_close(ours.embed_images(x), F.normalize(features, dim=-1), **TOL)


def test_config_errors_are_one_sentence() -> None:
    base = _hf_vit().to_dict()
    with pytest.raises(ConfigError, match="qkv_bias"):
        vit_config_from_hf({**base, "qkv_bias": False})
    with pytest.raises(ConfigError, match="not square"):
        vit_config_from_hf({**base, "image_size": [16, 32]})
    with pytest.raises(ConfigError, match="activation"):
        vit_config_from_hf({**base, "hidden_act": "swish"})
    with pytest.raises(ConfigError, match="not a ViT"):
        vit_config_from_hf({**base, "model_type": "bert"})
    clip = _hf_clip(eos=50).to_dict()
    clip["text_config"]["eos_token_id"] = [50, 51]
    with pytest.raises(ConfigError, match="one integer"):
        clip_config_from_hf(clip)
    with pytest.raises(ConfigError, match="legacy"):
        clip_config_to_hf(_tiny_clip().replace(eos_id=2))
    with pytest.raises(ConfigError, match="ViT-shaped"):
        vit_config_to_hf(_tiny_clip().vision)


# ---------------------------------------------------------------------------------------------- triform -> HF


def test_vit_export_loads_in_transformers(tmp_path: Path) -> None:
    cfg = _tiny_vit()
    classifier = _jitter(VisionClassifier(cfg, 3))
    labels = ["cat", "dog", "eel"]
    folder = save_hf_vision(classifier, tmp_path / "cls", processor=ImageProcessor(image_size=16), labels=labels)
    hf, info = transformers.ViTForImageClassification.from_pretrained(folder, output_loading_info=True)
    _no_loading_issues(info)
    assert hf.config.id2label == dict(enumerate(labels))
    x = _pixels()
    with torch.no_grad():
        assert_close(hf(pixel_values=x).logits, classifier(x), **TOL)
        back, processor, meta = load_hf_vision(folder)
        assert isinstance(back, VisionClassifier) and meta["labels"] == labels
        assert processor == ImageProcessor(image_size=16)
        assert torch.equal(back(x), classifier(x))

    encoder = _jitter(VisionEncoder(cfg.replace(pooler=True)))
    folder = save_hf_vision(encoder, tmp_path / "enc")
    hf, info = transformers.ViTModel.from_pretrained(folder, output_loading_info=True)
    _no_loading_issues(info)
    with torch.no_grad():
        want, hidden = hf(pixel_values=x), encoder(x)
        assert_close(want.last_hidden_state, hidden, **TOL)
        assert_close(want.pooler_output, encoder.pool(hidden), **TOL)
    with pytest.raises(ConfigError, match="labels"):
        save_hf_vision(classifier, tmp_path / "bad", labels=["one"])


def test_clip_export_loads_in_transformers(tmp_path: Path) -> None:
    model = _jitter(CLIP(_tiny_clip()))
    tok = ByteTokenizer()
    processor = CLIPProcessor(tok, ImageProcessor(image_size=16), context=16)
    folder = save_hf_vision(model, tmp_path / "clip", processor=processor)
    hf, info = transformers.CLIPModel.from_pretrained(folder, output_loading_info=True)
    _no_loading_issues(info)
    text = hf.config.text_config
    assert (text.eos_token_id, text.pad_token_id, text.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    ids = processor.texts(["a cat", "two dogs on a mat"])  # (2, T), right-padded with <pad>
    x = _pixels(n=3)
    with torch.no_grad():
        want, got = hf(input_ids=ids, pixel_values=x, attention_mask=(ids != tok.pad_id).long()), model(x, ids)
        for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
            assert_close(getattr(want, name), getattr(got, name), **TOL)
        back, proc, _ = load_hf_vision(folder)
        assert isinstance(proc, CLIPProcessor) and proc.context == 16 and proc.image == processor.image
        assert torch.equal(back(x, ids).logits_per_image, got.logits_per_image)


def test_hf_save_pretrained_loads_in_triform(tmp_path: Path) -> None:
    hf = _jitter(transformers.ViTForImageClassification(_hf_vit(classes=3)))
    hf.config.id2label, hf.config.label2id = {0: "a", 1: "b", 2: "c"}, {"a": 0, "b": 1, "c": 2}
    hf.save_pretrained(tmp_path / "vit")
    pre = {"image_processor_type": "ViTImageProcessor", "size": {"height": 16, "width": 16},
           "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(pre))
    model, processor, meta = load_hf_vision(tmp_path / "vit")
    assert meta["labels"] == ["a", "b", "c"]
    assert processor == ImageProcessor(image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = _pixels()
    with torch.no_grad():
        assert_close(model(x), hf(pixel_values=x).logits, **TOL)

    clip = _jitter(transformers.CLIPModel(_hf_clip(eos=50)))
    clip.save_pretrained(tmp_path / "clip")
    model, processor, _ = load_hf_vision(tmp_path / "clip")
    assert isinstance(model, CLIP) and processor is None  # no triform tokenizer for HF's BPE
    ids, mask = _captions(50)
    with torch.no_grad():
        assert_close(model(x, ids).logits_per_text, clip(input_ids=ids, pixel_values=x, attention_mask=mask)
                     .logits_per_text, **TOL)
    with pytest.raises(ConfigError, match="needs both"):
        hf_vision_checkpoint(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="not a decoder"):
        load_pretrained(tmp_path / "vit")


def test_convert_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _jitter(VisionClassifier(_tiny_vit(), 3))
    processor = ImageProcessor(image_size=16, mean=(0.4,), std=(0.3,))
    src = save_checkpoint(tmp_path / "ckpt", model, processor, extra={"labels": ["x", "y", "z"]})
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, proc, meta = load_checkpoint(tmp_path / "back", kind="vision")
    assert proc == processor and meta["labels"] == ["x", "y", "z"]
    x = _pixels()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        assert_close(hf(pixel_values=x).logits, model(x), **TOL)
    # an HF CLIP folder without a triform tokenizer cannot become a triform checkpoint
    transformers.CLIPModel(_hf_clip(eos=50)).save_pretrained(tmp_path / "hf-clip")
    capsys.readouterr()  # transformers' own progress output so far
    assert "needs both" in cli_error(capsys, ["convert", str(tmp_path / "hf-clip"), str(tmp_path / "clip")])


def test_convert_round_trip_of_clip(tmp_path: Path) -> None:
    """A triform CLIP checkpoint (byte tokenizer) goes to HF and back: the HF folder keeps the triform
    tokenizer beside CLIP's config, so the way back finds it."""
    model = _jitter(CLIP(_tiny_clip()))
    processor = CLIPProcessor(ByteTokenizer(), ImageProcessor(image_size=16), context=16)
    src = save_checkpoint(tmp_path / "ckpt", model, processor)
    assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, proc, _ = load_checkpoint(tmp_path / "back", kind="clip")
    assert proc.context == 16 and proc.image == processor.image and proc.tokenizer.eos_id == BYTE_EOS
    ids, x = processor.texts(["a red square", "dots"]), _pixels()
    with torch.no_grad():
        assert torch.equal(back(x, ids).logits_per_image, model(x, ids).logits_per_image)


# ---------------------------------------------------------------------------------------------- sizes


def _n(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, published", [("vit-base", 86_567_656), ("vit-large", None)])
def test_vit_parameter_counts_match_transformers(name: str, published: int | None) -> None:
    cfg = VISION_PRESETS[name]
    labels = [f"class {i}" for i in range(1000)]
    with torch.device("meta"):
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(**vit_config_to_hf(cfg, labels=labels)))
        ours = VisionClassifier(cfg, 1000)
    assert count_vision_parameters(cfg, 1000) == _n(hf) == _n(ours)
    if published is not None:
        assert _n(hf) == published


def test_clip_parameter_count_matches_transformers() -> None:
    cfg = CLIP_PRESETS["clip-vit-b-32"]
    with torch.device("meta"):
        hf = transformers.CLIPModel(transformers.CLIPConfig.from_dict(clip_config_to_hf(cfg)))
        ours = CLIP(cfg)
    assert count_clip_parameters(cfg) == _n(hf) == _n(ours) == 151_277_313


# ---------------------------------------------------------------------------------------------- invariances


def test_clip_text_tower_is_causal() -> None:
    text = _jitter(CLIP(_tiny_clip())).text
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    j = 6
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1) % 256
    with torch.no_grad():
        a, b = text(tokens), text(changed)
    assert torch.equal(a[:, :j], b[:, :j])
    assert bool(((a[:, j:] - b[:, j:]).abs().amax(dim=-1) > 1e-4).all())


def test_vit_attention_is_bidirectional() -> None:
    model = _jitter(VisionEncoder(_tiny_vit()))
    x = _pixels()
    y = x.clone()
    y[:, :, -4:, -4:] += 1.0  # the last patch of the 4×4 grid
    with torch.no_grad():
        a, b = model(x), model(y)
    assert bool(((a[:, 0] - b[:, 0]).abs().amax(dim=-1) > 1e-4).all())  # the class token
    assert bool(((a[:, 1] - b[:, 1]).abs().amax(dim=-1) > 1e-4).all())  # the first patch


def test_position_resizing() -> None:
    model = _jitter(VisionEncoder(_tiny_vit()))
    grid = model.cfg.grid
    assert torch.equal(resize_positions(model.position, grid, (grid, grid)), model.position)
    resized = copy.deepcopy(model)
    with torch.no_grad():
        resized.position.copy_(resize_positions(model.position.detach().clone(), grid, (grid, grid)))
        x = _pixels()
        assert torch.equal(resized(x), model(x))
        big = model(_pixels(32))
    assert big.shape == (2, 1 + 4 * model.cfg.n_patches, model.cfg.stack.d_model)
    assert bool(torch.isfinite(big).all())


def test_patch_embedding_is_a_strided_convolution() -> None:
    torch.manual_seed(0)
    pe = PatchEmbedding(channels=3, patch=4, d_model=24, bias=True)
    x = _pixels(16)
    with torch.no_grad():
        got = pe(x)  # (B, N, d)
        conv = F.conv2d(x, pe.conv_weight(), pe.proj.bias, stride=4)  # (B, d, 4, 4)
        conv = conv.flatten(2).transpose(1, 2)  # (B, N, d)
        patches = F.unfold(x, 4, stride=4).transpose(1, 2)  # (B, C·p·p, N) -> (B, N, C·p·p)
        unfold = patches @ pe.proj.weight.T + pe.proj.bias  # (B, N, d)
    assert_close(got, conv, atol=1e-6, rtol=1e-6)
    assert_close(got, unfold, atol=1e-6, rtol=1e-6)
    assert math.prod(pe.conv_weight().shape) == pe.proj.weight.numel()
