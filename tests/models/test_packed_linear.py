"""bf16 linear layers with oneDNN-packed weights: the same products as ``F.linear``, in every use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qubrid_lab.models.device import Precision, quantize
from qubrid_lab.models.packed_linear import PackedLinear, can_pack, pack_linears, pack_weight
from qubrid_lab.models.weight_int8 import Int8WeightLinear

needs_onednn_bf16 = pytest.mark.skipif(
    not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="this CPU or torch build has no oneDNN bf16"
)


def bf16_linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 96, bias=bias).to(torch.bfloat16)


@needs_onednn_bf16
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (3, 1, 64), (1, 7, 64), (2, 3, 5, 64)])
def test_packed_products_equal_the_plain_ones(shape, bias):
    plain = bf16_linear(bias)
    packed = PackedLinear(plain, pack_weight(plain.weight))
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = packed(x)
        assert out.shape == (*shape[:-1], 96) and out.dtype == torch.bfloat16
        assert torch.equal(out, F.linear(x, plain.weight, plain.bias))


def test_weights_that_cannot_be_packed_are_left_alone():
    assert pack_weight(torch.randn(8, 8)) is None  # float32: MKL's product serves it already


@needs_onednn_bf16
def test_a_bf16_model_serves_from_packed_layers_and_its_logits_do_not_change(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        embeddings = model.get_input_embeddings().weight.detach().clone()
        quantize(model, Precision(torch.bfloat16))
        assert not any(type(m) is nn.Linear for m in model.modules())
        assert isinstance(model.lm_head, PackedLinear)
        assert torch.equal(model.get_input_embeddings().weight, embeddings)  # untied, not changed
        assert torch.equal(model(input_ids=ids).logits, expected)


@needs_onednn_bf16
def test_w8a16_layers_run_their_many_row_products_packed():
    plain = nn.Linear(64, 96)
    quantized = Int8WeightLinear(plain, small_rows=2)
    assert quantized.packed is not None and quantized.weight is None  # one bf16 copy, not two
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = F.linear(x, plain.weight.detach().bfloat16(), plain.bias.detach().bfloat16())
        assert torch.equal(quantized(x), expected)


def test_pack_linears_leaves_a_float32_model_unchanged(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pack_linears(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
