"""bf16 linear layers on the CPU with their weights kept in oneDNN's own blocked layout.

``F.linear`` on a plain bf16 weight hands oneDNN a row-major matrix on every call, and oneDNN copies it into
the blocked layout its AMX/AVX512 kernels read before multiplying: for a decode step's few rows that copy costs
as much as the product. torch's inductor avoids it for compiled models by packing each weight once
(``mkldnn._reorder_linear_weight``, run by its weight-pack pass) and calling ``mkldnn._linear_pointwise``; this
module does the same for the eager forward. On SmolLM2-135M (benchmarks/README.md, session g), a decode step
over bf16 products took 6% less time at batch 16 and 16% less at batch 64 than through ``F.linear``.

Packing needs a torch build with oneDNN (every x86 CPU wheel has it); where it is missing, or the weight is not
bf16, :func:`pack_weight` returns None and layers stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from qubrid_lab.models.device import untie_output_head

# The row count oneDNN picks the blocked layout for; the layout serves every row count (a mismatch costs a
# little speed, never a wrong result). 16: a busy batch's decode step, a short prompt's prefill.
LAYOUT_ROWS = 16


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` ([out, in], bf16, CPU) in oneDNN's blocked layout, or None where it cannot be packed."""
    if not can_pack(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), LAYOUT_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the weight ``packed`` came from."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


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
    a model whose weights cannot be packed here is returned unchanged."""
    head = model.get_output_embeddings()
    if head is not None and can_pack(head.weight):
        untie_output_head(model)  # the head gets its own packed copy
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and (packed := pack_weight(child.weight)) is not None:
                setattr(parent, name, PackedLinear(child, packed))
    return model
