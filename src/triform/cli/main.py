"""The ``triform`` command line: each subcommand is a typed function in one of the command modules;
flags and help come from its signature and docstring (via jsonargparse). The training commands also
take every field of their config dataclass as a flag (``train`` also reads a YAML/JSON ``--config``
file whose values the other flags override), and that dataclass validates them. The remaining
numeric and enumerated options are checked here, in ``OPTION_RULES``, before a command runs."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import sys
import typing
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from triform.cli import checkpoints, encoders, generation, training, vision
from triform.cli import serve as serving
from triform.cli.inspect import inspect as inspect_model
from triform.cli.common import WEIGHT_MODES
from triform.config import StackConfig
from triform.errors import ConfigError, TriformError

ModelOverrides = dataclasses.make_dataclass(
    "ModelOverrides",
    [(name, typ | None, dataclasses.field(default=None)) for name, typ in typing.get_type_hints(StackConfig).items()]
    + [("vocab_size", int | None, dataclasses.field(default=None)), ("tie_embeddings", bool | None, dataclasses.field(default=None))],
    kw_only=True,
)
ModelOverrides.__doc__ = "Model fields that replace the preset's (any StackConfig field, vocab_size, tie_embeddings)."


COMMANDS: dict[str, Callable[..., None]] = {
    "train": training.train, "generate": generation.generate, "chat": generation.chat, "eval": checkpoints.evaluate,
    "convert": checkpoints.convert, "presets": checkpoints.presets, "embed": encoders.embed, "search": encoders.search,
    "pretrain": training.pretrain, "fill": encoders.fill, "finetune": training.finetune, "inspect": inspect_model,
    "serve": serving.serve, "train-vision": vision.train_vision, "classify-image": vision.classify_image,
    "zero-shot": vision.zero_shot,
}
CONFIGS: dict[str, type] = {"train": training.TrainConfig, "pretrain": training.PretrainFlags, "finetune": training.FinetuneConfig,
                            "train-vision": vision.VisionTrainConfig}

LIST_FLAGS = {"stop", "token", "image", "templates"}
OPTIONAL_POSITIONALS = {
    "generate": {"prompt": "The text to continue (or use --prompts FILE)."},
    "search": {"query": "What to look for (without it, only build the index)."},
    "inspect": {"checkpoint": "A triform checkpoint or run folder, a Hugging Face folder or a GGUF file."},
}
LIST_POSITIONALS = {  # one or more values after the other positionals
    "classify-image": {"images": "Image files (PNG, JPEG, ...) or folders of them."},
    "zero-shot": {"images": "Image files (PNG, JPEG, ...) or folders of them."},
}


TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}


class Parser(ArgumentParser):
    """jsonargparse's parser, with its errors as one sentence naming the flag instead of a usage dump."""

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:  # type: ignore[override]
        text = " ".join(str(message).split())
        key = re.search(r'Parser key "([\w.]+)"', text)
        expected = re.search(r"Expected a <class '(\w+)'>", text)
        value = re.search(r"(?:Got|Given) value: (.*?)(?: Given value type|$)", text)
        literal = re.search(r"Expected a typing\.Literal\[(.*?)\]", text)
        if key and literal and value:
            choices = ", ".join(c.strip().strip("'\"") for c in literal.group(1).split(","))
            text = f"--{key.group(1).replace('_', '-')} must be one of {choices}, got {value.group(1)!r}"
        elif key and expected and value:
            flag = "--" + key.group(1).replace("_", "-")
            text = f"{flag} expects {TYPE_WORDS.get(expected.group(1), expected.group(1))}, got {value.group(1)!r}"
        else:
            text = re.sub(r"argument --(\w+)", lambda g: "--" + g.group(1).replace("_", "-"), text)
        command = getattr(self, "command_name", "")
        where = f"triform {command}" if command else "triform"
        print(f"{where}: error: {text.rstrip('.')} (see {where} --help).", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# Options of the commands that have no config dataclass of their own (sampling options are checked
# by SamplingParams, engine options by EngineConfig, the beam width by the beam search, --task and
# --to by their commands before any work).
OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (_positive_int, "a positive integer"),
    "top_k_passages": (_positive_int, "a positive integer"),
    "passage_chars": (_positive_int, "a positive integer"),
    "tokens": (_positive_int, "a positive integer"),
    "steps": (_positive_int, "a positive integer"),
    "generate": (_count, "an integer >= 0"),
    "sample_tokens": (_count, "an integer >= 0"),
    "stop_after": (_count, "an integer >= 0"),
    "kv_cache_gib": (_positive_number, "a positive number"),
    "length_penalty": (lambda v: isinstance(v, (int, float)) and math.isfinite(v), "a finite number"),
    "weights": (lambda v: v in WEIGHT_MODES, "one of " + ", ".join(WEIGHT_MODES)),
}
RULE_ALIASES = {("search", "top_k"): "top_k_passages", ("fill", "top_k"): "top_k_passages"}


