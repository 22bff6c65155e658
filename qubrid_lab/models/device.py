"""Choosing where a model runs and in which precision.

``auto`` means: CUDA when present, in bf16 where the GPU supports it (fp16 otherwise); on a CPU, bf16 when
the CPU computes it natively (AMX or AVX512-BF16), else fp32 activations with dynamic int8 linear layers,
which on a CPU without bf16 units is the fastest exact-enough option (see ``benchmarks/README.md``).
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
    """The dtype weights are loaded in, and whether linear layers are then quantized to int8."""

    dtype: torch.dtype
    int8: bool = False

    @property
    def label(self) -> str:
        return "int8" if self.int8 else str(self.dtype).removeprefix("torch.")


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


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix units, where bf16 beats fp32; elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def pick_precision(setting: str, device: torch.device) -> Precision:
    if setting == "auto":
        if device.type == "cuda":
            return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return Precision(torch.bfloat16) if cpu_has_native_bf16() else Precision(torch.float32, int8=True)
    if setting == "int8":
        if device.type != "cpu":
            raise InvalidRequestError("dtype 'int8' (dynamic int8 linear layers) is for CPUs; on a GPU use auto.")
        return Precision(torch.float32, int8=True)
    if setting not in DTYPES:
        raise InvalidRequestError(f"dtype '{setting}' is unknown; use auto, int8, " + ", ".join(DTYPES) + ".")
    return Precision(DTYPES[setting])


def quantize_linear_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``nn.Linear`` (the output head included) for a dynamic int8 one, for CPU inference.

    Weights are quantized per output channel; activations per tensor at run time (fbgemm's kernels).
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie so the head can be quantized
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
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
