"""The residual block every family shares: norm + self-attention (+ cross-attention) (+ FFN)."""

from __future__ import annotations

from torch import Tensor, nn

from triform.config import StackConfig
from triform.layers.attention import Attention, AttentionInputs
from triform.layers.feedforward import FeedForward
from triform.layers.hooks import HookScope, hook
from triform.layers.norm import make_norm


class Block(nn.Module):
    """One transformer layer, pre-norm (GPT-2, Llama) or post-norm (original Transformer, BERT).

    pre:  x = x + attn(norm(x));  x = x + ffn(norm(x))
    post: x = norm(x + attn(x));  x = norm(x + ffn(x))

    An attention-only stack (``ffn="none"``) has neither ``ffn`` nor ``ffn_norm``: its blocks end
    after attention, and the FFN's hook points (``ln2.*``, ``mlp.*``, ``hook_mlp_out``) do not exist;
    the stream between two sublayers (``hook_resid_mid``, ``hook_resid_cross``) is a hook point only
    where another sublayer follows, as in TransformerLens's attention-only models.
    """

    def __init__(self, cfg: StackConfig, layer_idx: int, *, cross_attention: bool = False) -> None:
        super().__init__()
        self.pre = cfg.norm_placement == "pre"
        self.attn = Attention(cfg, layer_idx)
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.cross_attn: Attention | None = None
        if cross_attention:
            self.cross_attn = Attention(cfg, layer_idx, cross=True)
            self.cross_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.ffn: FeedForward | None = None
        if cfg.ffn != "none":
            self.ffn = FeedForward(cfg)
            self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)

    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def _residual(self, x: Tensor, norm: nn.Module, fn) -> Tensor:
        return x + fn(norm(x)) if self.pre else norm(x + fn(x))

    def forward(
        self, x: Tensor, inputs: AttentionInputs, *,
        memory: Tensor | None = None, memory_inputs: AttentionInputs | None = None,
    ) -> Tensor:
        if self._hook_scope is not None:
            return self._forward_hooked(x, inputs, memory, memory_inputs)
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, inputs))
        if self.cross_attn is not None:
            assert memory_inputs is not None
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(h, memory_inputs, memory))
        if self.ffn is None:
            return x
        return self._residual(x, self.ffn_norm, self.ffn)

    def _sublayer(self, x: Tensor, norm: nn.Module, fn, norm_name: str, out_name: str) -> Tensor:
        """One residual sublayer with its hook points: the norm's output and the sublayer's output."""
        if self.pre:
            y = hook(self, out_name, fn(hook(self, f"{norm_name}.hook_normalized", norm(x))))
            return x + y
        y = hook(self, out_name, fn(x))
        return hook(self, f"{norm_name}.hook_normalized", norm(x + y))

    def _forward_hooked(self, x: Tensor, inputs: AttentionInputs, memory: Tensor | None,
                        memory_inputs: AttentionInputs | None) -> Tensor:
        """The same computation as ``forward``, passing every hook point of the block."""
        x = hook(self, "hook_resid_pre", x)
        x = self._sublayer(x, self.attn_norm, lambda h: self.attn(h, inputs), "ln1", "hook_attn_out")
        # the streams between sublayers are hook points only where another sublayer follows
        if self.cross_attn is not None or self.ffn is not None:
            x = hook(self, "hook_resid_mid", x)
        if self.cross_attn is not None:
            assert memory_inputs is not None
            x = self._sublayer(x, self.cross_norm, lambda h: self.cross_attn(h, memory_inputs, memory), "ln_cross",
                               "hook_cross_attn_out")
            if self.ffn is not None:
                x = hook(self, "hook_resid_cross", x)
        if self.ffn is not None:
            x = self._sublayer(x, self.ffn_norm, self.ffn, "ln2", "hook_mlp_out")
        return hook(self, "hook_resid_post", x)
