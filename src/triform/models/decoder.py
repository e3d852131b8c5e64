"""DecoderLM: a decoder-only language model whose config alone gives GPT-2, Llama or Mistral shapes.

tokens (B, T) -> embeddings (+ absolute positions) -> N causal blocks -> final norm -> logits (B, T, V)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.config import DecoderConfig
from triform.layers.cache import ContiguousKVCache, KVCache, RollingKVCache
from triform.layers.attention import AttentionInputs
from triform.layers.block import Block
from triform.layers.hooks import HookScope, enter_block, hook
from triform.layers.fused_ce import Workspace, linear_cross_entropy
from triform.layers.masks import decoder_mask, materialize, or_masks, positions_from_padding, prefix_visible
from triform.layers.norm import make_norm
from triform.layers.position import ALiBi, LearnedPositions, RotaryEmbedding, SinusoidalPositions


class DecoderLM(nn.Module):
    """A causal language model built from the shared block stack.

    ``forward(tokens, attention_mask=None, positions=None, cache=None, last_only=False,
    prefix_lengths=None)`` returns logits. ``attention_mask`` (B, T) marks real tokens (False for left
    padding); ``positions`` may be given explicitly (decode steps), otherwise they count from the
    cache's length. ``prefix_lengths`` (B,) makes the model a prefix-LM: the first P positions of each
    row attend to each other bidirectionally, the rest causally (UL2's S-denoiser on a decoder).

    With ``targets`` (B, T) it returns instead the summed next-token cross-entropy in nats over the
    targets that are not -100, ``F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
    reduction="sum")``: in float32 without autocast the output projection and the loss are fused
    (``triform.layers.fused_ce``, the logits are never materialised); otherwise it is exactly that
    expression on the logits.
    """

    fused_loss = True  # forward accepts targets= (see CausalLM.loss)
    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.stack
        self.tok_emb = nn.Embedding(cfg.vocab_size, s.d_model)
        self.abs_pos: nn.Module | None = None
        if s.position == "learned":
            self.abs_pos = LearnedPositions(s.max_seq_len, s.d_model)
        elif s.position == "sinusoidal":
            self.abs_pos = SinusoidalPositions(s.max_seq_len, s.d_model)
        assert s.head_dim is not None
        self.rope = RotaryEmbedding(s.head_dim, s.max_seq_len, s.rope_theta) if s.position == "rope" else None
        self.alibi = ALiBi(s.n_heads) if s.position == "alibi" else None
        self.drop = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(Block(s, i) for i in range(s.n_layers))
        self.norm = make_norm(s.norm, s.d_model, s.norm_eps, s.bias) if s.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(s.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.mask_fn = decoder_mask(s.sliding_window)
        self.loss_workspace = Workspace()  # scratch blocks of the fused head + loss, reused every step
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), output projections scaled by 1/sqrt(2·n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.stack.n_layers) if name.endswith(("attn.o.weight", "ffn.down.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("weight"):
                nn.init.ones_(p)

    def new_cache(
        self, batch: int, max_len: int, *, window: int | None = None,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_len`` tokens.

        It is a rolling cache when the model's sliding window, or an explicit ``window`` (keep only
        the last ``window`` tokens, for generating past the context with relative positions), is
        shorter than ``max_len``; otherwise a contiguous one.
        """
        s = self.cfg.stack
        assert s.n_kv_heads is not None and s.head_dim is not None
        p = self.tok_emb.weight
        dtype, device = dtype or p.dtype, device or p.device
        windows = [w for w in (s.sliding_window, window) if w is not None]
        if windows and min(windows) < max_len:
            return RollingKVCache(s.n_layers, batch, s.n_kv_heads, s.head_dim, min(windows), dtype=dtype, device=device)
        return ContiguousKVCache(s.n_layers, batch, s.n_kv_heads, s.head_dim, max_len, dtype=dtype, device=device)

    def _cache_length(self, cache: KVCache | None) -> int:
        if cache is None:
            return 0
        return cache.seen

    def attention_inputs(
        self, tokens: Tensor, attention_mask: Tensor | None, positions: Tensor | None, cache: KVCache | None,
        prefix_lengths: Tensor | None = None,
    ) -> tuple[Tensor, AttentionInputs]:
        """Positions (B, T) of the new tokens and the mask/bias/RoPE tables every layer shares."""
        b, t = tokens.shape
        aligned = positions is None and attention_mask is None and (cache is None or cache.is_empty) and prefix_lengths is None
        if positions is None:
            offset = self._cache_length(cache)
            if attention_mask is not None:
                positions = positions_from_padding(attention_mask, offset)
            else:
                positions = torch.arange(offset, offset + t, device=tokens.device).expand(b, t)
        elif attention_mask is not None:
            positions = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1))
        k_pos = cache.begin(positions) if cache is not None else positions
        window = self.cfg.stack.sliding_window
        inputs = AttentionInputs(cache=cache)
        attend = getattr(cache, "attend", None)
        if attend is not None:  # the cache masks and attends itself (a packed paged step)
            if prefix_lengths is not None:
                raise ValueError("prefix-LM attention is not supported by the paged engine.")
            inputs.attend = attend
            if self.rope is not None:
                inputs.rope = self.rope.tables(positions)
            return positions, inputs
        if aligned and k_pos.shape[1] == t and (window is None or window >= t):
            inputs.is_causal = True  # keys are exactly the queries, plain causal: SDPA's fused kernel
        elif prefix_lengths is not None:
            fn = or_masks(self.mask_fn, prefix_visible(prefix_lengths.to(k_pos.device)))
            inputs.mask = materialize(fn, positions, k_pos)
        else:
            inputs.mask = materialize(self.mask_fn, positions, k_pos)
        if self.rope is not None:
            inputs.rope = self.rope.tables(positions)
        if self.alibi is not None:
            inputs.bias = self.alibi(positions, k_pos)
        return positions, inputs

    def hidden_states(
        self, tokens: Tensor, *, attention_mask: Tensor | None = None, positions: Tensor | None = None,
        cache: KVCache | None = None, prefix_lengths: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, d) before the output projection."""
        max_len = self.cfg.stack.max_seq_len
        if positions is None and self.abs_pos is not None and self._cache_length(cache) + tokens.shape[1] > max_len:
            raise ValueError(f"sequence of {self._cache_length(cache) + tokens.shape[1]} tokens exceeds max_seq_len {max_len}")
        positions, inputs = self.attention_inputs(tokens, attention_mask, positions, cache, prefix_lengths)
        if self._hook_scope is not None:
            if inputs.attend is not None:
                raise ValueError("hooks do not run through the paged engine's packed attention; run the model itself.")
            enter_block(self, 0, "")
        x = hook(self, "hook_embed", self.tok_emb(tokens), in_block=False)  # (B, T, d)
        if self.abs_pos is not None:
            x = x + hook(self, "hook_pos_embed", self.abs_pos(positions), in_block=False)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            enter_block(self, i)
            x = block(x, inputs)
        return hook(self, "ln_final.hook_normalized", self.norm(x), in_block=False)

    def forward(
        self, tokens: Tensor, *, attention_mask: Tensor | None = None, positions: Tensor | None = None,
        cache: KVCache | None = None, last_only: bool = False, prefix_lengths: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Tensor:
        h = self.hidden_states(tokens, attention_mask=attention_mask, positions=positions, cache=cache, prefix_lengths=prefix_lengths)
        if last_only:
            h = h[:, -1:]
        if targets is not None:
            return self.loss_from_hidden(h, targets)
        return hook(self, "hook_unembed", self.lm_head(h), in_block=False)  # (B, T, V)

    def loss_from_hidden(self, h: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy (nats) of the logits of hidden states h (B, T, d) against targets
        (B, T), -100 ignored; fused with the output projection where that computes the same thing."""
        w = self.lm_head.weight
        if h.dtype == w.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
            return linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1), workspace=self.loss_workspace)
        logits = self.lm_head(h)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    def num_parameters(self) -> int:
        """Trainable parameters, counting tied weights once."""
        return sum(p.numel() for p in self.parameters())
