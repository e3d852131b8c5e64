"""Induction heads, learned: a two-layer attention-only decoder trained through the one loop on
repeated random sequences grows layer-1 induction heads that ``classify_heads`` names and whose
ablation breaks in-context copying; the same model untrained has none. Also the attention-only
stack itself (``ffn="none"``): config, parameters, hook points and checkpoints."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from triform.checkpoint import load_checkpoint, save_checkpoint
from triform.config import (
    BYTE_VOCAB,
    DecoderConfig,
    Seq2SeqConfig,
    StackConfig,
    count_parameters,
    get_encoder_preset,
    get_seq2seq_preset,
)
from triform.errors import ConfigError
from triform.inspect.anatomy import anatomy, expected
from triform.inspect.heads import classify_heads, repeated_tokens
from triform.inspect.hooks import hook_names, run_with_cache, run_with_hooks, zero_ablate_head
from triform.models.decoder import DecoderLM
from triform.models.encoder_decoder import Seq2Seq
from triform.objectives.base import Batch, BatchRng, mean_parts
from triform.tokenizers.byte import ByteTokenizer
from triform.training.args import TrainArgs
from triform.training.loop import FitResult, fit

VOCAB = 64
TRAIN_LENGTHS = [n for n in range(8, 25) if n != 20]  # n = 20 is held out: the heads are scored on it
HELD_OUT_N = 20
SEED = 0
LN_V = math.log(VOCAB)


def attention_only(vocab: int = VOCAB, **stack: Any) -> DecoderConfig:
    """Two layers of four heads, no FFN, ALiBi positions, untied output.

    ALiBi because its positions are relative only and its steepest head (slope 1/4) already leans
    on the last few tokens at initialisation, half of the circuit's previous-token step: induction
    forms in a few hundred steps (RoPE took about three times as many here, and learned absolute
    positions found a shortcut through the position in the row instead of induction heads). Biases
    on, so a head can attend by position alone; untied, since tied embeddings made the direct path
    predict the current token again and stalled training.
    """
    kw: dict[str, Any] = dict(d_model=64, n_layers=2, n_heads=4, ffn="none", norm="layernorm", position="alibi",
                              max_seq_len=2 * max(TRAIN_LENGTHS + [HELD_OUT_N]), bias=True)
    return DecoderConfig(stack=StackConfig(**{**kw, **stack}), vocab_size=vocab, tie_embeddings=False)


class RepeatedSequences:
    """Rows of n random tokens followed by the same n again, n drawn per batch, so no fixed offset
    finds the earlier copy: predicting the second copy takes looking up what followed the current
    token's earlier occurrence (a previous-token head in layer 0, an induction head in layer 1). The
    loss is summed next-token cross-entropy over every position; the first copy is unpredictable."""

    name = "repeated"
    parts = ("loss",)
    weights: dict[str, float] = {}

    def __init__(self, vocab: int, lengths: list[int], batch_size: int) -> None:
        self.vocab, self.lengths, self.batch_size = vocab, lengths, batch_size

    def counts(self, tensors: dict[str, Tensor]) -> dict[str, int]:
        return {"loss": tensors["y"].numel()}

    def batch(self, rng: BatchRng) -> Batch:
        n = self.lengths[int(torch.randint(len(self.lengths), (), generator=rng.gen))]
        r = torch.randint(self.vocab, (self.batch_size, n), generator=rng.gen)
        seq = torch.cat([r, r, r[:, :1]], dim=1)  # (B, 2n + 1): one more token as the last target
        tensors = {"x": seq[:, :-1], "y": seq[:, 1:]}
        return Batch(tensors, self.counts(tensors))

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return {"loss": model(batch["x"], targets=batch["y"])}

    def eval_batches(self, final: bool) -> list[Batch]:
        return []

    def summarize(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        return mean_parts(self, sums, counts)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


TRAIN = dict(batch_size=32, lr=3e-3, warmup_steps=50, max_steps=1000, weight_decay=0.1)


def train(model: DecoderLM, *, seed: int = SEED, **changes: Any) -> FitResult:
    """``model`` trained in place through the one loop, on CPU in float32."""
    settings = {**TRAIN, **changes}
    args = TrainArgs(**settings, seed=seed, device="cpu", precision="float32", progress=False,
                     eval_interval=10_000, checkpoint_interval=10_000)
    return fit(model, RepeatedSequences(VOCAB, TRAIN_LENGTHS, settings["batch_size"]), args, log=lambda _: None)


def halves_loss(model: nn.Module, tokens: Tensor, n: int, hooks: list | None = None) -> tuple[float, float]:
    """Mean next-token loss (nats) on repeated sequences (B, 2n): over the first copy's tokens, and
    over the second copy's from its second token on (its first follows nothing seen before)."""
    with torch.no_grad():
        logits = run_with_hooks(model.eval(), tokens[:, :-1], hooks=hooks or [])
    nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, 2n - 1)
    return float(nll[:, : n - 1].mean()), float(nll[:, n:].mean())


@pytest.fixture(scope="module")
def models() -> tuple[DecoderLM, DecoderLM]:
    """The trained model and its untrained twin (the same initialisation)."""
    torch.manual_seed(SEED)
    trained = DecoderLM(attention_only())
    untrained = copy.deepcopy(trained)
    train(trained)
    return trained.eval(), untrained.eval()


