"""ViT and CLIP on this CPU, one run, same machine: accuracy at an equal budget, training
throughput against Hugging Face transformers, and what CLIP does and does not capture.

(a) Held-out digits (scikit-learn's 8×8 digits, triform's fixed 359-image test split), each system
    with the same wall-clock budget through the same loop, objective, optimizer and batches:
      - triform's ViT (the vit-digits preset);
      - transformers' ViTForImageClassification of the same shape (its own initialisation);
      - logistic regression on the 64 pixels (scikit-learn, to convergence).
(b) Training throughput, images/s of a full step (forward, loss, backward, AdamW), float32:
    triform ViT vs HF ViT and triform CLIP vs HF CLIPModel at the same shapes, weights copied so
    both compute the same function; alternating rounds, median (and best).
(c) CLIP on digit captions: zero-shot accuracy on the held-out digits with the held-out caption
    templates, and retrieval R@1 both ways.
(d) CLIP on the procedural shapes ("a red circle left of a blue square"): on held-out scenes, how
    often the true caption outscores the same words reordered ("a blue square left of a red
    circle") and the colours swapped ("a blue circle left of a red square").

Run:  .venv/bin/python benchmarks/vision.py [--budget 60] [--parts abcd]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import machine_line, matmul_ceiling  # noqa: E402

from triform.config import CLIP_PRESETS, VISION_PRESETS, vit_config  # noqa: E402
from triform.data.images import digits  # noqa: E402
from triform.data.processor import ImageProcessor  # noqa: E402
from triform.models.clip import CLIP  # noqa: E402
from triform.models.vision import VisionClassifier  # noqa: E402
from triform.objectives.base import BatchRng  # noqa: E402
from triform.objectives.contrastive import Contrastive, ImageClassification  # noqa: E402
from triform.training.args import TrainArgs  # noqa: E402
from triform.training.loop import fit, train_step  # noqa: E402
from triform.training.optim import build_optimizer  # noqa: E402


class HFClassifier(nn.Module):
    """transformers' ViTForImageClassification behind triform's ``model(pixels) -> logits``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixels).logits


class HFCLIP(nn.Module):
    """transformers' CLIPModel behind triform's ``model(pixels, tokens) -> .logits_per_image``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor):
        return self.hf(pixel_values=pixels, input_ids=tokens)


def hf_vit(cfg, num_labels: int) -> nn.Module:
    import transformers

    from triform.interop.hf_vision import vit_config_to_hf

    hf_cfg = transformers.ViTConfig(**{**vit_config_to_hf(cfg, labels=[str(i) for i in range(num_labels)]),
                                       "attn_implementation": "sdpa"})
    return transformers.ViTForImageClassification(hf_cfg)


def hf_copy(model: nn.Module, hf_class: str) -> nn.Module:
    """The transformers model holding ``model``'s weights: exported by triform, read by ``from_pretrained``."""
    import tempfile

    import transformers

    from triform.interop.hf_vision import save_hf_vision

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        labels = [str(i) for i in range(model.num_labels)] if hasattr(model, "num_labels") else None
        save_hf_vision(model, Path(folder), labels=labels)
        return getattr(transformers, hf_class).from_pretrained(folder, attn_implementation="sdpa")


def digit_data():
    train, test = digits("train"), digits("test")
    proc = ImageProcessor.fitted(train.images)
    return train, test, proc


@torch.inference_mode()
def accuracy(model: nn.Module, proc: ImageProcessor, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(proc.normalize(images)).argmax(-1) == labels).float().mean())


