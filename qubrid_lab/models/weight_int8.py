"""``w8a16``: int8 weights with bf16 activations for the CPU, through torch's own weight-only int8 kernel.

Decoding a few rows is bound by reading the weights: torch's ``_weight_int8pack_mm`` (the kernel behind
torchao's int8 weight-only path) reads a quarter of fp32's bytes and half of bf16's, and converts them to
floats in registers. Its cost grows with the rows multiplied, though, while a bf16 matmul (oneDNN, AMX where
present) hardly notices 16 rows more than one; so each layer keeps both forms and picks by the number of rows:
int8 up to :attr:`Int8WeightLinear.small_rows`, bf16 beyond (prompts, large batches), with the bf16 weight kept
in oneDNN's blocked layout where torch has oneDNN (:mod:`qubrid_lab.models.packed_linear`). Where the int8 kernel
wins is measured on this machine for each layer shape when the model is quantized (:func:`crossover`), not
assumed: on a CPU where it never wins, the layer is plain bf16.

Only the weights are rounded to int8 (one scale per output channel); activations stay bf16, so unlike dynamic
int8 (``--dtype int8``) no activation scale is shared between the tokens of a batch.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from qubrid_lab.models.device import untie_output_head
from qubrid_lab.models.packed_linear import pack_weight, packed_linear

CALIBRATION_ROWS = (1, 2, 4, 8, 16)
CALIBRATION_REPEATS = 5


class Int8WeightLinear(nn.Module):
    """A linear layer holding its weight as int8 (per output channel) and as bf16."""

    def __init__(self, linear: nn.Linear, small_rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight_int8 = nn.Parameter(
            (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8), requires_grad=False
        )
        self.scales = nn.Parameter(scales.to(torch.bfloat16), requires_grad=False)
        weight = linear.weight.detach().to(torch.bfloat16)
        packed = pack_weight(weight)
        # the bf16 form: packed for oneDNN where it can be, else plain for F.linear (never both: memory)
        self.packed = nn.Parameter(packed, requires_grad=False) if packed is not None else None
        self.weight = nn.Parameter(weight, requires_grad=False) if packed is None else None
        self.bias = (
            nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
            if linear.bias is not None
            else None
        )
        self.small_rows = small_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.small_rows:
            return self.bf16(x)
        out = torch.ops.aten._weight_int8pack_mm(
            x.reshape(rows, self.in_features).contiguous(), self.weight_int8, self.scales
        )
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def bf16(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's product through its bf16 weight."""
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 up to {self.small_rows} rows"


def _median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(CALIBRATION_REPEATS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def crossover(layers: list[Int8WeightLinear]) -> int:
    """The most rows for which the int8 kernel beats the bf16 matmul on these layers' shape here (0: never).

    Each timing runs the product through every layer given (all of a model's layers of one shape), one after
    the other, as a forward pass does: timed on one layer alone, its weights stay in the CPU's caches and the
    bf16 product looks faster than it is in a model whose weights stream from memory (on the Xeon measured,
    one layer alone put the crossover at 2 rows for shapes where the model's decode step is faster with int8 up
    to 4).
    """
    best = 0
    with torch.inference_mode():
        for rows in CALIBRATION_ROWS:
            x = torch.randn(rows, layers[0].in_features, dtype=torch.bfloat16)

            def int8() -> None:
                for layer in layers:
                    torch.ops.aten._weight_int8pack_mm(x, layer.weight_int8, layer.scales)

            def bf16() -> None:
                for layer in layers:
                    layer.bf16(x)

            if _median_ms(int8) >= _median_ms(bf16):
                break
            best = rows
    return best


def quantize_weights_int8(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of a bf16 model (the output head included) for an :class:`Int8WeightLinear`,
    each shape's row threshold measured once, over all the layers of that shape."""
    untie_output_head(model)
    by_shape: dict[tuple[int, int], list[Int8WeightLinear]] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            layer = Int8WeightLinear(child, 0)
            by_shape.setdefault((child.in_features, child.out_features), []).append(layer)
            setattr(parent, name, layer)
    thresholds = {shape: crossover(layers) for shape, layers in by_shape.items()}
    for shape, layers in by_shape.items():
        for layer in layers:
            layer.small_rows = thresholds[shape]
    model.weight_int8_rows = thresholds  # what was measured, for the load log and the benchmarks
    return model
