"""Encoder-only models (BERT, RoBERTa, ALBERT, DistilBERT) from the shared block stack, and their heads.

tokens (B, T) -> word + position (+ segment) embeddings -> norm (-> ALBERT's projection to d)
-> N bidirectional blocks (one shared block applied N times for ALBERT) -> hidden states (B, T, d)

The stack takes any embedding front-end: ``Encoder.forward(embeddings=...)`` skips the token
embeddings, so image patches or audio frames run through the same blocks. Heads sit on top:
masked-LM (tied to the word embeddings), a sentence-pair head (next-sentence or sentence-order
prediction) on the pooled first token, sequence classification, token tagging and extractive span QA.
Losses and masking live in ``triform.objectives``; models return logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from triform.config import EncoderConfig
from triform.layers.attention import AttentionInputs
from triform.layers.block import Block
from triform.layers.hooks import HookScope, enter_block, hook
from triform.layers.feedforward import _ACTIVATIONS
from triform.layers.position import LearnedPositions


class EncoderEmbeddings(nn.Module):
    """Word + learned position (+ segment) embeddings, LayerNorm and dropout, at width
    ``embedding_dim``; projected up to ``d_model`` when narrower (ALBERT's factorization)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        s, e = cfg.stack, cfg.embedding_dim
        assert e is not None
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, e)
        self.position = LearnedPositions(s.max_seq_len, e)
        self.token_type = nn.Embedding(cfg.type_vocab_size, e) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(e, eps=s.norm_eps)
        self.drop = nn.Dropout(s.dropout)
        self.proj = nn.Linear(e, s.d_model) if e != s.d_model else None

    def positions(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        """BERT counts positions 0..T-1; RoBERTa counts real tokens from ``position_offset`` (its
        padding index + 1), and padding gets ``position_offset - 1``."""
        b, t = tokens.shape
        if self.cfg.position_offset == 0:
            return torch.arange(t, device=tokens.device).expand(b, t)
        real = (tokens != self.cfg.pad_id) if attention_mask is None else attention_mask.bool()
        real = real.long()
        return torch.cumsum(real, dim=1) * real + (self.cfg.position_offset - 1)

    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def forward(self, tokens: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        x = hook(self, "hook_embed", self.word(tokens), in_block=False) + hook(
            self, "hook_pos_embed", self.position(self.positions(tokens, attention_mask)), in_block=False)  # (B, T, E)
        if self.token_type is not None:
            types = torch.zeros_like(tokens) if token_type_ids is None else token_type_ids
            x = x + hook(self, "hook_token_type_embed", self.token_type(types), in_block=False)
        x = self.drop(hook(self, "embed.ln.hook_normalized", self.norm(x), in_block=False))
        return self.proj(x) if self.proj is not None else x  # (B, T, d)


def run_blocks(
    owner: nn.Module, blocks: nn.ModuleList, x: Tensor, *, n_layers: int | None = None,
    attention_mask: Tensor | None = None, causal: bool = False,
) -> Tensor:
    """The shared stack over embeddings ``x`` (B, T, d), whatever made them (tokens, image patches):
    every block in turn (one block applied ``n_layers`` times when ``blocks`` holds one, ALBERT's
    sharing), bidirectional or ``causal``. ``attention_mask`` (B, T) hides padded keys from every
    query. ``owner`` is the hookable model the blocks belong to (each application is reported to it)."""
    inputs = AttentionInputs(is_causal=causal)
    if attention_mask is not None and not bool(attention_mask.all()):
        if causal:
            raise ValueError("a causal stack here takes right-padded rows without a mask (padding follows every real token).")
        inputs.mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk): padded keys hidden
    for i in range(len(blocks) if n_layers is None else n_layers):
        enter_block(owner, i)  # ALBERT's shared block reports each application as layer i
        x = blocks[0 if len(blocks) == 1 else i](x, inputs)
    return x


class Encoder(nn.Module):
    """The bidirectional stack: ``forward(tokens, attention_mask=, token_type_ids=)`` -> (B, T, d).

    ``attention_mask`` (B, T) marks real tokens; padded keys are hidden from every query.
    """

    _hook_scope: HookScope | None = None  # set by triform.inspect.hooks while hooks run

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.stack
        self.embeddings = EncoderEmbeddings(cfg)
        self.blocks = nn.ModuleList(Block(s, i) for i in range(1 if cfg.share_layers else s.n_layers))
        self.pooler = nn.Linear(s.d_model, s.d_model) if cfg.pooler else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm gains."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LearnedPositions):
                nn.init.normal_(module.weight, std=0.02)

    def forward(
        self, tokens: Tensor | None = None, *, attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None, embeddings: Tensor | None = None,
    ) -> Tensor:
        if embeddings is None:
            assert tokens is not None, "give tokens or embeddings"
            if tokens.shape[1] > self.cfg.max_tokens:
                raise ValueError(f"{tokens.shape[1]} tokens exceed the model's {self.cfg.max_tokens} positions")
            embeddings = self.embeddings(tokens, token_type_ids, attention_mask)
        return run_blocks(self, self.blocks, embeddings, n_layers=self.cfg.stack.n_layers, attention_mask=attention_mask)

    def forward_packed(self, sequences: list[Tensor], token_type_ids: list[Tensor] | None = None) -> list[Tensor]:
        """Encode sequences of different lengths without padding: their tokens are packed into one row,
        so every linear layer runs on real tokens only, and attention runs within each sequence.
        Returns one (L_i, d) tensor per sequence."""
        lengths = [len(s) for s in sequences]
        if max(lengths) > self.cfg.max_tokens:
            raise ValueError(f"{max(lengths)} tokens exceed the model's {self.cfg.max_tokens} positions")
        emb = self.embeddings
        ids = torch.cat(sequences)[None]  # (1, N)
        start = self.cfg.position_offset
        pos = torch.cat([torch.arange(start, start + n, device=ids.device) for n in lengths])[None]
        x = emb.word(ids) + emb.position(pos)
        if emb.token_type is not None:
            types = torch.cat(token_type_ids)[None] if token_type_ids is not None else torch.zeros_like(ids)
            x = x + emb.token_type(types)
        x = emb.drop(emb.norm(x))
        if emb.proj is not None:
            x = emb.proj(x)
        bounds, at = [], 0
        for n in lengths:
            bounds.append((at, at + n))
            at += n

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, kernel) -> Tensor:  # (1, H, N, Dh) each
            out = torch.empty_like(q)
            for s, e in bounds:
                out[:, :, s:e] = kernel(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], mask=None, bias=None,
                                        is_causal=False, dropout_p=0.0, scale=None)
            return out

        inputs = AttentionInputs(attend=attend)
        for i in range(self.cfg.stack.n_layers):
            x = self.blocks[0 if self.cfg.share_layers else i](x, inputs)
        return list(x[0].split(lengths))

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT's pooled output: tanh(W h_[CLS] + b) (B, d); the raw first token without a pooler."""
        first = hidden[:, 0]
        return torch.tanh(self.pooler(first)) if self.pooler is not None else first


