"""``w8a16``: int8 weights with bf16 activations for the CPU, through torch's own weight-only int8 kernel.

Each weight is rounded to int8 with one scale per output channel and kept beside its bf16 form, the row count
where the int8 kernel stops winning measured per shape (:mod:`qubrid_lab.models.weight_only`). Only the weights
are rounded; activations stay bf16, so unlike dynamic int8 (``--dtype int8``) no activation scale is shared
between the tokens of a batch.
"""

from __future__ import annotations

import torch
from torch import nn

from qubrid_lab.models.weight_only import WeightOnlyLinear, quantize_weights


class Int8WeightLinear(WeightOnlyLinear):
    """A linear layer holding its weight as int8 (per output channel) and in floats."""

    kind = "int8"

    def __init__(self, linear: nn.Linear, small_rows: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__(linear, dtype, small_rows)
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight_int8 = nn.Parameter(
            (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8), requires_grad=False
        )
        self.scales = nn.Parameter(scales.to(torch.bfloat16), requires_grad=False)

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)


def quantize_weights_int8(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of a bf16 model (the output head included) for an :class:`Int8WeightLinear`,
    each shape's row threshold measured once, over all the layers of that shape."""
    return quantize_weights(model, lambda linear, is_head: Int8WeightLinear(linear, 0))
