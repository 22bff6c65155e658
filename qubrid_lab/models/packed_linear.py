"""Linear layers on the CPU with their weights kept in oneDNN's own blocked layout (bf16, and float32 for the
float form of weight-only quantized layers: :mod:`qubrid_lab.models.weight_only`).

``F.linear`` on a plain bf16 weight hands oneDNN a row-major matrix on every call, and oneDNN copies it into
the blocked layout its AMX/AVX512 kernels read before multiplying: for a decode step's few rows that copy costs
as much as the product. torch's inductor avoids it for compiled models by packing each weight once
(``mkldnn._reorder_linear_weight``, run by its weight-pack pass) and calling ``mkldnn._linear_pointwise``; this
module does the same for the eager forward. On SmolLM2-135M (benchmarks/README.md, session g), a decode step
over bf16 products took 6% less time at batch 16 and 16% less at batch 64 than through ``F.linear``.

The same holds for float32 weights, which ``F.linear`` hands to MKL: on the AMD EPYC of benchmarks/README.md
(session j), oneDNN's product over packed float32 weights took half the time at 1 row and 40% less at 16 for
SmolLM2's gate/up shape, and a third of it for the 49152-row output head at 4-16 rows, while at 128 rows the two
were even, and for the down projection MKL was faster there. So whether a shape's float32 weights are packed is
measured when a model is quantized (:func:`packing_pays`), never assumed.

Packing needs a torch build with oneDNN (every x86 CPU wheel has it); where it is missing, or the weight is
neither bf16 (on a CPU oneDNN runs bf16 on) nor float32, :func:`pack_weight` returns None and layers stay as
they are.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from qubrid_lab.models.calibration import compare_ms
from qubrid_lab.models.device import untie_output_head

# The row count oneDNN picks the blocked layout for; the layout serves every row count (a mismatch costs a
# little speed, never a wrong result). 16: a busy batch's decode step, a short prompt's prefill.
LAYOUT_ROWS = 16
# Row counts :func:`packing_pays` times: one decode step alone, a busy batch's, a prompt's prefill.
PACKING_ROWS = (1, 16, 128)
# What :func:`packing_pays` times of a layer shape: more than the last-level cache of the CPUs measured (an AMD
# EPYC's 32 MB per core complex), so that the weights stream from memory as in a forward pass.
TIMED_BYTES = 64 << 20
# oneDNN and ideep (torch's layer over it) each keep the kernels they compiled, up to 1024 by default: one per
# layer shape and row count, about 0.6 MB each on the AMD EPYC of benchmarks/README.md (session k), whatever the
# shape. A server's prefills come at every prompt length, so a busy one filled both: prefills of random lengths
# over 8 packed layers of SmolLM2's 4 shapes grew a process by 600 MB in 300 and 1126 MB in 1200. Capped at 128,
# by at most 288 MB in 600, at the same speed within the noise: compiling a kernel again takes about 0.5 ms, less
# than one product at the row counts of a prefill.
KERNEL_CACHE_CAPACITY = 128
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches() -> None:
    """Cap oneDNN's and ideep's kernel caches at :data:`KERNEL_CACHE_CAPACITY` where the environment does not
    size them. Both read their size once, at the process's first oneDNN product, so this counts only before
    it; the server calls it first thing."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(KERNEL_CACHE_CAPACITY))


def can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` ([out, in], bf16 or float32, CPU) in oneDNN's blocked layout, or None where it cannot be
    packed."""
    if not can_pack(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), LAYOUT_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the weight ``packed`` came from."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packing_pays(weights: list[torch.Tensor]) -> bool:
    """Whether oneDNN's products over ``weights`` packed (one layer shape: every layer of a model that has it,
    run in turn as a forward pass does) take less time here than ``F.linear``'s, summed over
    :data:`PACKING_ROWS` (False where they cannot be packed). Timed on the first layers up to
    :data:`TIMED_BYTES`, so that loading holds at most that much twice."""
    timed, size = [], 0
    for weight in weights:
        if size >= TIMED_BYTES:
            break
        timed.append(weight)
        size += weight.numel() * weight.element_size()
    packed = [pack_weight(weight) for weight in timed]
    if not timed or any(p is None for p in packed):
        return False
    plain_ms = packed_ms = 0.0
    with torch.inference_mode():
        for rows in PACKING_ROWS:
            x = torch.randn(rows, timed[0].shape[1], dtype=timed[0].dtype)
            plain, faster = compare_ms(
                lambda: [F.linear(x, weight) for weight in timed],
                lambda: [packed_linear(x, p, None) for p in packed],
            )
            plain_ms, packed_ms = plain_ms + plain, packed_ms + faster
    return packed_ms < plain_ms


class PackedLinear(nn.Module):
    """A bf16 ``nn.Linear`` whose weight lives packed (see the module's docstring). Inference only."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.bias = (
            nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
            if linear.bias is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed bf16"


def pack_linears(model: nn.Module) -> nn.Module:
    """Swap each bf16 CPU ``nn.Linear`` of ``model`` (the output head included) for a :class:`PackedLinear`;
    a model whose weights cannot be packed here (a float32 one among them: that is the reference every other
    precision is measured against) is returned unchanged."""
    head = model.get_output_embeddings()
    if head is not None and head.weight.dtype == torch.bfloat16 and can_pack(head.weight):
        untie_output_head(model)  # the head gets its own packed copy
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.Linear
                and child.weight.dtype == torch.bfloat16
                and (packed := pack_weight(child.weight)) is not None
            ):
                setattr(parent, name, PackedLinear(child, packed))
    return model
