"""The command line: help for every command, end-to-end runs, and one clear line for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_error

from triform.cli.main import COMMANDS, main, normalize_argv


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    doc_first_line = (COMMANDS[command].__doc__ or "").split("\n")[0]
    assert " ".join(doc_first_line.split()[:4]) in " ".join(capsys.readouterr().out.split())


def test_normalize_argv() -> None:
    assert normalize_argv(["train", "--time-budget", "5m", "--resume", "--model.n-layers=2"]) == [
        "train", "--time_budget", "5m", "--resume=true", "--model.n_layers=2",
    ]
    assert normalize_argv(["generate", "ck", "--no-cache", "false"]) == ["generate", "ck", "--no_cache", "false"]
    assert normalize_argv(["generate", "ck", "--stop", "a", "--stop", "b"]) == ["generate", "ck", "--stop+", "a", "--stop+", "b"]


def test_stop_flags_repeat_and_unescape(capsys: pytest.CaptureFixture[str], trained_run: Path) -> None:
    from triform.cli.common import unescape as _unescape

    assert _unescape("\\n\\n") == "\n\n" and _unescape("é\\t") == "é\t"
    # The synthetic corpus puts a newline after "KING:"; stopping there leaves an empty continuation.
    argv = ["generate", str(trained_run), "KING:", "--temperature", "0", "--stop", "zzz", "--stop", "\\n"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "KING:\n"



def test_bad_input_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, trained_run: Path) -> None:
    assert "unknown preset 'gpt5'" in cli_error(capsys, ["train", "--preset", "gpt5"])
    assert "must divide d_model" in cli_error(capsys, ["train", "--preset", "gpt2-tiny", "--model.n_heads", "5", "--data", str(trained_run)])
    assert "does not exist" in cli_error(capsys, ["train", "--preset", "gpt2-tiny", "--data", str(tmp_path / "nope.txt")])
    assert "time_budget" in cli_error(capsys, ["train", "--time-budget", "soon"])
    assert "does not exist" in cli_error(capsys, ["generate", str(tmp_path / "nope"), "hi"])
    assert "context window is 64" in cli_error(capsys, ["generate", str(trained_run), "x" * 100])
    assert "top_p" in cli_error(capsys, ["generate", str(trained_run), "hi", "--top-p", "2"])
    assert "exactly one" in cli_error(capsys, ["generate", str(trained_run)])
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (trained_run / "checkpoint").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:1000])
    assert "corrupt or truncated" in cli_error(capsys, ["generate", str(broken), "hi"])
    assert "corrupt or truncated" in cli_error(capsys, ["eval", str(broken)])


def test_generate_streams_and_batches(capsys: pytest.CaptureFixture[str], tmp_path: Path, trained_run: Path) -> None:
    assert main(["generate", str(trained_run), "KING:\n", "--temperature", "0", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KING:\nThe king will")  # learned from the synthetic corpus's grammar
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("QUEEN:\\nThe\nLORD:\\nThe lord will\n")
    assert main(["generate", str(trained_run), "--prompts", str(prompts), "--temperature", "0", "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 1" in out and "=== prompt 2" in out and "The lord will " in out


def test_eval_prints_metrics(capsys: pytest.CaptureFixture[str], trained_run: Path, corpus_file: Path) -> None:
    assert main(["eval", str(trained_run), "--data", str(corpus_file), "--tokens", "4000"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "perplexity" in out


def test_presets_lists_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "124.44M" in out and "mistral-7b" in out and "shakespeare-tiny" in out


def test_train_from_yaml_config_with_override(tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"preset: gpt2-tiny\ndata: {corpus_file}\nmax_steps: 50\nbatch_size: 2\ncontext: 16\n"
        f"eval_interval: 100\neval_tokens: 256\nfinal_eval_tokens: 256\nprogress: false\nsample_tokens: 0\n"
        f"model:\n  n_layers: 1\n"
    )
    out = tmp_path / "yaml-run"
    assert main(["train", "--config", str(cfg), "--max-steps", "3", "--out", str(out)]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    import json

    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["model"]["stack"]["n_layers"] == 1 and meta["train"]["max_steps"] == 3


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "triform.cli.main", "generate", str(tmp_path / "missing"), "hello"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"triform generate: error: checkpoint {tmp_path / 'missing'} does not exist."


def test_non_utf8_prompt_bytes_pass_through(trained_run: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "triform.cli.main", "generate", str(trained_run), os.fsdecode(b"K\xffING:\n"),
         "--temperature", "0", "--max-new-tokens", "12"],
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"K\xffING:\n")  # the exact bytes given, then the continuation
    assert len(proc.stdout) > len(b"K\xffING:\n")


def test_convert_hf_to_triform_to_hf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    from conftest import synthetic_text

    from triform.tokenizers import BPETokenizer

    BPETokenizer.train([synthetic_text(200, seed=5).encode()], vocab_size=300).save(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--max-shard-size", "20KB"]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    assert main(["generate", str(tmp_path / "back"), "The king", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    # Bad input: an unsupported architecture, a truncated GGUF.
    capsys.readouterr()
    cfg = (tmp_path / "back" / "config.json").read_text().replace('"llama"', '"bloom"')
    (tmp_path / "back" / "config.json").write_text(cfg)
    assert "'bloom' is not supported" in cli_error(capsys, ["convert", str(tmp_path / "back"), str(tmp_path / "x")])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    assert "bad.gguf" in cli_error(capsys, ["generate", str(tmp_path / "bad.gguf"), "hi"])


def test_prompts_file_runs_through_the_engine(capsys: pytest.CaptureFixture[str], tmp_path: Path, trained_run: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING:\\n\nQUEEN:\\nThe\n")
    greedy = ["--temperature", "0", "--max-new-tokens", "30"]
    singles = []
    for p in ("KING:\n", "QUEEN:\nThe"):
        assert main(["generate", str(trained_run), p, *greedy]) == 0
        singles.append(capsys.readouterr().out.rstrip("\n"))
    assert main(["generate", str(trained_run), "--prompts", str(prompts), *greedy, "--block-size", "8"]) == 0
    captured = capsys.readouterr()
    blocks = [b.split(" ===\n", 1)[1].rstrip("\n") for b in captured.out.split("=== prompt ")[1:]]
    assert blocks == singles  # the engine continues each prompt exactly as the single-prompt path does
    assert "generate" in captured.err  # the progress bar
    args = ["generate", str(trained_run), "--prompts", str(prompts), "--n", "2", "--temperature", "0.9", "--seed", "3"]
    assert main([*args, "--max-new-tokens", "10"]) == 0
    assert "=== prompt 2, completion 2" in capsys.readouterr().out


def test_engine_flags_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path, trained_run: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING:\n")
    base = ["generate", str(trained_run), "--prompts", str(prompts)]
    assert "block_size must be a positive integer" in cli_error(capsys, [*base, "--block-size", "0"])
    assert "n (completions per prompt) must be a positive integer" in cli_error(capsys, [*base, "--n", "0"])
    assert "--n needs --prompts" in cli_error(capsys, ["generate", str(trained_run), "hi", "--n", "2"])
    assert "pool holds only" in cli_error(capsys, [*base, "--kv-cache-gib", "0.0000001", "--max-new-tokens", "50"])