def part_a(args) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from triform.training.vision import VisionTrainConfig

    train, test, proc = digit_data()
    d = VisionTrainConfig(task="classify")  # train-vision's defaults, for both ViTs
    cfg = VISION_PRESETS[d.preset]
    print(f"\n(a) held-out digits at an equal budget of {args.budget:.0f} s each ({len(train)} train / {len(test)} test "
          f"images, 8×8); ViT shape ({d.preset}): d={cfg.stack.d_model}, {cfg.stack.n_layers} layers, "
          f"{cfg.stack.n_heads} heads, patch {cfg.patch_size}; train-vision's defaults: batch {d.batch_size}, AdamW lr "
          f"{d.lr}, weight decay {d.weight_decay}, beta2 {d.beta2}, warm-up 10%, cosine decay")
    rows = []
    for name, build in (("triform ViT", lambda: VisionClassifier(cfg, 10)),
                        ("transformers ViTForImageClassification", lambda: HFClassifier(hf_vit(cfg, 10)))):
        torch.manual_seed(0)
        model = build()
        objective = ImageClassification(train.images, train.labels, proc.normalize, batch_size=d.batch_size)
        targs = TrainArgs(batch_size=d.batch_size, lr=d.lr, warmup_steps=None, time_budget=f"{args.budget}s",
                          max_steps=None, weight_decay=d.weight_decay, beta2=d.beta2, precision="float32",
                          progress=False, eval_interval=10**9, seed=args.seed)
        r = fit(model, objective, targs, log=lambda _: None)
        n = sum(p.numel() for p in model.parameters())
        rows.append((name, n, r.steps, r.seconds, accuracy(model, proc, test.images, test.labels)))
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(train.images.flatten(1).numpy())
    lr = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(train.images.flatten(1).numpy()), train.labels.numpy())
    acc = float((lr.predict(scaler.transform(test.images.flatten(1).numpy())) == test.labels.numpy()).mean())
    rows.append(("logistic regression on pixels (scikit-learn)", 65 * 10, lr.n_iter_[0], time.perf_counter() - t0, acc))
    print("| system | parameters | steps | seconds | held-out accuracy |")
    print("|---|---:|---:|---:|---:|")
    for name, n, steps, secs, acc in rows:
        print(f"| {name} | {n:,} | {steps:,} | {secs:.1f} | {100 * acc:.1f}% |")


def _rounds(systems: dict[str, callable], rounds: int, steps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in systems}
    for fn in systems.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in systems.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def _stepper(model: nn.Module, objective, rng_seed: int = 0):
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999))
    batch = objective.batch(BatchRng(rng_seed))

    def step() -> None:
        float(train_step(model, optimizer, objective, [batch], lr=1e-4, grad_clip=1.0)[0])

    return step


def part_b(args) -> None:
    from triform.data.processor import CLIPProcessor
    from triform.tokenizers.byte import ByteTokenizer

    print(f"\n(b) training throughput, float32, {args.rounds} alternating rounds of {args.steps} steps; images/s median "
          "(best); HF models hold the same weights")
    g = torch.Generator().manual_seed(0)
    vit_shapes = [("vit-digits, 8×8 greyscale", VISION_PRESETS["vit-digits"], 128),
                  ("ViT-Ti/16 shape (d=192, 12 layers), 224×224 RGB", vit_config(192, 12, 3, 768, image=224, patch=16), 8)]
    print("| model | batch | triform images/s | transformers images/s | triform ÷ transformers |")
    print("|---|---:|---:|---:|---:|")
    for label, cfg, batch in vit_shapes:
        torch.manual_seed(0)
        ours = VisionClassifier(cfg, 10)
        theirs = hf_copy(ours, "ViTForImageClassification")
        images = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
        labels = torch.randint(0, 10, (batch,), generator=g)
        norm = ImageProcessor(cfg.image_size, cfg.channels).normalize
        obj = ImageClassification(images, labels, norm, batch_size=batch)
        t = _rounds({"triform": _stepper(ours, obj), "hf": _stepper(HFClassifier(theirs), obj)}, args.rounds, args.steps)
        _throughput_row(label, batch, t)
    clip_shapes = [("CLIP clip-digits (8×8 greyscale, byte captions)", CLIP_PRESETS["clip-digits"], 128),
                   ("CLIP clip-vit-b-32-tiny (32×32 RGB, byte captions)", CLIP_PRESETS["clip-vit-b-32-tiny"], 64)]
    proc = CLIPProcessor(ByteTokenizer(), ImageProcessor(8, 1), 64)
    captions = [f"a photo of the number {i}" for i in range(1000)]
    for label, cfg, batch in clip_shapes:
        torch.manual_seed(0)
        ours = CLIP(cfg)
        theirs = hf_copy(ours, "CLIPModel")
        v = cfg.vision
        images = torch.rand(batch, v.channels, v.image_size, v.image_size, generator=g)
        norm = ImageProcessor(v.image_size, v.channels).normalize
        obj = Contrastive(images, captions[:batch], proc.texts, norm, pad_id=cfg.pad_id, batch_size=batch)
        t = _rounds({"triform": _stepper(ours, obj), "hf": _stepper(HFCLIP(theirs), obj)}, args.rounds, args.steps)
        _throughput_row(label, batch, t)


def _throughput_row(label: str, batch: int, t: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in t.items()}
    best = {k: min(v) for k, v in t.items()}
    print(f"| {label} | {batch} | {batch / med['triform']:,.0f} ({batch / best['triform']:,.0f}) | "
          f"{batch / med['hf']:,.0f} ({batch / best['hf']:,.0f}) | {med['hf'] / med['triform']:.2f}× |")


