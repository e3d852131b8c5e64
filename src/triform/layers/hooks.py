"""Hook points: named places in the forward pass where an activation can be read or replaced.

A model carries no hooks until ``triform.inspect.hooks`` installs a ``HookScope`` on it and its
blocks; then each hook point calls ``hook(module, local_name, tensor)``, which runs the functions
registered for the point's full name and returns their result. With no scope installed,
``hook`` returns its tensor after one attribute test, so the model's speed is unchanged.

Full names follow TransformerLens where the concept is the same: ``hook_embed``,
``blocks.{i}.hook_resid_pre``, ``blocks.{i}.attn.hook_pattern``, ``blocks.{i}.mlp.hook_post``,
``ln_final.hook_normalized`` ... (the table is in ``triform.inspect.hooks``); an encoder-decoder
prefixes ``encoder.`` and ``decoder.``. A block's names use the index of its *application*, so
ALBERT's one shared block reports ``blocks.0`` ... ``blocks.{L-1}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class HookPoint:
    """What a hook function receives besides the tensor: the point's full name."""

    name: str


HookFn = Callable[[Tensor, HookPoint], "Tensor | None"]


@dataclass
class HookScope:
    """The hooks of one run: full name -> functions, and where the forward pass is now (the stack
    prefix and the block being applied), set by the model as it goes."""

    fns: dict[str, list[HookFn]] = field(default_factory=dict)
    prefix: str = ""
    layer: int = 0

    def full_name(self, local: str, in_block: bool) -> str:
        return f"{self.prefix}blocks.{self.layer}.{local}" if in_block else f"{self.prefix}{local}"

    def wants(self, local: str, in_block: bool = True) -> bool:
        return self.full_name(local, in_block) in self.fns

    def __call__(self, local: str, x: Tensor, in_block: bool) -> Tensor:
        name = self.full_name(local, in_block)
        fns = self.fns.get(name)
        if not fns:
            return x
        point = HookPoint(name)
        for fn in fns:
            out = fn(x, point)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(f"the hook on {name} returned shape {tuple(out.shape)}, not {tuple(x.shape)}.")
                x = out
        return x


def hook(module: object, local: str, x: Tensor, *, in_block: bool = True) -> Tensor:
    """``x`` through the hooks registered at this point (none: ``x`` itself)."""
    scope = module._hook_scope  # type: ignore[attr-defined]
    if scope is None:
        return x
    return scope(local, x, in_block)


def enter_block(module: object, layer: int, prefix: str | None = None) -> None:
    """Tell the scope (if any) that block application ``layer`` of stack ``prefix`` starts."""
    scope = module._hook_scope  # type: ignore[attr-defined]
    if scope is not None:
        scope.layer = layer
        if prefix is not None:
            scope.prefix = prefix


__all__ = ["HookPoint", "HookFn", "HookScope", "hook", "enter_block"]
