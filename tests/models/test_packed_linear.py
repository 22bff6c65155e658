"""Linear layers with oneDNN-packed weights: the same products as ``F.linear``, in every use (bf16 exactly; float32
to float32's rounding, the sums taken in another order), packed only where that is measured faster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qubrid_lab.models.device import Precision, quantize
from qubrid_lab.models.packed_linear import (
    KERNEL_CACHE_CAPACITY,
    KERNEL_CACHE_VARIABLES,
    PackedLinear,
    bound_kernel_caches,
    can_pack,
    pack_linears,
    pack_weight,
    packed_linear,
    packing_pays,
)
from qubrid_lab.models.weight_int4 import Int4WeightLinear, quantize_weights_int4
from qubrid_lab.models.weight_int8 import Int8WeightLinear
from qubrid_lab.models.weight_only import EVERY_ROW_COUNT, pack_if_faster

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


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def test_weights_that_cannot_be_packed_are_left_alone():
    assert pack_weight(torch.randn(8, 8, dtype=torch.float16)) is None
    assert pack_weight(torch.randint(-8, 8, (8, 8), dtype=torch.int8)) is None
    assert not packing_pays([torch.randn(8, 8, dtype=torch.float16)])


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (3, 1, 64), (2, 3, 5, 64)])
def test_packed_float32_products_equal_the_plain_ones_to_rounding(shape):
    torch.manual_seed(0)
    plain = nn.Linear(64, 96)
    packed = pack_weight(plain.weight.detach())
    x = torch.randn(*shape)
    with torch.inference_mode():
        out = packed_linear(x, packed, plain.bias.detach())
        assert out.shape == (*shape[:-1], 96) and out.dtype == torch.float32
        torch.testing.assert_close(out, F.linear(x, plain.weight, plain.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packing_is_kept_only_when_measured_faster(monkeypatch):
    """The choice follows the timings: packed where its products took less time, plain where they took more."""
    layers = [Int4WeightLinear(nn.Linear(64, 96, bias=False), small_rows=0, dtype=torch.float32) for _ in range(2)]
    weights = [layer.weight for layer in layers]
    monkeypatch.setattr("qubrid_lab.models.packed_linear.compare_ms", lambda plain, packed: (2.0, 1.0))
    assert packing_pays(weights)
    monkeypatch.setattr("qubrid_lab.models.packed_linear.compare_ms", lambda plain, packed: (1.0, 2.0))
    assert not packing_pays(weights)
    assert not pack_if_faster(layers) and all(layer.packed is None and layer.weight is not None for layer in layers)
    monkeypatch.setattr("qubrid_lab.models.packed_linear.compare_ms", lambda plain, packed: (2.0, 1.0))
    assert pack_if_faster(layers) and all(layer.packed is not None and layer.weight is None for layer in layers)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(layers[0].wide(x), F.linear(x, weights[0]), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_w4a32_model_keeps_a_tied_head_on_the_embeddings_and_packs_what_pays(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr("qubrid_lab.models.packed_linear.compare_ms", lambda plain, packed: (2.0, 1.0))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.lm_head.weight = model.get_input_embeddings().weight  # tied, as SmolLM2's is
    quantize_weights_int4(model, torch.float32)
    assert model.lm_head.packed is None and model.lm_head.weight is model.get_input_embeddings().weight
    for key, packed in model.weight_only_packed.items():
        layers = [
            m for m in model.modules() if isinstance(m, Int4WeightLinear) and key[1:] == (m.in_features, m.out_features)
        ]
        if key[0] == "int4" and model.weight_only_rows[key] < EVERY_ROW_COUNT:
            assert packed and all(layer.packed is not None and layer.weight is None for layer in layers)


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
    quantized.packed, quantized.weight = nn.Parameter(pack_weight(quantized.weight), requires_grad=False), None
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = F.linear(x, plain.weight.detach().bfloat16(), plain.bias.detach().bfloat16())
        assert torch.equal(quantized(x), expected)


def test_pack_linears_leaves_a_float32_model_unchanged(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pack_linears(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


# A child process: products over a packed float32 weight at 300 row counts, then what they added to the resident
# memory (MB), freed pages handed back first. The caches are sized at the first product, hence a process each.
KERNEL_CACHE_PROBE = """
import ctypes, sys
import torch
from qubrid_lab.models.packed_linear import bound_kernel_caches, pack_weight, packed_linear
if sys.argv[1] == "bounded":
    bound_kernel_caches()
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
weight = pack_weight(torch.randn(256, 256))
with torch.inference_mode():
    packed_linear(torch.randn(1, 256), weight, None)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = resident()
    for rows in range(17, 317):
        packed_linear(torch.randn(rows, 256), weight, None)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
print(resident() - before)
"""


@needs_onednn
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc")
def test_bounded_kernel_caches_keep_a_server_from_growing_with_each_prompt_length():
    environment = {name: value for name, value in os.environ.items() if name not in KERNEL_CACHE_VARIABLES}

    def grown(mode: str) -> float:
        run = subprocess.run(
            [sys.executable, "-c", KERNEL_CACHE_PROBE, mode], env=environment, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return float(run.stdout)

    unbounded, bounded = grown("default"), grown("bounded")
    assert unbounded > 30  # a kernel per row count, 300 of them kept (167 MB on an AMD EPYC)
    assert bounded < unbounded / 2


def test_kernel_cache_sizes_set_in_the_environment_win(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "16")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    bound_kernel_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == "16"
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE_CAPACITY)
