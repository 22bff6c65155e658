"""w4a16 / w4a32 linear layers: int4 weights in groups of 32 (GGUF Q4_1's layout) for a few rows, floats for many."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qubrid_lab.models.weight_int4 import GROUP, Int4WeightLinear, can_quantize, int4_groups, quantize_weights_int4
from qubrid_lab.models.weight_int8 import Int8WeightLinear


def q4_1_weight(rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as a GGUF Q4_1 file dequantizes to (per group: fp16 step and minimum, values 0..15 with both
    ends used, as llama.cpp's quantizer leaves them), and its 4-bit values."""
    torch.manual_seed(0)
    groups = columns // GROUP
    values = torch.randint(0, 16, (rows, groups, GROUP))
    values[..., 0], values[..., 1] = 0, 15
    step = (torch.rand(rows, groups, 1) * 0.01 + 0.001).half().float()
    low = (-torch.rand(rows, groups, 1) * 0.05).half().float()
    return (values * step + low).reshape(rows, columns), values.reshape(rows, columns)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """What the int4 kernel multiplies by: the recovered values times bf16 scales plus bf16 offsets."""
    values, scales_offsets = int4_groups(weight)
    scales_offsets = scales_offsets.bfloat16().float().repeat_interleave(GROUP, dim=0)  # [in, out, 2]
    return (values - 8) * scales_offsets[..., 0].T + scales_offsets[..., 1].T


def test_a_q4_1_checkpoints_four_bit_values_are_recovered_exactly():
    weight, values = q4_1_weight(96, 128)
    recovered, scales_offsets = int4_groups(weight)
    assert torch.equal(recovered, values.to(torch.int32))
    assert scales_offsets.shape == (128 // GROUP, 96, 2)
    # only the bf16 rounding of each group's scale and offset is lost: no worse than rounding the weight to bf16
    assert (dequantized(weight) - weight).abs().max() <= 2 * (weight.bfloat16().float() - weight).abs().max()


def test_few_rows_use_the_int4_weights_and_many_the_float_ones():
    plain = nn.Linear(128, 96)
    plain.weight.data = q4_1_weight(96, 128)[0]
    quantized = Int4WeightLinear(plain, small_rows=4)
    bias = plain.bias.detach().bfloat16().float()
    with torch.inference_mode():
        for rows in (1, 4, 5, 32):
            x = torch.randn(1, rows, 128, dtype=torch.bfloat16)
            out = quantized(x)
            assert out.shape == (1, rows, 96) and out.dtype == torch.bfloat16
            weight = dequantized(plain.weight.detach()) if rows <= 4 else plain.weight.detach().bfloat16().float()
            expected = x.float() @ weight.T + bias
            assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.02), (rows, (out - expected).abs().max())


def test_a_float32_layer_takes_and_returns_float32():
    plain = nn.Linear(64, 32, bias=False)
    quantized = Int4WeightLinear(plain, small_rows=8, dtype=torch.float32)
    assert quantized.scales_offsets.dtype == torch.bfloat16  # the kernel's own
    with torch.inference_mode():
        for rows, weight in ((2, dequantized(plain.weight.detach())), (16, plain.weight.detach())):  # int4, float32
            x = torch.randn(rows, 64)
            out = quantized(x)
            assert out.dtype == torch.float32
            assert torch.allclose(out, x @ weight.T, atol=0.05, rtol=0.02)
        assert torch.allclose(quantized(x), x @ plain.weight.detach().T, atol=1e-5)  # float32 throughout


def test_shapes_the_kernel_does_not_take():
    assert can_quantize(nn.Linear(64, 96))
    assert not can_quantize(nn.Linear(48, 96))  # not whole groups of 32 inputs
    assert not can_quantize(nn.Linear(64, 40))  # outputs not in blocks of 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_model_gets_int4_layers_an_int8_head_and_the_rest_in_its_dtype(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    embeddings = model.get_input_embeddings().weight.detach().clone()
    quantize_weights_int4(model, dtype)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, Int8WeightLinear)
    layers = [m for m in model.modules() if isinstance(m, Int4WeightLinear)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert model.get_input_embeddings().weight.dtype == dtype
    assert torch.equal(model.get_input_embeddings().weight.float(), embeddings.to(dtype).float())
    assert all(layer.scales_offsets.dtype == torch.bfloat16 for layer in layers)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    # random weights, rounded to 16 levels per group of 32: close, not equal
    assert torch.nn.functional.cosine_similarity(logits.flatten(), expected.flatten(), dim=0) > 0.99