def mean_pool(hidden: Tensor, attention_mask: Tensor | None, *, normalize: bool = True) -> Tensor:
    """Sentence embeddings: the mean of the real tokens' hidden states (B, d), L2-normalised."""
    if attention_mask is None:
        out = hidden.mean(dim=1)
    else:
        m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        out = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> output layer tied to the word embeddings (+ bias)."""

    def __init__(self, cfg: EncoderConfig, word: nn.Embedding) -> None:
        super().__init__()
        e = cfg.embedding_dim
        assert e is not None
        self.dense = nn.Linear(cfg.stack.d_model, e)
        self.act = _ACTIVATIONS[cfg.stack.ffn]
        self.norm = nn.LayerNorm(e, eps=cfg.stack.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.word = [word]  # a plain list: the tied weight belongs to the embeddings, not to this head

    def forward(self, hidden: Tensor) -> Tensor:
        h = self.norm(self.act(self.dense(hidden)))  # (B, T, E)
        return torch.nn.functional.linear(h, self.word[0].weight, self.bias)  # (B, T, V)


@dataclass
class PreTrainingOutput:
    mlm_logits: Tensor  # (B, T, V)
    pair_logits: Tensor | None  # (B, 2): next-sentence or sentence-order prediction
    hidden: Tensor  # (B, T, d)


class EncoderForPreTraining(nn.Module):
    """Encoder + masked-LM head (+ a two-way sentence-pair head on the pooled output: NSP for BERT,
    SOP for ALBERT)."""

    def __init__(self, cfg: EncoderConfig, *, pair_head: bool | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.mlm = MaskedLMHead(cfg, self.encoder.embeddings.word)
        with_pair = cfg.pooler if pair_head is None else pair_head
        self.pair = nn.Linear(cfg.stack.d_model, 2) if with_pair else None
        for lin in (self.mlm.dense, self.pair):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def forward(
        self, tokens: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
    ) -> PreTrainingOutput:
        hidden = self.encoder(tokens, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pair = self.pair(self.encoder.pool(hidden)) if self.pair is not None else None
        return PreTrainingOutput(self.mlm(hidden), pair, hidden)


def _head(d_model: int, outputs: int) -> nn.Linear:
    """A task head's linear layer with BERT's initialisation."""
    head = nn.Linear(d_model, outputs)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


class EncoderForSequenceClassification(nn.Module):
    """Pooled first token -> dropout -> linear (B, num_labels). Families without a pooler get one."""

    def __init__(self, cfg: EncoderConfig, num_labels: int) -> None:
        super().__init__()
        self.cfg, self.num_labels = cfg, num_labels
        self.encoder = Encoder(cfg.replace(pooler=True))
        self.drop = nn.Dropout(cfg.stack.dropout)
        self.head = _head(cfg.stack.d_model, num_labels)

    def forward(self, tokens: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        hidden = self.encoder(tokens, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.head(self.drop(self.encoder.pool(hidden)))  # (B, num_labels)


class EncoderForTokenClassification(nn.Module):
    """A label per token (named entities, tags): hidden -> dropout -> linear (B, T, num_labels)."""

    def __init__(self, cfg: EncoderConfig, num_labels: int) -> None:
        super().__init__()
        self.cfg, self.num_labels = cfg, num_labels
        self.encoder = Encoder(cfg)
        self.drop = nn.Dropout(cfg.stack.dropout)
        self.head = _head(cfg.stack.d_model, num_labels)

    def forward(self, tokens: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        hidden = self.encoder(tokens, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.head(self.drop(hidden))


class EncoderForQuestionAnswering(nn.Module):
    """Extractive QA: per-token start and end logits, each (B, T), from one linear layer."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = _head(cfg.stack.d_model, 2)

    def forward(
        self, tokens: Tensor, *, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        hidden = self.encoder(tokens, attention_mask=attention_mask, token_type_ids=token_type_ids)
        start, end = self.head(hidden).unbind(dim=-1)
        return start, end


def best_span(start_logits: Tensor, end_logits: Tensor, allowed: Tensor, *, max_answer_len: int = 30) -> list[tuple[int, int, float]]:
    """The highest-scoring answer (start, end, start_logit + end_logit) per row, over spans with
    start <= end < start + max_answer_len whose tokens are all ``allowed`` (the context, not the
    question or padding). A row with no allowed token gives (-1, -1, -inf)."""
    t = start_logits.shape[-1]
    i = torch.arange(t, device=start_logits.device)
    ok_len = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_len)  # (T, T): [start, end]
    out = []
    for s, e, a in zip(start_logits, end_logits, allowed.bool()):
        # A span is valid when both ends are allowed and nothing disallowed lies between them.
        blocked = torch.cumsum((~a).long(), dim=0)  # disallowed tokens up to each position
        inside_ok = (blocked[None, :] - blocked[:, None]) == 0
        valid = ok_len & a[:, None] & a[None, :] & inside_ok
        scores = (s[:, None] + e[None, :]).masked_fill(~valid, float("-inf"))  # (T, T)
        best = int(scores.argmax())
        score = float(scores.view(-1)[best])
        out.append((best // t, best % t, score) if score > float("-inf") else (-1, -1, float("-inf")))
    return out


@torch.no_grad()
def student_from_teacher(teacher: EncoderForPreTraining) -> EncoderForPreTraining:
    """DistilBERT's student (arXiv 1910.01108): half the teacher's layers, initialised from every other
    teacher layer (0, 2, 4, ...), with the teacher's embeddings and masked-LM head; no segment
    embeddings and no pooler. The teacher's segment-0 embedding is folded into the position table,
    so on single-segment input the student starts from the teacher's embedding output exactly."""
    cfg = teacher.cfg
    if cfg.share_layers:
        raise ValueError("a student is built from a teacher with separate layers (not ALBERT's shared one).")
    student_cfg = cfg.replace(n_layers=max(1, cfg.stack.n_layers // 2), family="distilbert", type_vocab_size=0, pooler=False)
    student = EncoderForPreTraining(student_cfg, pair_head=False)
    t, s = teacher.encoder, student.encoder
    s.embeddings.word.weight.copy_(t.embeddings.word.weight)
    s.embeddings.position.weight.copy_(t.embeddings.position.weight)
    if t.embeddings.token_type is not None:
        s.embeddings.position.weight.add_(t.embeddings.token_type.weight[0])
    s.embeddings.norm.load_state_dict(t.embeddings.norm.state_dict())
    if t.embeddings.proj is not None and s.embeddings.proj is not None:
        s.embeddings.proj.load_state_dict(t.embeddings.proj.state_dict())
    for i, block in enumerate(s.blocks):
        block.load_state_dict(t.blocks[2 * i].state_dict())
    student.mlm.dense.load_state_dict(teacher.mlm.dense.state_dict())
    student.mlm.norm.load_state_dict(teacher.mlm.norm.state_dict())
    student.mlm.bias.copy_(teacher.mlm.bias)
    return student