def part_c(args) -> None:
    import tempfile

    from triform.training.vision import VisionTrainConfig, train_vision

    print(f"\n(c) CLIP on captioned digits, {args.budget:.0f} s (train-vision --task clip defaults): zero-shot with the "
          "held-out templates only, retrieval over the held-out pairs")
    with tempfile.TemporaryDirectory() as out:
        r = train_vision(VisionTrainConfig(task="clip", time_budget=f"{args.budget}s", progress=False, seed=args.seed),
                         out_dir=Path(out) / "clip", log=lambda _: None)
    print("| model | parameters | steps | seconds | zero-shot accuracy | R@1 image→text | R@1 text→image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| clip-digits | {r.parameters:,} | {r.fit.steps:,} | {r.fit.seconds:.1f} | {100 * r.zero_shot:.1f}% | "
          f"{100 * r.image_to_text:.1f}% | {100 * r.text_to_image:.1f}% |")
    print("(R@1 counts a hit when the best match shows the same digit: the held-out captions say nothing else.)")


def part_d(args) -> None:
    import tempfile

    from triform.checkpoint import load_checkpoint
    from triform.data.images import COLOURS, SHAPES, shapes
    from triform.inference.vision import embed_images, embed_texts
    from triform.training.vision import VisionTrainConfig, train_vision

    print(f"\n(d) CLIP on procedural shapes, {args.budget:.0f} s (train-vision --task clip --data shapes defaults); "
          "held-out scenes, true caption against a foil made of the same words")
    with tempfile.TemporaryDirectory() as out:
        cfg = VisionTrainConfig(task="clip", data="shapes", preset="clip-vit-b-32-tiny", time_budget=f"{args.budget}s",
                                progress=False, seed=args.seed)
        r = train_vision(cfg, out_dir=Path(out) / "shapes", log=lambda _: None)
        model, proc, _ = load_checkpoint(Path(out) / "shapes", kind="clip")
    test = shapes(1000, size=proc.image.image_size, seed=10_000 + args.seed)  # scenes no run was trained on
    scenes = test.scenes
    assert scenes is not None
    images = embed_images(model, proc, test.images)
    true = (images * embed_texts(model, proc, test.captions)).sum(-1)

    def beats(foils: list[str], rows: list[int] | None = None) -> float:
        rows = list(range(len(foils))) if rows is None else rows
        foil = (images[rows] * embed_texts(model, proc, [foils[i] for i in rows])).sum(-1)
        return float((true[rows] > foil).float().mean())

    swapped = [f"a {s.right[0]} {s.left[1]} left of a {s.left[0]} {s.right[1]}" for s in scenes]
    two_colours = [i for i, s in enumerate(scenes) if s.left[0] != s.right[0]]  # swapping changes the caption
    wrong_colour = [f"a {next(c for c in COLOURS if c not in (s.left[0], s.right[0]))} {s.left[1]} left of a "
                    f"{s.right[0]} {s.right[1]}" for s in scenes]
    print(f"model clip-vit-b-32-tiny, {r.parameters:,} parameters, {r.fit.steps:,} steps in {r.fit.seconds:.1f} s; "
          f"{len(test)} held-out scenes ({len(SHAPES)} shapes × {len(COLOURS)} colours, two objects)")
    print("| foil (what the true caption must beat) | example foil | accuracy (chance 50%) |")
    print("|---|---|---:|")
    s0 = scenes[0]
    print(f"| a colour that is not in the image | {wrong_colour[0]} | {100 * beats(wrong_colour):.1f}% |")
    print(f"| the colours swapped between the objects (binding) | {swapped[0]} | "
          f"{100 * beats(swapped, two_colours):.1f}% |")
    print(f"| the same words reordered (left and right swapped) | {s0.reordered()} | {100 * beats([s.reordered() for s in scenes]):.1f}% |")
    print(f"(true caption of the example: {s0.caption()}; the binding row scores the {len(two_colours)} scenes "
          f"whose objects differ in colour; "
          f"the run's own held-out word-order score: {100 * (r.word_order or 0):.1f}%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=60.0, help="seconds of training per system in (a), (c), (d)")
    p.add_argument("--parts", default="abcd")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(machine_line())
    gflops, n = matmul_ceiling()
    print(f"float32 matmul ceiling: {gflops:.0f} GFLOP/s (n={n})")
    parts = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}
    for key in args.parts:
        if key in parts:
            parts[key](args)


if __name__ == "__main__":
    main()
