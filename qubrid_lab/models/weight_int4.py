"""``w4a16`` and ``w4a32``: int4 weights in groups of 32 for the CPU, through torch's weight-only int4 kernel
(``_weight_int4pack_mm_for_cpu``, the kernel behind torchao's int4 weight-only path; it takes bf16 activations).

Each group of 32 consecutive input weights of an output row gets its own scale and offset (the group's range
split into 15 steps), the layout of GGUF's ``Q4_1``. A model converted from a ``Q4_1`` file (the bundled
SmolLM2) holds weights that are exactly such steps, so rounding them again recovers the file's own 4-bit values
and only the bf16 rounding of each group's scale and offset is lost. Other models get plain round-to-nearest
int4, which ``--dtype auto`` serves only where it passes the accuracy bar.

The output head stays int8 (``Q4_1`` files keep it in 8 bits too): its rows are the token embeddings, whose
every logit is read. As with ``w8a16``, each layer keeps a float form for products over many rows
(:mod:`qubrid_lab.models.weight_only`). The model is quantized from its float32 weights, then the rest of it is
cast to the dtype it runs in: bf16 for ``w4a16``, float32 for ``w4a32``.
"""

from __future__ import annotations

import torch
from torch import nn

from qubrid_lab.models.weight_int8 import Int8WeightLinear
from qubrid_lab.models.weight_only import WeightOnlyLinear, quantize_weights

GROUP = 32
LEVELS = 15  # int4: 16 values, 15 steps between them


def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] as int4 values [out, in] (int32, 0..15) and, per group of :data:`GROUP` inputs,
    ``[in / GROUP, out, 2]`` scales and offsets in torch's kernel convention ``w = (q - 8) * scale + offset``."""
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // GROUP, GROUP)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = (high - low) / LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every value is `low`
    values = ((groups - low) / scale).round().clamp(0, LEVELS).to(torch.int32).reshape(rows, columns)
    offsets = low + 8 * scale
    return values, torch.cat((scale, offsets), dim=-1).transpose(0, 1).contiguous()


def can_quantize(linear: nn.Linear) -> bool:
    """Whether the int4 kernel takes this layer's shape (whole groups; columns in the kernel's blocks)."""
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0


class Int4WeightLinear(WeightOnlyLinear):
    """A linear layer holding its weight as int4 in groups of 32 (see the module's docstring) and in floats."""

    kind = "int4"

    def __init__(self, linear: nn.Linear, small_rows: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__(linear, dtype, small_rows)
        values, scales_offsets = int4_groups(linear.weight.detach())
        self.weight_int4 = nn.Parameter(
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2), requires_grad=False
        )
        self.scales_offsets = nn.Parameter(scales_offsets.to(torch.bfloat16), requires_grad=False)

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight_int4, GROUP, self.scales_offsets)


def quantize_weights_int4(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap the ``nn.Linear`` layers of a float32 model for :class:`Int4WeightLinear` ones (the output head, and a
    layer whose shape the kernel does not take, for :class:`Int8WeightLinear`), then cast the other parameters to
    ``dtype``."""

    def make(linear: nn.Linear, is_head: bool) -> WeightOnlyLinear:
        if is_head or not can_quantize(linear):
            return Int8WeightLinear(linear, 0, dtype)
        return Int4WeightLinear(linear, 0, dtype)

    quantize_weights(model, make)
    for module in model.modules():  # the rest (embeddings, norms) to ``dtype``; the quantized layers are set
        if not isinstance(module, WeightOnlyLinear):
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(dtype)
    return model
