"""Reading and editing activations: ``run_with_cache`` and ``run_with_hooks`` on any triform model.

Hook points (``{L}`` = ``blocks.{i}.`` of the i-th block application; an encoder-decoder prefixes
``encoder.`` or ``decoder.``):

| name | shape | what |
|---|---|---|
| ``hook_embed`` | (B, T, d) | token embeddings E[tokens] |
| ``hook_pos_embed`` | (B, T, d) | learned absolute positions (GPT-2, BERT) |
| ``hook_token_type_embed`` | (B, T, d) | BERT's segment embeddings |
| ``{L}hook_resid_pre`` | (B, T, d) | the residual stream entering the block |
| ``{L}ln1.hook_normalized`` | (B, T, d) | the attention norm's output (pre-norm: what attention reads) |
| ``{L}attn.hook_q``, ``hook_k``, ``hook_v`` | (B, T, H, d_h) | projections, per head (k, v: per key/value head), before rotary positions |
| ``{L}attn.hook_rot_q``, ``hook_rot_k`` | (B, T, H, d_h) | after rotary positions (RoPE models) |
| ``{L}attn.hook_attn_scores`` | (B, H, Tq, Tk) | q·k scaled, plus position bias, masked to -inf |
| ``{L}attn.hook_pattern`` | (B, H, Tq, Tk) | attention probabilities |
| ``{L}attn.hook_z`` | (B, T, H, d_h) | each head's output before W_O |
| ``{L}hook_attn_out`` | (B, T, d) | the attention sublayer's output (after W_O) |
| ``{L}hook_resid_mid`` | (B, T, d) | the stream between attention and FFN |
| ``{L}cross_attn.*``, ``{L}hook_cross_attn_out``, ``{L}hook_resid_cross`` | | the same for cross-attention (decoder of an encoder-decoder) |
| ``{L}ln2.hook_normalized`` | (B, T, d) | the FFN norm's output |
| ``{L}mlp.hook_pre`` | (B, T, f) | FFN pre-activation (gated FFNs: the gate) |
| ``{L}mlp.hook_pre_linear`` | (B, T, f) | gated FFNs: the linear (up) half |
| ``{L}mlp.hook_post`` | (B, T, f) | after the activation (gated: act(gate) x up) |
| ``{L}hook_mlp_out`` | (B, T, d) | the FFN sublayer's output |
| ``{L}hook_resid_post`` | (B, T, d) | the residual stream leaving the block |
| ``ln_final.hook_normalized`` | (B, T, d) | the final norm's output |
| ``hook_unembed`` | (B, T, V) | logits (decoders, encoder-decoders) |

Attention scores and patterns are materialised only when a hook asks for them (the kernel, SDPA,
never forms them); for a post-norm block (BERT) ``hook_resid_mid`` is after the first norm. An
attention-only stack (``ffn="none"``) has no ``ln2``, ``mlp.*`` or ``hook_mlp_out`` points, and no
``hook_resid_mid`` where no sub-layer follows attention.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from triform.errors import ConfigError
from triform.layers.hooks import HookFn, HookPoint, HookScope

Names = Iterable[str] | Callable[[str], bool] | str | None


def _hookable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(type(m), "_hook_scope")]


@contextmanager
def hooks_installed(model: nn.Module, fns: dict[str, list[HookFn]]) -> Iterator[HookScope]:
    """Install a scope with ``fns`` on every hookable module of ``model`` for the duration."""
    if type(model).__name__ in ("Engine", "AsyncEngine", "EngineCore"):
        raise ConfigError("hooks run on a model, not through the paged engine (its packed attention has no "
                          "hook points); call run_with_cache(engine.model, tokens) instead.")
    modules = _hookable(model)
    if not modules:
        raise ConfigError(f"{type(model).__name__} has no hook points.")
    scope = HookScope(fns)
    for m in modules:
        m._hook_scope = scope
    try:
        yield scope
    finally:
        for m in modules:
            m._hook_scope = None


def _call(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    return model(*args, **kwargs)


class _Recorder(dict):
    """A name -> fns mapping that records every name ``match`` accepts (all by default)."""

    def __init__(self, record: Callable[[str, Tensor], None], match: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.record = record
        self.match = match or (lambda name: True)

    def get(self, name: str, default: Any = None) -> list[HookFn]:  # type: ignore[override]
        if not self.match(name):
            return []

        def fn(x: Tensor, point: HookPoint) -> None:
            self.record(point.name, x)  # reads only: the activation goes on unchanged

        return [fn]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.match(name)


def hook_names(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """Every hook point a forward pass on these inputs passes, with the activation's shape."""
    seen: dict[str, tuple[int, ...]] = {}
    with torch.no_grad(), hooks_installed(model, _Recorder(lambda n, x: seen.setdefault(n, tuple(x.shape)))):
        _call(model, args, kwargs)
    return seen


