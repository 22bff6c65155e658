"""What a training job may use of a GPU a managed vLLM shares (no GPU needed: the reservations are given)."""

from __future__ import annotations

from qubrid_lab.training.gpu_share import GPU_SHARE_MARGIN, TrainingGpus


def test_a_job_trains_in_what_vllm_leaves_and_waits_when_too_little_is_left():
    roomy = TrainingGpus("cuda:0", lambda: {"cuda:0": (0.5, "team/llama")})
    assert roomy.wait_reason() is None
    assert roomy.share() == 0.5 - GPU_SHARE_MARGIN
    crowded = TrainingGpus("cuda:0", lambda: {"cuda:0": (0.9, "team/llama")})
    reason = crowded.wait_reason()
    assert "team/llama" in reason and "90%" in reason and "gpu_memory_utilization" in reason
    elsewhere = TrainingGpus("cuda:1", lambda: {"cuda:0": (0.9, "team/llama")})
    assert elsewhere.wait_reason() is None and elsewhere.share() is None


def test_cuda_n_makes_gpu_n_the_workers_only_visible_gpu():
    environment: dict[str, str] = {}
    assert TrainingGpus("cuda:1").visible(environment) == "cuda" and environment["CUDA_VISIBLE_DEVICES"] == "1"
    restricted = {"CUDA_VISIBLE_DEVICES": "4,6"}  # N counts the GPUs already visible
    assert TrainingGpus("cuda:1").visible(restricted) == "cuda" and restricted["CUDA_VISIBLE_DEVICES"] == "6"
    untouched: dict[str, str] = {}
    assert TrainingGpus("cpu").visible(untouched) == "cpu" and untouched == {}
    assert TrainingGpus("cpu").devices() == [] and TrainingGpus("cpu").wait_reason() is None
