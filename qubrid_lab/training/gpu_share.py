"""Which GPUs a training job uses, and how much of them it may: a managed vLLM on the same GPU holds a fixed
share of its memory (its ``gpu_memory_utilization``), so a job trains in what is left, or waits while too
little is."""

from __future__ import annotations

from collections.abc import Callable

MIN_TRAINING_GPU_SHARE = 0.15  # a job waits while a managed vLLM leaves less of its GPU than this
GPU_SHARE_MARGIN = 0.03  # left free beside vLLM's share for the CUDA contexts
GpuReservations = Callable[[], dict[str, tuple[float, str]]]  # device -> (fraction held, by which models)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class TrainingGpus:
    """The training device setting (``auto``, ``cuda``, ``cuda:N`` or ``cpu``) against what serving holds."""

    def __init__(self, training_device: str, reservations: GpuReservations | None = None):
        self.device = training_device
        self.reservations = reservations or dict

    def devices(self) -> list[str]:
        """The CUDA devices a worker would train on ("cuda:N" names as this process counts them)."""
        if self.device.startswith("cuda:"):
            return [self.device]
        if self.device in ("auto", "cuda"):
            return [f"cuda:{i}" for i in range(gpu_count())]
        return []

    def wait_reason(self) -> str | None:
        """Why no job can start now: a managed vLLM leaves too little of a training GPU (None: train)."""
        held = self.reservations()
        for device in self.devices():
            fraction, holder = held.get(device, (0.0, ""))
            if 1.0 - fraction < MIN_TRAINING_GPU_SHARE:
                return (
                    f"vLLM serving {holder} holds {fraction:.0%} of {device}'s memory, which leaves less than "
                    f"the {MIN_TRAINING_GPU_SHARE:.0%} a job needs; lower that entry's gpu_memory_utilization, "
                    "or train on another device (--training-device)"
                )
        return None

    def share(self) -> float | None:
        """The fraction of its GPU memory a worker may use beside a managed vLLM (None: all of it)."""
        held = self.reservations()
        shares = [1.0 - held[d][0] for d in self.devices() if d in held]
        return min(shares) - GPU_SHARE_MARGIN if shares else None

    def visible(self, environment: dict[str, str]) -> str:
        """The worker's ``--device``; ``cuda:N`` becomes "cuda" with GPU N the only visible one (N counts the
        GPUs already visible, when ``CUDA_VISIBLE_DEVICES`` restricts them)."""
        if not self.device.startswith("cuda:"):
            return self.device
        index = self.device.partition(":")[2]
        visible = [d.strip() for d in environment.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if index.isdigit() and int(index) < len(visible):
            index = visible[int(index)]
        environment["CUDA_VISIBLE_DEVICES"] = index
        return "cuda"
