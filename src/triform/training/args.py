"""The training arguments every command shares, validated in one place.

``TrainArgs`` holds what the one loop needs (optimizer, schedule, budget, evaluation, checkpoints,
precision, device). Each training command's config is a subclass that adds its data and model
fields and may change defaults; the CLI builds that dataclass from the flags, so a bad value is one
sentence naming the option, whichever command it was given to.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from triform.errors import ConfigError

Precision = Literal["auto", "float32", "bfloat16"]


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds in a duration such as ``"90s"``, ``"5m"``, ``"1.5h"`` or a bare number of seconds."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text))
        if not m:
            raise ConfigError(f"time_budget must look like 90s, 5m or 1h, got {text!r}.")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"time_budget must be positive, got {text!r}.")
    return seconds


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    """A ConfigError naming ``name`` unless ``value`` is an integer >= ``minimum`` (or None if allowed)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """A ConfigError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class TrainArgs:
    """Arguments of the one training loop, shared by every training command.

    Args:
        batch_size: Sequences (or examples) per optimizer step over all ranks (the global batch),
            split into grad_accum micro-batches on each of torchrun's processes.
        grad_accum: Micro-batches per optimizer step on each rank; losses are summed and divided by the step's
            total token count, so the gradient equals one large batch's.
        lr: Peak learning rate of AdamW.
        min_lr: Learning rate at the end of the cosine decay (default lr / 10).
        warmup_steps: Steps of linear warm-up (None: 10% of the steps).
        max_steps: Optimizer steps (an upper bound when time_budget is set).
        time_budget: Wall-clock budget such as 90s, 5m or 1h for the whole run, evaluation included;
            the step count is fitted to it and refitted as the pace becomes known.
        weight_decay: Decoupled weight decay, applied to weight matrices only.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: Clip the global gradient norm to this value (0 disables).
        eval_interval: Evaluate on held-out data every this many steps.
        checkpoint_interval: Save a resumable checkpoint every this many steps.
        seed: Seed for initialisation, batch sampling and dropout.
        device: "auto" (CUDA if present, else CPU), "cpu", "cuda" or "cuda:N".
        precision: "auto" (bfloat16 autocast where a short measurement at start-up shows this
            CPU or GPU runs it faster, else float32), "float32" or "bfloat16". Weights and
            optimizer state stay float32.
        progress: Show a progress bar.
        parallel: Under torchrun: "auto" (DDP when there is more than one process), "ddp"
            (DistributedDataParallel), "fsdp" (FSDP2, parameters, gradients and optimizer state
            sharded over the ranks) or "none" (a single process only).
        backend: Process-group backend under torchrun: "auto" (NCCL on CUDA, gloo on CPU), "gloo" or "nccl".
        dist_timeout: Seconds a rank waits for the others (joining, or in a collective) before giving up.
    """

    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float | None = None
    warmup_steps: int | None = 50
    max_steps: int | None = 5000
    time_budget: str | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    checkpoint_interval: int = 1000
    seed: int = 1337
    device: str = "auto"
    precision: Precision = "auto"
    progress: bool = True
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    dist_timeout: float = 300.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "eval_interval", "checkpoint_interval"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("max_steps", self.max_steps, allow_none=True)
        check_positive_int("warmup_steps", self.warmup_steps, allow_none=True, minimum=0)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}.")
        world = self.world_size
        if world > 1 and self.batch_size % (self.grad_accum * world):
            raise ConfigError(
                f"batch_size {self.batch_size} (the global batch) does not split over {world} ranks x "
                f"{self.grad_accum} micro-batches (grad_accum); use a multiple of {self.grad_accum * world}."
            )
        check_choice("parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))
        check_choice("backend", self.backend, ("auto", "gloo", "nccl"))
        # refused here, before any data is read or model built (distributed.setup checks them again)
        if self.backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("backend nccl needs CUDA GPUs and none is visible; use --backend gloo (the default on CPU).")
        if self.parallel == "none" and world > 1:
            raise ConfigError(f"--parallel none cannot train under torchrun with {world} processes; use ddp or fsdp "
                              "(or launch a single process).")
        if not _is_number(self.dist_timeout) or not self.dist_timeout > 0:
            raise ConfigError(f"dist_timeout must be a positive number of seconds, got {self.dist_timeout!r}.")
        if not _is_number(self.lr) or not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}.")
        if self.min_lr is not None and (not _is_number(self.min_lr) or not 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"min_lr must be between 0 and lr, got {self.min_lr!r}.")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}.")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {v!r}.")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}.")
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}.")
        check_choice("precision", self.precision, ("auto", "float32", "bfloat16"))
        parse_duration(self.time_budget)
        if self.max_steps is None and self.time_budget is None and not self.bounded_by_data():
            raise ConfigError("give max_steps or time_budget: nothing else bounds the run.")

    def bounded_by_data(self) -> bool:
        """Whether the command's data bounds the run (epochs over a finite set) without max_steps."""
        return False

    @property
    def world_size(self) -> int:
        """Processes sharing each step: torchrun's WORLD_SIZE, 1 outside torchrun."""
        from triform.training.distributed import env_world_size

        return env_world_size()

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step over all ranks: grad_accum x world size."""
        return self.grad_accum * self.world_size

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.micro_batches

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def replace(self, **changes: Any) -> TrainArgs:
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def saved_fields(self) -> dict[str, Any]:
        """What a checkpoint records of this config: every field, and the world size it ran at."""
        return {**dataclasses.asdict(self), "world_size": self.world_size}

    def launch_settings(self) -> dict[str, Any]:
        """The fields that describe how this process was launched rather than the run itself; a
        resumed run takes them from the new command line."""
        return {"progress": self.progress, "parallel": self.parallel, "backend": self.backend,
                "dist_timeout": self.dist_timeout}

    @classmethod
    def from_saved(cls, saved: dict[str, Any], **changes: Any) -> TrainArgs:
        """The config a checkpoint recorded (fields it does not know are dropped), with ``changes``.
        At another world size grad_accum is rescaled so every step still has the same micro-batches
        (the same stream of batches continues); a world size that cannot split them is refused."""
        names = cls.field_names()
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
        from triform.training.distributed import env_world_size

        micro = int(kw.get("grad_accum", 1)) * int(saved.get("world_size", 1))
        world = env_world_size()
        if micro % world:
            raise ConfigError(f"this run takes {micro} micro-batches per step, which {world} ranks cannot share "
                              f"equally; resume it on a number of ranks that divides {micro}.")
        kw["grad_accum"] = micro // world
        return cls(**{**kw, **changes})


def _arg_entries(doc: str) -> dict[str, str]:
    """The ``name: text`` entries of a docstring's Args section, each with its continuation lines."""
    entries: dict[str, str] = {}
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    name = None
    for line in section.splitlines():
        stripped = line.strip()
        head = stripped.split(":", 1)[0]
        if line.startswith("        ") and not line.startswith("            ") and ":" in stripped and head.isidentifier():
            name = head
            entries[name] = stripped
        elif name is not None and stripped:
            entries[name] += " " + stripped
    return entries


def with_shared_docs(cls: type) -> type:
    """Append ``TrainArgs``' argument docs that ``cls`` does not override to ``cls``'s docstring, so
    every training command's ``--help`` documents every flag."""
    own = _arg_entries(cls.__doc__ or "")
    missing = [text for name, text in _arg_entries(TrainArgs.__doc__ or "").items() if name not in own]
    doc = (cls.__doc__ or "").rstrip()
    if "Args:" not in doc:
        doc += "\n\n    Args:"
    cls.__doc__ = doc + "".join(f"\n        {text}" for text in missing) + "\n    "
    return cls
