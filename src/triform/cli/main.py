"""The ``triform`` command line: each subcommand is a typed function; flags and help come from its
signature and docstring (via jsonargparse). ``train`` also reads a YAML/JSON ``--config`` file whose
values the other flags override."""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing

from jsonargparse import ActionConfigFile, ArgumentParser

from triform.cli import commands
from triform.config import StackConfig
from triform.errors import TriformError

ModelOverrides = dataclasses.make_dataclass(
    "ModelOverrides",
    [(name, typ | None, dataclasses.field(default=None)) for name, typ in typing.get_type_hints(StackConfig).items()]
    + [("vocab_size", int | None, dataclasses.field(default=None)), ("tie_embeddings", bool | None, dataclasses.field(default=None))],
    kw_only=True,
)
ModelOverrides.__doc__ = "Model fields that replace the preset's (any StackConfig field, vocab_size, tie_embeddings)."


COMMANDS = {
    "train": commands.train, "generate": commands.generate, "chat": commands.chat, "eval": commands.evaluate,
    "convert": commands.convert, "presets": commands.presets, "embed": commands.embed, "search": commands.search,
    "pretrain": commands.pretrain, "fill": commands.fill, "finetune": commands.finetune,
}


LIST_FLAGS = {"stop"}
OPTIONAL_POSITIONALS = {
    "generate": {"prompt": "The text to continue (or use --prompts FILE)."},
    "search": {"query": "What to look for (without it, only build the index)."},
}


def _bool_flags() -> set[str]:
    """Names of boolean options, which may be given bare (``--resume``) as well as ``--resume true``."""
    from triform.training.trainer import TrainConfig

    names = set()
    for fn in COMMANDS.values():
        names |= {k for k, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
    names |= {f.name for f in dataclasses.fields(TrainConfig) if f.type in (bool, "bool")}
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
    from triform.training.trainer import TrainConfig

    parser = ArgumentParser(
        prog="triform",
        description="triform: encoder, decoder and encoder-decoder transformers from one set of parts.",
    )
    sub = parser.add_subcommands(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = ArgumentParser(description=(fn.__doc__ or "").split("\n\n")[0])
        if name == "train":
            p.add_argument("--config", action=ActionConfigFile, help="YAML or JSON file of flag values; later flags override it.")
        p.add_function_arguments(fn, as_positional=True, skip={"cfg", "model", *OPTIONAL_POSITIONALS.get(name, {})})
        for arg, help_text in OPTIONAL_POSITIONALS.get(name, {}).items():
            p.add_argument(arg, nargs="?", default=None, help=help_text)
        if name == "train":
            p.add_class_arguments(TrainConfig, nested_key=None)
            p.add_class_arguments(ModelOverrides, "model")
        sub.add_subcommand(name, p, help=(fn.__doc__ or "").split("\n")[0])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn user errors into one line on stderr and exit code 2."""
    parser = build_parser()
    ns = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))
    command = ns.command
    args = ns[command].as_dict()
    args.pop("config", None)
    args.pop("__path__", None)
    try:
        if command == "train":
            from triform.training.trainer import TrainConfig

            names = {f.name for f in dataclasses.fields(TrainConfig)}
            cfg = TrainConfig(**{k: args.pop(k) for k in list(args) if k in names})
            overrides = {k: v for k, v in (args.pop("model") or {}).items() if v is not None}
            commands.train(**args, cfg=cfg, model=overrides)
        else:
            COMMANDS[command](**args)
    except TriformError as exc:
        print(f"triform {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"triform {command}: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet exit when piped into `head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "COMMANDS", "ModelOverrides"]
