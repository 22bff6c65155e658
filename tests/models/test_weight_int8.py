"""w8a16 linear layers: int8 weights through torch's weight-only kernel for a few rows, bf16 for many."""

from __future__ import annotations

import torch
from torch import nn

from qubrid_lab.models.weight_int8 import Int8WeightLinear, quantize_weights_int8
from qubrid_lab.models.weight_only import CALIBRATION_ROWS, EVERY_ROW_COUNT, crossover


def layer(bias: bool = True, small_rows: int = 4) -> tuple[nn.Linear, Int8WeightLinear]:
    torch.manual_seed(0)
    plain = nn.Linear(64, 96, bias=bias)
    return plain, Int8WeightLinear(plain, small_rows)


def dequantized(quantized: Int8WeightLinear) -> torch.Tensor:
    return quantized.weight_int8.float() * quantized.scales.float()[:, None]


def test_few_rows_use_the_int8_weights_and_many_the_bf16_ones():
    plain, quantized = layer()
    weight = plain.weight.detach()
    step = weight.abs().amax(dim=1).max() / 127
    assert (dequantized(quantized) - weight).abs().max() <= step  # half a step of rounding, plus the bf16 scales
    with torch.inference_mode():
        for rows in (1, 4, 5, 32):
            x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
            out = quantized(x)
            assert out.shape == (1, rows, 96) and out.dtype == torch.bfloat16
            if rows <= quantized.small_rows:
                expected = x.float() @ dequantized(quantized).T + plain.bias.detach().bfloat16().float()
            else:
                expected = nn.functional.linear(x, weight.bfloat16(), plain.bias.detach().bfloat16()).float()
            assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.02), (rows, (out - expected).abs().max())
        # the two paths differ (int8 rounding): the threshold decides which one ran
        x = torch.randn(2, 64, dtype=torch.bfloat16)
        quantized.small_rows = 0
        bf16 = quantized(x)
        quantized.small_rows = 2
        assert not torch.equal(quantized(x), bf16)


def test_a_layer_without_bias():
    plain, quantized = layer(bias=False)
    with torch.inference_mode():
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        assert torch.allclose(quantized(x).float(), x.float() @ dequantized(quantized).T, atol=0.05, rtol=0.02)


def test_the_crossover_is_one_of_the_measured_row_counts():
    _, quantized = layer()
    assert crossover([quantized]) in (0, *CALIBRATION_ROWS[:-1], EVERY_ROW_COUNT)


def test_every_linear_of_a_model_is_swapped_and_the_embeddings_stay_as_they_were(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    quantize_weights_int8(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, Int8WeightLinear)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert set(model.weight_only_rows) == {
        ("int8", m.in_features, m.out_features) for m in model.modules() if isinstance(m, Int8WeightLinear)
    }
