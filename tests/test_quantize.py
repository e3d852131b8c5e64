"""Weight-only low precision: outputs stay close to float32 and greedy decoding still works."""

from __future__ import annotations

import pytest
import torch

from triform.config import get_preset
from triform.inference.generate import generate
from triform.inference.quantize import BF16Linear, DecodeLinear, Int8Linear, Int8WeightOnlyLinear, quantize_weights
from triform.inference.sampling import SamplingParams
from triform.models.decoder import DecoderLM
from triform.tokenizers import ByteTokenizer


@pytest.mark.parametrize(
    "mode, cls, tol",
    [("int8", Int8Linear, 0.05), ("int8-weight-only", Int8WeightOnlyLinear, 0.05), ("bf16", BF16Linear, 0.05)],
)
def test_quantized_model_stays_close(mode: str, cls: type, tol: float) -> None:
    torch.manual_seed(0)
    model = DecoderLM(get_preset("llama3-8b-tiny")).eval()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        quantize_weights(model, mode)
        assert all(not isinstance(m, torch.nn.Linear) for m in model.modules())
        assert any(isinstance(m, cls) for m in model.modules())
        out = model(x)
        one = model(x[:1, :1])  # the single-row path (bf16 matmul) as well as the many-row path
    rel = (out - ref).abs().max() / ref.abs().max()
    assert 0 < rel < tol
    assert (one[0, 0] - ref[0, 0]).abs().max() / ref.abs().max() < tol
    result = generate(model, ByteTokenizer(), ["abc"], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
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