def _matcher(names: Names) -> Callable[[str], bool]:
    if names is None:
        return lambda n: True
    if callable(names):
        return names
    if isinstance(names, str):
        names = [names]
    patterns = list(names)
    regex = re.compile("|".join(fnmatch.translate(p) for p in patterns)) if patterns else re.compile("(?!)")
    return lambda n: regex.match(n) is not None


class ActivationCache(dict):
    """name -> activation (detached). ``stack(kind)`` gathers one kind over layers, e.g.
    ``cache.stack("hook_resid_post")`` -> (L, B, T, d)."""

    def stack(self, suffix: str, prefix: str = "") -> Tensor:
        keys = sorted((k for k in self if k.startswith(f"{prefix}blocks.") and k.endswith(f".{suffix}")),
                      key=lambda k: int(k[len(prefix):].split(".")[1]))
        if not keys:
            raise KeyError(f"no cached activation ends with {suffix!r}.")
        return torch.stack([self[k] for k in keys])

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values())


def estimate_cache_bytes(model: nn.Module, *args: Any, names: Names = None, **kwargs: Any) -> int:
    """Bytes ``run_with_cache`` would store for these inputs, from one pass that records the shape
    at every hook point and keeps nothing."""
    match = _matcher(names)
    shapes = hook_names(model, *args, **kwargs)
    itemsize = next(model.parameters()).element_size()
    total = 0
    for name, shape in shapes.items():
        if match(name):
            n = 1
            for s in shape:
                n *= s
            total += n * itemsize
    return total


def run_with_cache(model: nn.Module, *args: Any, names: Names = None, max_bytes: int | None = None,
                   **kwargs: Any) -> tuple[Any, ActivationCache]:
    """Run ``model(*args, **kwargs)`` without gradients and keep the activations whose names match
    ``names`` (a list of names or glob patterns such as ``"blocks.*.attn.hook_pattern"``, a
    predicate, or None for all). ``max_bytes``: refuse, before running, a cache estimated larger."""
    match = _matcher(names)
    if max_bytes is not None:
        need = estimate_cache_bytes(model, *args, names=names, **kwargs)
        if need > max_bytes:
            raise ConfigError(f"caching these activations needs about {need / 2**20:.1f} MiB, over the "
                              f"{max_bytes / 2**20:.1f} MiB allowed; ask for fewer names.")
    cache = ActivationCache()
    # one pass: every hook point asks whether its name is wanted (so attention probabilities are
    # formed only when a pattern or score name matches)
    fns = _Recorder(lambda n, x: cache.__setitem__(n, x.detach().clone()), match)
    with torch.no_grad(), hooks_installed(model, fns):
        out = _call(model, args, kwargs)
    return out, cache


def run_with_hooks(model: nn.Module, *args: Any, hooks: list[tuple[str | Callable[[str], bool], HookFn]],
                   grad: bool = False, **kwargs: Any) -> Any:
    """Run the model with ``hooks``: (name, glob or predicate; fn(tensor, point) -> tensor or None).
    A function that returns a tensor replaces the activation (ablation, patching)."""
    if not hooks:
        return _call(model, args, kwargs)
    names = hook_names(model, *args, **kwargs)
    fns: dict[str, list[HookFn]] = {}
    for selector, fn in hooks:
        match = _matcher(selector)
        hit = [n for n in names if match(n)]
        if not hit:
            raise ConfigError(f"no hook point matches {selector!r} (see triform.inspect.hooks.hook_names).")
        for n in hit:
            fns.setdefault(n, []).append(fn)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx, hooks_installed(model, fns):
        return _call(model, args, kwargs)


# ---- common edits ---------------------------------------------------------------------------


def zero_ablate_head(head: int) -> HookFn:
    """For ``attn.hook_z``: zero one head's output (B, T, H, d_h)."""
    def fn(z: Tensor, point: HookPoint) -> Tensor:
        z = z.clone()
        z[:, :, head] = 0
        return z
    return fn


def mean_ablate(mean: Tensor) -> HookFn:
    """Replace an activation by ``mean`` (broadcast), e.g. its mean over a reference batch."""
    return lambda x, point: mean.to(x.dtype).expand_as(x).clone()


def patch_from(source: ActivationCache, positions: Iterable[int] | None = None, head: int | None = None) -> HookFn:
    """Replace an activation by the same point's activation in ``source`` (a cache of another
    input), at ``positions`` (all when None) and, for per-head activations, one ``head``."""
    pos = None if positions is None else list(positions)

    def fn(x: Tensor, point: HookPoint) -> Tensor:
        other = source[point.name].to(x.dtype)
        out = x.clone()
        index: tuple = (slice(None), slice(None) if pos is None else pos)
        if head is not None:
            index = index + (head,)
        out[index] = other[index]
        return out
    return fn


__all__ = ["ActivationCache", "run_with_cache", "run_with_hooks", "hook_names", "estimate_cache_bytes",
           "hooks_installed", "zero_ablate_head", "mean_ablate", "patch_from", "HookPoint"]