def check_options(command: str, args: dict[str, Any]) -> None:
    """One sentence naming the flag for the first option of ``command`` that breaks its rule."""
    for name, value in args.items():
        rule = OPTION_RULES.get(RULE_ALIASES.get((command, name), name))
        if rule is None or value is None or command in CONFIGS and name in _config_fields(command):
            continue
        ok, what = rule
        if not ok(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be {what}, got {value!r}.")


def _config_fields(command: str) -> set[str]:
    return {f.name for f in dataclasses.fields(CONFIGS[command])}


def _bool_flags() -> set[str]:
    """Names of boolean options, which may be given bare (``--resume``) as well as ``--resume true``."""
    names = set()
    for fn in COMMANDS.values():
        names |= {k for k, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
    for cls in CONFIGS.values():
        hints = typing.get_type_hints(cls)
        names |= {f.name for f in dataclasses.fields(cls) if hints[f.name] in (bool, bool | None)}
    names |= {f"model.{k}" for k, t in typing.get_type_hints(ModelOverrides).items() if t in (bool, bool | None)}
    return names


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept ``--time-budget`` for ``--time_budget`` and bare boolean flags such as ``--resume``."""
    flags = _bool_flags()
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            if name in LIST_FLAGS and not eq:
                name += "+"  # jsonargparse's append syntax: `--stop a --stop b` collects both
            arg = f"--{name}{eq}{value}"
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if name in flags and not eq and (nxt is None or nxt.lower() not in ("true", "false", "null")):
                arg += "=true"
        out.append(arg)
    return out


def build_parser() -> ArgumentParser:
    """The full ``triform`` parser with one subcommand per entry of ``COMMANDS``."""
    parser = Parser(
        prog="triform",
        description="triform: encoder, decoder and encoder-decoder transformers from one set of parts.",
    )
    sub = parser.add_subcommands(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = Parser(description=(fn.__doc__ or "").split("\n\n")[0])
        p.command_name = name
        if name == "train":
            p.add_argument("--config", action=ActionConfigFile, help="YAML or JSON file of flag values; later flags override it.")
        skip = {"cfg", "model", *OPTIONAL_POSITIONALS.get(name, {}), *LIST_POSITIONALS.get(name, {})}
        p.add_function_arguments(fn, as_positional=True, skip=skip)
        for arg, help_text in OPTIONAL_POSITIONALS.get(name, {}).items():
            p.add_argument(arg, nargs="?", default=None, help=help_text)
        for arg, help_text in LIST_POSITIONALS.get(name, {}).items():
            p.add_argument(arg, nargs="+", help=help_text)
        if name in CONFIGS:
            p.add_class_arguments(CONFIGS[name], nested_key=None)
        if name == "train":
            p.add_class_arguments(ModelOverrides, "model")
        sub.add_subcommand(name, p, help=(fn.__doc__ or "").split("\n")[0])
    return parser


def _dispatch(command: str, args: dict[str, Any]) -> None:
    fn = COMMANDS[command]
    if command not in CONFIGS:
        check_options(command, args)
        fn(**args)
        return
    names = _config_fields(command)
    fields = {k: args.pop(k) for k in list(args) if k in names}
    check_options(command, args)
    if command == "train":
        overrides = {k: v for k, v in (args.pop("model") or {}).items() if v is not None}
        fn(**args, cfg=training.TrainConfig(**fields), model=overrides)
    elif command == "pretrain":
        fn(**args, cfg=fields)
    else:
        fn(**args, cfg=CONFIGS[command](**fields))


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn user errors into one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # torchrun's own options, parsed by torchrun's parser
        from triform.cli.launch import main as launch

        return launch(argv[1:])
    parser = build_parser()
    try:
        ns = parser.parse_args(normalize_argv(argv))
    except SystemExit as exc:
        if exc.code == 2:  # a parser error, already printed as one line
            return 2
        raise
    command = ns.command
    args = ns[command].as_dict()
    args.pop("config", None)
    args.pop("__path__", None)
    rank = os.environ.get("RANK", "0")
    if command in CONFIGS and rank not in ("", "0"):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (under torchrun rank 0 alone reports results)
    ok = False
    try:
        _dispatch(command, args)
        ok = True
    except TriformError as exc:
        print(f"triform {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"triform {command}: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit when piped into `head`
        ok = True
        return 0
    finally:
        _leave_process_group(ok)
    return 0


def _leave_process_group(ok: bool) -> None:
    """Under torchrun, leave the process group before exiting (a barrier first when all went well)."""
    if "torch" in sys.modules:
        from triform.training.distributed import shutdown

        shutdown(ok)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "check_options", "COMMANDS", "CONFIGS", "ModelOverrides", "OPTION_RULES"]
