"""How far a serving path's next-token distributions stray from a reference's, teacher-forced.

Used twice: by the tests that prove each precision path of the engine right (``tests/engine/test_accuracy.py``)
and by ``--dtype auto`` (:mod:`qubrid_lab.engine.auto_precision`), which serves only a path that passes
:data:`ACCURACY_BAR` on the model being loaded.

Both sides see the same token sequence (a prompt and a fixed continuation), so one wrong pick cannot derail
the rest of the comparison. Two measures:
  * the KL divergence from the reference's next-token distribution to the candidate's, per position;
  * top-1 agreement at the positions where the reference is clearly decided (its best token leads the second
    by at least ``clear_margin`` nats). Near-ties are left out on purpose: there any rounding, bf16's included,
    may pick either token, and a greedy answer that turns on one is luck in every precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qubrid_lab.engine.forward import Forward
from qubrid_lab.engine.kv import BatchKV, PrefillKV


@dataclass(frozen=True)
class AccuracyBar:
    """The most a reduced-precision path may stray from fp32 and still be served by ``--dtype auto``.

    bf16 is the precision models are trained and commonly served in; on SmolLM2-135M-Instruct over the probe
    prompts it shows a mean KL of ~0.002 nats and keeps every clearly decided token (benchmarks/README.md).
    The bar allows about ten times that divergence, for larger models and other prompts.
    """

    max_mean_kl: float = 0.02
    min_clear_top1: float = 0.95
    clear_margin: float = 1.0


ACCURACY_BAR = AccuracyBar()


@dataclass(frozen=True)
class Divergence:
    """A candidate's divergence from a reference over a set of teacher-forced positions."""

    mean_kl: float
    max_kl: float
    top1: float  # agreement over every position
    clear_top1: float  # agreement where the reference leads by at least the bar's margin
    positions: int
    clear_positions: int

    def passes(self, bar: AccuracyBar = ACCURACY_BAR) -> bool:
        return self.mean_kl <= bar.max_mean_kl and self.clear_top1 >= bar.min_clear_top1

    def as_dict(self) -> dict:
        return {key: round(value, 5) if isinstance(value, float) else value for key, value in asdict(self).items()}


def divergence(reference: torch.Tensor, candidate: torch.Tensor, bar: AccuracyBar = ACCURACY_BAR) -> Divergence:
    """Compare logits ``[positions, vocab]`` (or lists of such blocks, concatenated) position by position."""
    if isinstance(reference, (list, tuple)):
        reference, candidate = torch.cat(list(reference)), torch.cat(list(candidate))
    if reference.shape != candidate.shape:
        raise ValueError(
            f"logits differ in shape: reference {tuple(reference.shape)}, candidate {tuple(candidate.shape)}"
        )
    ref = reference.float().log_softmax(-1)
    cand = candidate.float().log_softmax(-1)
    kl = (ref.exp() * (ref - cand)).sum(-1).clamp(min=0)
    best = ref.topk(2, dim=-1).values
    clear = (best[:, 0] - best[:, 1]) >= bar.clear_margin
    agree = ref.argmax(-1) == cand.argmax(-1)
    return Divergence(
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        top1=float(agree.float().mean()),
        clear_top1=float(agree[clear].float().mean()) if bool(clear.any()) else 1.0,
        positions=int(kl.numel()),
        clear_positions=int(clear.sum()),
    )


def reference_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """transformers' own forward over prompt + continuation: the logits predicting each continuation token."""
    device = model.device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + continuation], device=device)).logits[0]
    return logits[len(prompt) - 1 : len(prompt) + len(continuation) - 1].float().cpu()


def served_logits(
    forward: Forward, prompt: list[int], continuation: list[int], device: torch.device, prefix: int = 0
) -> torch.Tensor:
    """The engine's path for one request: prefill (in two parts after a shared ``prefix``, as the scheduler
    does), then one decode step per continuation token over the request's cache. Same rows as
    :func:`reference_logits`."""
    ids = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    prefill = PrefillKV()
    with torch.inference_mode():
        if prefix:
            forward(ids[:, :prefix], positions[:, :prefix], prefill, None)
            prefill = PrefillKV(prefill.keys, prefill.values)  # the rest continues after the prefix's positions
        rows = [forward(ids[:, prefix:], positions[:, prefix:], prefill, None)[0]]
        kv = BatchKV(device)
        kv.add_rows(prefill, torch.ones((1, len(prompt)), dtype=torch.long, device=device))
        for token in continuation[:-1]:
            mask, step_positions = kv.step_inputs()
            rows.append(forward(torch.tensor([[token]], device=device), step_positions, kv, mask)[0])
            kv.commit_step()
    return torch.stack(rows).float().cpu()


def greedy_continuation(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The model's own greedy continuation of ``prompt`` (transformers' ``generate``), without the prompt."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return out[0, len(prompt) :].tolist()
