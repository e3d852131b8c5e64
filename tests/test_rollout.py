"""Attention rollout over image patches (triform.inspect.vision) and ``triform inspect rollout``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion

from triform.checkpoint import save_checkpoint
from triform.cli.main import main
from triform.config import CLIP_PRESETS, VISION_PRESETS, vit_config
from triform.data.processor import CLIPProcessor, ImageProcessor
from triform.inspect.vision import attention_patterns, attention_rollout, confusion_matrix, rollout
from triform.models.clip import CLIP
from triform.models.vision import VisionClassifier, VisionEncoder
from triform.tokenizers.byte import ByteTokenizer


def _rollout_by_hand(patterns: np.ndarray) -> np.ndarray:
    """Abnar & Zuidema's recipe written out with loops: head mean, 0.5 A + 0.5 I, rows to 1, product."""
    layers, batch, _, t, _ = patterns.shape
    out = np.zeros((batch, t, t))
    for b in range(batch):
        flow = np.eye(t)
        for layer in range(layers):
            a = patterns[layer, b].mean(axis=0) * 0.5 + np.eye(t) * 0.5
            for i in range(t):
                a[i] /= a[i].sum()
            flow = a @ flow
        out[b] = flow
    return out


def test_rollout_matches_the_recipe_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 2, 4, 5, 5, generator=g, dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True)
    np.testing.assert_allclose(rollout(p).numpy(), _rollout_by_hand(p.numpy()), rtol=1e-12, atol=1e-12)


def test_uniform_attention_spreads_evenly_with_the_closed_form_share() -> None:
    """With q and k weights zero every head attends uniformly (A = J/T); then (I/2 + J/2T)^L =
    2^-L I + (1 - 2^-L) J/T, so every patch gets (1 - 2^-L)/T of the class token's flow."""
    torch.manual_seed(0)
    cfg = vit_config(32, 3, 4, 64, image=16, patch=4, channels=1)
    model = VisionEncoder(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * 32].zero_()  # q and k rows
            block.attn.qkv.bias[: 2 * 32].zero_()
    maps = attention_rollout(model, torch.randn(2, 1, 16, 16))
    t = 1 + 16
    assert maps.shape == (2, 4, 4)
    torch.testing.assert_close(maps, torch.full((2, 4, 4), (1 - 0.5 ** 3) / t), rtol=1e-5, atol=1e-6)


def test_rollout_follows_attention_to_one_patch() -> None:
    """One block whose every query attends to patch (2, 1): all embeddings are zero except that
    patch's position vector v (mean 0, std 1, so LayerNorm leaves it as it is); queries are a
    constant u and keys read v, so the scores are large there and 0 elsewhere. The map must peak
    at row 2, column 1 (patch 2·4 + 1 in the row-major grid)."""
    torch.manual_seed(0)
    cfg = vit_config(32, 1, 4, 64, image=16, patch=4, channels=1)
    model = VisionEncoder(cfg).eval()
    v = torch.tensor([1.0, -1.0] * 16)
    with torch.no_grad():
        model.cls.zero_()
        model.patch.proj.bias.zero_()
        model.position.zero_()
        model.position[1 + 2 * 4 + 1] = v
        qkv = model.blocks[0].attn.qkv
        qkv.weight[:64].zero_()
        qkv.bias[:64].zero_()
        qkv.bias[:32] = 1.0  # q = u = ones for every token
        qkv.weight[32:64] = 60.0 / 8 * torch.outer(torch.ones(32), v) / v.dot(v)  # per head q·k = 60 at v
    maps = attention_rollout(model, torch.zeros(1, 1, 16, 16))[0]
    assert divmod(int(maps.argmax()), 4) == (2, 1)
    assert float(maps[2, 1]) > 0.95 * float(maps.sum())
    assert abs(float(maps.sum()) - 0.5) < 0.01  # half the flow stays on the class token (the residual)


def test_clip_image_tower_and_other_sizes() -> None:
    torch.manual_seed(0)
    ccfg = CLIP_PRESETS["clip-digits"]
    clip = CLIP(ccfg).eval()
    v = ccfg.vision
    assert attention_patterns(clip, torch.randn(2, 1, 8, 8)).shape == (v.stack.n_layers, 2, v.stack.n_heads,
                                                                        1 + v.n_patches, 1 + v.n_patches)
    cfg = VISION_PRESETS["vit-digits"]
    vit = VisionClassifier(cfg, 10).eval()
    grid = 16 // cfg.patch_size
    assert attention_rollout(vit, torch.randn(1, 1, 16, 16)).shape == (1, grid, grid)  # positions resized


def test_confusion_matrix_matches_scikit_learn() -> None:
    g = torch.Generator().manual_seed(0)
    true, pred = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (200,), generator=g)
    np.testing.assert_array_equal(confusion_matrix(true, pred, 5).numpy(), sk_confusion(true.numpy(), pred.numpy()))


def test_inspect_rollout_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    torch.manual_seed(0)
    vit = save_checkpoint(tmp_path / "vit", VisionClassifier(VISION_PRESETS["vit-digits"], 10),
                          ImageProcessor(8, 1, (0.3,), (0.4,)))
    assert main(["inspect", "rollout", str(vit), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.count("| ") >= 11 and "| seven |" in out  # one test digit of each class by default
    assert (tmp_path / "a" / "rollout.png").stat().st_size > 1000

    clip = save_checkpoint(tmp_path / "clip", CLIP(CLIP_PRESETS["clip-vit-b-32-tiny"]),
                           CLIPProcessor(ByteTokenizer(), ImageProcessor(32, 3), 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["inspect", "rollout", str(clip), "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "b")]) == 0
    assert "4×4 patches" in capsys.readouterr().out  # resized to the model's 32×32, patches of 8

    (tmp_path / "bad.png").write_bytes(b"not a png")
    for args, words in (
        (["--image", str(tmp_path / "bad.png")], "not an image"),
        (["--image", str(tmp_path / "missing.png")], "does not exist"),
        ([], "needs --image FILE (repeatable) for a colour model"),
    ):
        assert main(["inspect", "rollout", str(clip), *args, "--out", str(tmp_path / "c"), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_inspect_rollout_reads_a_hugging_face_vit_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder transformers wrote (ViTForImageClassification + its image processor config) is read
    through the interop map, and the rollout equals the one of the same weights in triform."""
    import transformers

    from triform.interop.hf_vision import load_hf_vision

    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4,
        num_channels=3, num_labels=3, attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path / "hf")
    ImageProcessor(16, 3).save(tmp_path / "hf")
    assert main(["inspect", "rollout", str(tmp_path / "hf"), "--image", str(_png(tmp_path)), "--out",
                 str(tmp_path / "o")]) == 0
    assert "4×4 patches" in capsys.readouterr().out
    model, proc, _ = load_hf_vision(tmp_path / "hf")
    x = proc(np.asarray([np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)]))
    with torch.no_grad():
        out = hf(pixel_values=x, output_attentions=True)
    torch.testing.assert_close(attention_patterns(model, x), torch.stack(out.attentions), rtol=1e-5, atol=1e-6)


def _png(folder: Path) -> Path:
    from PIL import Image

    path = folder / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path
