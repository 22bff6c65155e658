"""Choosing where a model runs and in which precisions it may be served.

The device: CUDA when present, else the CPU. The precision for ``--dtype auto`` is not chosen by a rule
here: :func:`precision_candidates` lists what the device can run, and
:mod:`qubrid_lab.engine.auto_precision` measures them on the model being loaded (speed and accuracy).
"""

from __future__ import annotations

import ctypes
import gc
import logging
from dataclasses import dataclass

import torch

from qubrid_lab.errors import InvalidRequestError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The dtype a model runs in, and whether linear layers are quantized: ``int8`` (dynamic int8, activations
    too), ``w8a16`` (int8 weights, bf16 activations; :mod:`qubrid_lab.models.weight_int8`), or ``w4a16`` /
    ``w4a32`` (int4 weights in groups of 32, the model in bf16 / float32; :mod:`qubrid_lab.models.weight_int4`)."""

    dtype: torch.dtype
    int8: bool = False
    w8a16: bool = False
    w4: bool = False

    @property
    def label(self) -> str:
        if self.w4:
            return "w4a16" if self.dtype == torch.bfloat16 else "w4a32"
        if self.int8 or self.w8a16:
            return "int8" if self.int8 else "w8a16"
        return str(self.dtype).removeprefix("torch.")

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype to load the checkpoint in: int4 groups are rounded from the float32 weights (bf16 would
        blur the 4-bit steps a GGUF ``Q4_1`` checkpoint holds exactly), then the model is cast to ``dtype``."""
        return torch.float32 if self.w4 else self.dtype

    @classmethod
    def from_label(cls, label: str) -> "Precision":
        if label in CPU_QUANTIZED:
            return CPU_QUANTIZED[label]
        return cls(DTYPES[label])


CPU_QUANTIZED = {
    "int8": Precision(torch.float32, int8=True),
    "w8a16": Precision(torch.bfloat16, w8a16=True),
    "w4a16": Precision(torch.bfloat16, w4=True),
    "w4a32": Precision(torch.float32, w4=True),
}


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise InvalidRequestError(f"device '{setting}' is not a device name; use auto, cpu or cuda[:N].") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device '{setting}' was asked for but this machine has no usable CUDA GPU.")
    return device


def precision_candidates(device: torch.device) -> list[Precision]:
    """What ``--dtype auto`` may serve on ``device``, the default first.

    The default is the most exact of the fast-enough options: fp32 on a CPU, bf16 (fp16 where unsupported)
    on a GPU. The others are taken only when measured faster and accurate enough on the model at hand.
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return [Precision(torch.bfloat16), Precision(torch.float16)]
        return [Precision(torch.float16)]
    return [Precision(torch.float32), Precision(torch.bfloat16), *CPU_QUANTIZED.values()]


def pick_precision(setting: str, device: torch.device) -> Precision:
    """The precision an explicit ``--dtype`` names (``auto`` is measured: see :func:`precision_candidates`)."""
    if setting in CPU_QUANTIZED:
        if device.type != "cpu":
            raise InvalidRequestError(f"dtype '{setting}' (integer linear layers) is for CPUs; on a GPU use auto.")
        return CPU_QUANTIZED[setting]
    if setting not in DTYPES:
        raise InvalidRequestError(
            f"dtype '{setting}' is unknown; use auto, " + ", ".join([*CPU_QUANTIZED, *DTYPES]) + "."
        )
    return Precision(DTYPES[setting])


def quantize(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """The model with its linear layers quantized as ``precision`` says; for plain bf16 on the CPU, with their
    weights packed for oneDNN (:mod:`qubrid_lab.models.packed_linear`); else unchanged."""
    if precision.int8:
        return quantize_linear_int8(model)
    if precision.w8a16:
        from qubrid_lab.models.weight_int8 import quantize_weights_int8

        return quantize_weights_int8(model)
    if precision.w4:
        from qubrid_lab.models.weight_int4 import quantize_weights_int4

        return quantize_weights_int4(model, precision.dtype)
    if precision.dtype == torch.bfloat16:
        from qubrid_lab.models.packed_linear import pack_linears

        return pack_linears(model)
    return model


def untie_output_head(model: torch.nn.Module) -> None:
    """Give the output head its own weight where it shares the input embeddings', so that the head can be
    quantized or packed while the embeddings stay as they are."""
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())


def quantize_linear_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``nn.Linear`` (the output head included) for a dynamic int8 one, for CPU inference.

    Weights are quantized per output channel; activations per tensor at run time (fbgemm's kernels).
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    untie_output_head(model)
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; 2.13 still ships their kernels
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def release_freed_memory(model: torch.nn.Module) -> None:
    """Hand memory freed while loading (fp32 weights replaced by int8 ones) back to the OS.

    Parameters loaded from safetensors are views of the memory-mapped checkpoint; while any one of them (a
    norm weight, the embeddings) lives, the whole mapping stays resident. Copying the remaining CPU tensors
    lets it go. glibc also keeps freed heap pages, hence ``malloc_trim``.
    """
    gc.collect()  # modules swapped out by quantization sit in reference cycles
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    trim_heap()


def trim_heap() -> None:
    """Hand the heap pages glibc keeps after frees back to the OS (``malloc_trim``; nothing where libc is not
    glibc). Activations of every prompt length leave freed holes that glibc keeps: 150 prefills of 17-613
    tokens grew a process serving SmolLM2 by 627 MB, of which 42 stayed after a trim (benchmarks/README.md,
    session k)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
