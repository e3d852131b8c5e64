"""Seq2Seq: T5 / ByT5 from the shared block stack.

source (B, S) -> shared embedding -> N bidirectional blocks -> RMSNorm -> memory (B, S, d)
target (B, T) -> shared embedding -> M causal blocks, each with cross-attention to memory -> RMSNorm
-> (scaled by d^-0.5 when tied) -> logits (B, T, V)

T5's positions are a learned bias per (relative-distance bucket, head) added to the attention scores,
one table per stack, computed once per forward and shared by every layer; cross-attention has none.
The decoder's self-attention takes the same KV caches as DecoderLM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from triform.config import Seq2SeqConfig
from triform.layers.cache import ContiguousKVCache, KVCache
from triform.layers.attention import AttentionInputs
from triform.layers.block import Block
from triform.layers.hooks import HookScope, enter_block, hook
from triform.layers.masks import decoder_mask, materialize
from triform.layers.norm import make_norm
from triform.layers.position import T5RelativeBias


class Seq2Seq(nn.Module):
    """``encode(source, source_mask)`` -> memory; ``decode(target, memory, source_mask, cache)`` -> logits;
    ``forward(source, target, source_mask=)`` does both (teacher forcing)."""

    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, d = cfg.encoder, cfg.decoder
        self.shared = nn.Embedding(cfg.vocab_size, e.d_model)
        self.encoder_blocks = nn.ModuleList(Block(e, i) for i in range(e.n_layers))
        self.encoder_norm = make_norm(e.norm, e.d_model, e.norm_eps, e.bias)
        self.decoder_blocks = nn.ModuleList(Block(d, i, cross_attention=True) for i in range(d.n_layers))
        self.decoder_norm = make_norm(d.norm, d.d_model, d.norm_eps, d.bias)
        self.encoder_bias = T5RelativeBias(e.n_heads, bidirectional=True, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance)
        self.decoder_bias = T5RelativeBias(d.n_heads, bidirectional=False, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance)
        self.drop = nn.Dropout(e.dropout)
        self.lm_head = nn.Linear(d.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight
        self.causal = decoder_mask(d.sliding_window)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5's initialisation (as in its Mesh TensorFlow code): N(0, 1) embeddings; queries
        N(0, (d·d_kv)^-1/2), which stands in for the attention scaling T5 omits; keys, values, FFN inputs,
        the relative bias and an untied output layer N(0, d^-1/2); output projections N(0, fan_in^-1/2);
        unit norms."""
        d = self.cfg.encoder.d_model
        d_kv = self.cfg.encoder.head_dim
        assert d_kv is not None
        n_q = self.cfg.encoder.n_heads * d_kv
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm weights (T5 has no biases)
            elif name == "shared.weight":
                nn.init.normal_(p, std=1.0)
            elif name.endswith("attn.qkv.weight"):
                nn.init.normal_(p, std=d**-0.5)
                nn.init.normal_(p[:n_q], std=(d * d_kv) ** -0.5)
            elif name.endswith("cross_attn.q.weight"):
                nn.init.normal_(p, std=(d * d_kv) ** -0.5)
            elif name.endswith(("attn.o.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=p.shape[1] ** -0.5)
            else:  # k/v of cross-attention, FFN inputs, relative bias tables, untied lm_head
                nn.init.normal_(p, std=d**-0.5)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty self-attention cache for the decoder."""
        d = self.cfg.decoder
        assert d.n_kv_heads is not None and d.head_dim is not None
        p = self.shared.weight
        return ContiguousKVCache(d.n_layers, batch, d.n_kv_heads, d.head_dim, max_len, dtype=p.dtype, device=p.device)

    def encode(self, source: Tensor, source_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, d); ``source_mask`` (B, S) marks real tokens."""
        s = source.shape[1]
        pos = torch.arange(s, device=source.device)[None]
        inputs = AttentionInputs(bias=self.encoder_bias(pos, pos))  # (1, H, S, S)
        if source_mask is not None and not bool(source_mask.all()):
            inputs.mask = source_mask.bool()[:, None, None, :]  # (B, 1, 1, S): padded keys hidden
        enter_block(self, 0, "encoder.")
        x = self.drop(hook(self, "hook_embed", self.shared(source), in_block=False))
        for i, block in enumerate(self.encoder_blocks):
            enter_block(self, i)
            x = block(x, inputs)
        return self.drop(hook(self, "ln_final.hook_normalized", self.encoder_norm(x), in_block=False))

    def decode(
        self, target: Tensor, memory: Tensor, source_mask: Tensor | None = None, *, cache: KVCache | None = None,
        memory_cache: dict | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for target tokens (B, T), after ``cache.seen`` tokens already decoded.
        ``memory_cache`` (an empty dict at the first step) keeps cross-attention keys/values across steps."""
        b, t = target.shape
        offset = cache.seen if cache is not None else 0
        positions = torch.arange(offset, offset + t, device=target.device).expand(b, t)
        k_pos = cache.begin(positions) if cache is not None else positions
        inputs = AttentionInputs(
            mask=materialize(self.causal, positions, k_pos), bias=self.decoder_bias(positions, k_pos), cache=cache,
        )
        memory_inputs = AttentionInputs(cache=memory_cache)
        if source_mask is not None and not bool(source_mask.all()):
            memory_inputs.mask = source_mask.bool()[:, None, None, :]
        enter_block(self, 0, "decoder.")
        x = self.drop(hook(self, "hook_embed", self.shared(target), in_block=False))
        for i, block in enumerate(self.decoder_blocks):
            enter_block(self, i)
            x = block(x, inputs, memory=memory, memory_inputs=memory_inputs)
        h = self.drop(hook(self, "ln_final.hook_normalized", self.decoder_norm(x), in_block=False))
        if self.cfg.scale_output:
            h = h * self.cfg.decoder.d_model**-0.5  # T5 1.0 rescales before its tied output projection
        return hook(self, "hook_unembed", self.lm_head(h), in_block=False)

    def forward(self, source: Tensor, target: Tensor, *, source_mask: Tensor | None = None) -> Tensor:
        return self.decode(target, self.encode(source, source_mask), source_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
