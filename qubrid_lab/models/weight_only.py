"""Weight-only quantized linear layers for the CPU: a compact integer weight for products over a few rows, a
float weight for products over many, and the row count where one overtakes the other measured on this machine.

Decoding a few rows is bound by reading the weights, and torch's weight-only kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``: the kernels behind torchao's weight-only paths) read a quarter or an eighth of
fp32's bytes and convert them to floats in registers. Their cost grows with the rows multiplied, though, while
a float matmul (oneDNN, AMX where present) hardly notices 16 rows more than one; so each layer keeps both forms
and picks by the number of rows. Where the integer kernel wins is measured per layer shape when the model is
quantized (:func:`crossover`), not assumed: on a CPU where it never wins, a layer runs in floats only, and on
one without bf16 units (where a bf16 matmul is slow at any size) it may win at every size measured.

The integer kernels take bf16 activations; the float form is in the model's dtype, kept in oneDNN's blocked
layout (:mod:`qubrid_lab.models.packed_linear`) for the layer shapes where that is measured faster than
``F.linear`` on the plain weight.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qubrid_lab.models.calibration import compare_ms
from qubrid_lab.models.packed_linear import pack_weight, packed_linear, packing_pays

# Row counts timed, in order, until the float product wins. An integer kernel that still wins at 64 rows (a
# CPU without bf16 units, against bf16: there it won up to 512) is used for every row count.
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)
EVERY_ROW_COUNT = 1 << 30


class WeightOnlyLinear(nn.Module):
    """A linear layer with an integer weight (:meth:`narrow`, bf16 activations, up to :attr:`small_rows` rows)
    and a float one (:meth:`wide`, in ``dtype``). Subclasses set the integer weight and :meth:`narrow`."""

    kind = ""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, small_rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = dtype  # of the float weight and of the activations the layer takes
        # the float form: plain for F.linear, or packed for oneDNN where quantize_weights measures that faster
        # (never both: memory); a weight already in ``dtype`` is kept as the same parameter, so a head tied to
        # the embeddings stays tied
        self.packed: nn.Parameter | None = None
        self.weight = (
            linear.weight
            if linear.weight.dtype == dtype
            else nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        )
        self.bias = (
            nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False) if linear.bias is not None else None
        )
        self.small_rows = small_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.small_rows:
            return self.wide(x)
        out = self.narrow(x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ([rows, in], bf16, contiguous) times the integer weight: [rows, out], bf16, no bias."""
        raise NotImplementedError

    def wide(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's product through its float weight."""
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        rows = "every row count" if self.small_rows >= EVERY_ROW_COUNT else f"up to {self.small_rows} rows"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} {rows}"


def pack_if_faster(layers: list[WeightOnlyLinear]) -> bool:
    """Keep these layers' float forms (one shape: all of a model's layers of that shape and kind) packed for
    oneDNN if that is measured faster here (:func:`~qubrid_lab.models.packed_linear.packing_pays`)."""
    if not packing_pays([layer.weight for layer in layers]):
        return False
    for layer in layers:  # one at a time, each plain weight let go as its packed form arrives
        layer.packed, layer.weight = nn.Parameter(pack_weight(layer.weight), requires_grad=False), None
    return True


def crossover(layers: list[WeightOnlyLinear]) -> int:
    """The most rows for which the integer product beats the float one on these layers' shape here (0: never;
    :data:`EVERY_ROW_COUNT` if it wins at every row count timed).

    Each timing runs the product through every layer given (all of a model's layers of one shape and kind),
    one after the other, as a forward pass does: timed on one layer alone, its weights stay in the CPU's caches
    and the float product looks faster than it is in a model whose weights stream from memory (on the Xeon
    measured, one layer alone put the int8 crossover at 2 rows for shapes where the model's decode step is
    faster with int8 up to 4).
    """
    best = 0
    with torch.inference_mode():
        for rows in CALIBRATION_ROWS:
            x = torch.randn(rows, layers[0].in_features, dtype=layers[0].dtype)

            def integer() -> None:
                for layer in layers:
                    layer.narrow(x.to(torch.bfloat16))

            def float_() -> None:
                for layer in layers:
                    layer.wide(x)

            integer_ms, float_ms = compare_ms(integer, float_)
            if integer_ms >= float_ms:
                return best
            best = rows
    return EVERY_ROW_COUNT


def quantize_weights(model: nn.Module, make: Callable[[nn.Linear, bool], WeightOnlyLinear]) -> nn.Module:
    """Swap each CPU ``nn.Linear`` of ``model`` (the output head included) for what ``make(linear, is_head)``
    returns. For each kind and shape, whether the float weights are packed (:func:`pack_if_faster`), then the
    row threshold, are measured once. A layer whose integer product wins at every row count drops its float
    weight (memory). A head tied to the embeddings keeps them as its plain float weight: a packed copy of
    SmolLM2's would add 113 MB in float32."""
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings().weight
    groups: dict[tuple, list[WeightOnlyLinear]] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            layer = make(child, child is head)
            groups.setdefault((layer.kind, child.in_features, child.out_features), []).append(layer)
            setattr(parent, name, layer)
    packed = {
        key: not any(layer.weight is embeddings for layer in layers) and pack_if_faster(layers)
        for key, layers in groups.items()
    }
    thresholds = {key: crossover(layers) for key, layers in groups.items()}
    for key, layers in groups.items():
        for layer in layers:
            layer.small_rows = thresholds[key]
            if layer.small_rows >= EVERY_ROW_COUNT:
                layer.packed = layer.weight = None
    model.weight_only_rows = thresholds  # what was measured, for the benchmarks
    model.weight_only_packed = packed
    return model