# ---- the attention-only stack ----------------------------------------------------------------


def test_attention_only_stack_config() -> None:
    s = StackConfig(d_model=64, n_layers=2, n_heads=4, ffn="none")
    assert s.d_ff == 0
    assert StackConfig(d_model=64, n_layers=2, n_heads=4, ffn="none", d_ff=0) == s
    with pytest.raises(ConfigError, match="d_ff"):
        StackConfig(d_model=64, n_layers=2, n_heads=4, ffn="none", d_ff=128)
    cfg = attention_only()
    assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.replace(ffn="gelu").stack.d_ff == 256 and cfg.replace(ffn="gelu").replace(ffn="none") == cfg
    with pytest.raises(ConfigError, match="ffn"):  # the masked-LM head takes the FFN's activation
        get_encoder_preset("bert-base-tiny").replace(ffn="none")


def _seq2seq_attention_only() -> Seq2Seq:
    data = get_seq2seq_preset("t5-tiny").to_dict()
    for stack in ("encoder", "decoder"):
        data[stack].update(ffn="none", d_ff=None)
    return Seq2Seq(Seq2SeqConfig.from_dict(data))


@pytest.mark.parametrize("build", [
    lambda: DecoderLM(attention_only()),
    lambda: DecoderLM(attention_only(position="rope", norm="rmsnorm", bias=False)),
    lambda: DecoderLM(attention_only(norm_placement="post", position="learned", bias=False)),
    _seq2seq_attention_only,  # self- and cross-attention, no FFN
])
def test_attention_only_anatomy_accounts_for_every_parameter(build: Callable[[], nn.Module]) -> None:
    model = build()
    assert not any(".ffn" in name for name, _ in model.named_parameters())
    a = anatomy(model)
    assert a.total == sum(p.numel() for p in model.parameters())
    got = a.by_category()
    assert "FFN" not in got
    for category, count in expected(model).items():
        assert got[category] == count, category
    if isinstance(model, DecoderLM):
        assert count_parameters(model.cfg) == model.num_parameters()


def test_attention_only_hook_points_and_hooked_forward() -> None:
    torch.manual_seed(1)
    model = DecoderLM(attention_only()).eval()
    x = repeated_tokens(VOCAB, 6, batch=2, seed=1)
    names = hook_names(model, x)
    assert not [n for n in names if ".mlp." in n or ".ln2." in n or n.endswith(("hook_mlp_out", "hook_resid_mid"))]
    for i in range(2):
        for n in ("hook_resid_pre", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_post"):
            assert f"blocks.{i}.{n}" in names
    with torch.no_grad():
        plain = model(x)
    out, cache = run_with_cache(model, x)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    resid = cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"]  # the block is attention alone
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], resid, atol=1e-6, rtol=0)


def test_attention_only_checkpoint_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = DecoderLM(attention_only(vocab=BYTE_VOCAB)).eval()
    save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    x = torch.randint(0, BYTE_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---- induction heads -------------------------------------------------------------------------


def test_untrained_model_has_no_induction_head(models) -> None:
    _, untrained = models
    report = classify_heads(untrained, vocab=VOCAB, n=HELD_OUT_N, seed=123)
    assert report.heads("induction") == []
    # about uniform attention: a query in the second copy sees 21 to 39 keys
    assert float(report.scores["induction"].max()) < 0.08


def test_training_grows_induction_heads_in_layer_1(models) -> None:
    trained, _ = models
    report = classify_heads(trained, vocab=VOCAB, n=HELD_OUT_N, seed=123)  # a length not trained on
    heads = report.heads("induction")
    assert heads and all(layer == 1 for layer, _ in heads), report.table()
    scores = report.scores["induction"]
    assert float(scores[1].max()) > 0.5 and float(scores[0].max()) < 0.1, report.table()


def test_copying_is_learned_and_needs_the_induction_heads(models) -> None:
    trained, untrained = models
    tokens = repeated_tokens(VOCAB, HELD_OUT_N, batch=64, seed=321)
    first, second = halves_loss(trained, tokens, HELD_OUT_N)
    assert abs(first - LN_V) < 0.6  # random tokens stay unpredictable
    assert second < 0.25 * LN_V  # the repeat is predicted from the context
    before = halves_loss(untrained, tokens, HELD_OUT_N)
    assert all(abs(v - LN_V) < 0.1 for v in before)
    heads = classify_heads(trained, vocab=VOCAB, n=HELD_OUT_N, seed=123).heads("induction")
    ablated = [(f"blocks.{layer}.attn.hook_z", zero_ablate_head(h)) for layer, h in heads]
    _, broken = halves_loss(trained, tokens, HELD_OUT_N, hooks=ablated)
    assert broken > 0.75 * LN_V  # without them the copy is almost as unpredictable as the original
    # the other half of the circuit: layer 0's most previous-token-like head (ALiBi's steepest) is
    # what the induction heads' keys read; without it copying fails too
    prev = int(classify_heads(trained, vocab=VOCAB, n=HELD_OUT_N, seed=123).scores["previous-token"][0].argmax())
    _, no_prev = halves_loss(trained, tokens, HELD_OUT_N, hooks=[("blocks.0.attn.hook_z", zero_ablate_head(prev))])
    assert no_prev > 0.75 * LN_V
