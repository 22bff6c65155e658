"""``--dtype auto``: serve the fastest precision that stays accurate, measured on this machine and model.

A rule such as "bf16 where the CPU has bf16 units" was wrong on a current Intel CPU (bf16 slower there
than another path at batch 1) and says nothing about accuracy, so each candidate the device can run
(:func:`~qubrid_lab.models.device.precision_candidates`) is measured on the model being loaded:
  1. accuracy: teacher-forced on fixed probe prompts against transformers' fp32 forward; a candidate that
     fails :data:`~qubrid_lab.engine.accuracy.ACCURACY_BAR` is never served;
  2. speed: the median time of a decode step at batch 1 and at batch 16, and of a 128-token prompt's prefill
     (where products over many rows decide), through the engine's forward, over rounds that alternate the
     candidates.
The default (the first candidate) is left only for a passing candidate that is at least 10% faster (the
geometric mean of its speed-ups over the three timings) and no slower at any, beyond the timings' noise (10%:
the same forward's prefill varied by 15% between rounds on a shared 2-core machine): a path that trades
single-request latency for batch throughput or long prompts, or the reverse, is a trade-off for ``--dtype``
to make, not a speed-up. The result is cached in the model cache, keyed by the CPU or GPU, the model's files and the
torch version, so later starts reuse it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from qubrid_lab.engine.accuracy import (
    ACCURACY_BAR,
    divergence,
    greedy_continuation,
    reference_logits,
    served_logits,
)
from qubrid_lab.engine.forward import load_causal_lm, prepare_forward
from qubrid_lab.engine.kv import BatchKV, PrefillKV
from qubrid_lab.models.device import Precision, precision_candidates

log = logging.getLogger(__name__)

PROBE_MESSAGES = [
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paper clip.",
]
PROBE_TOKENS = 16  # greedy fp32 tokens that continue each probe prompt, teacher-forced for every candidate
BATCH_SIZES = (1, 16)
PREFILL_TOKENS = 128
WARMUP_STEPS = 2
TIMED_STEPS = 8
TIMED_ROUNDS = 3
SWITCH_SPEEDUP = 1.10
NOISE = 0.10
CACHE_FILE = "precision-picks.json"
METHOD = 5  # part of the cache key: change it when the workload or the bar changes


@dataclass
class PrecisionChoice:
    """The precision a model is served in, how it was chosen, and what was measured for the choice."""

    precision: Precision
    how: str  # "set" (--dtype named it), "measured" (auto, now) or "cached" (auto, an earlier measurement)
    candidates: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"dtype": self.precision.label, "how": self.how, "candidates": self.candidates}

    def summary(self) -> str:
        parts = []
        for label, figures in self.candidates.items():
            if figures["passes"]:
                steps = "/".join(f"{ms:.0f}" for ms in _timings(figures))
                parts.append(f"{label} {steps} ms")
            elif "error" in figures:
                parts.append(f"{label} does not run ({figures['error']})")
            else:
                parts.append(
                    f"{label} fails the accuracy bar (mean KL {figures['mean_kl']:.3g}, "
                    f"clear top-1 {figures['clear_top1']:.2f})"
                )
        if not parts:
            return f"{self.precision.label} ({self.how})"
        sizes = "/".join(str(b) for b in BATCH_SIZES)
        return (
            f"{self.precision.label} ({self.how}; decode step at batch {sizes} and a {PREFILL_TOKENS}-token prefill: "
            + "; ".join(parts)
            + ")"
        )


def fastest_passing(candidates: dict[str, dict], default: str) -> str:
    """The label to serve: ``default``, unless a candidate that passes the bar is at least
    :data:`SWITCH_SPEEDUP` faster than it (geometric mean over the timings) and no slower at any (beyond
    :data:`NOISE`); then the fastest such one."""
    passing = {label: c for label, c in candidates.items() if c["passes"]}
    if not passing:
        return default
    if default not in passing:
        return min(passing, key=lambda label: _geometric_mean(_timings(passing[label])))

    def ratios(label: str) -> list[float]:
        return [base / own for base, own in zip(_timings(passing[default]), _timings(passing[label]))]

    faster = {
        label: _geometric_mean(ratios(label))
        for label in passing
        if label != default and min(ratios(label)) >= 1 - NOISE
    }
    best = max(faster, key=faster.get, default=None)
    return best if best is not None and faster[best] >= SWITCH_SPEEDUP else default


def _timings(figures: dict) -> list[float]:
    """A candidate's decode-step milliseconds at each batch size, then its prefill's."""
    return [*(figures["decode_ms"][str(b)] for b in BATCH_SIZES), figures["prefill_ms"]]


def _geometric_mean(values: list[float]) -> float:
    return math.prod(values) ** (1 / len(values))


def choose_precision(
    location: str, config_dir: Path, tokenizer, device: torch.device, cache_dir: Path, fused: bool = True
) -> PrecisionChoice:
    """Measure (or reuse a cached measurement of) every candidate precision of this model on ``device``."""
    from filelock import FileLock

    candidates = precision_candidates(device)
    default = candidates[0].label
    if len(candidates) == 1:
        return PrecisionChoice(candidates[0], "only candidate")
    key = _cache_key(device, config_dir)
    cache_file = Path(cache_dir) / CACHE_FILE
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_file) + ".lock"):  # two servers loading one model measure it once
        cached = _read_cache(cache_file).get(key)
        if cached is not None:
            return PrecisionChoice(Precision.from_label(cached["dtype"]), "cached", cached["candidates"])
        started = time.perf_counter()
        log.info(
            "dtype auto: measuring %s on %s for %s (once per machine and model)",
            ", ".join(c.label for c in candidates),
            device,
            location,
        )
        figures = measure_candidates(location, tokenizer, device, candidates, fused)
        label = fastest_passing(figures, default)
        entries = _read_cache(cache_file)
        entries[key] = {
            "dtype": label,
            "candidates": figures,
            "identity": _identity(device, config_dir),
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1),
        }
        _write_cache(cache_file, entries)
    return PrecisionChoice(Precision.from_label(label), "measured", figures)


def measure_candidates(
    location: str, tokenizer, device: torch.device, candidates: list[Precision], fused: bool = True
) -> dict[str, dict]:
    """Accuracy against transformers' fp32 forward for each candidate, then decode speed for those that pass.

    Speed is timed in :data:`TIMED_ROUNDS` rounds that take the candidates in turn (each round's order the
    reverse of the last), and each figure is the median over the rounds: timed one after the other, a burst of
    load on a shared machine during one candidate's turn decided the pick. That needs the passing candidates
    loaded together; one that would not fit in half the free memory is timed alone, all rounds in a row.
    """
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for text in PROBE_MESSAGES
    ]
    reference, _ = load_causal_lm(location, Precision(torch.float32), device, fused=False)
    continuations = [greedy_continuation(reference, ids, PROBE_TOKENS) or [ids[-1]] for ids in prompts]
    references = [reference_logits(reference, ids, cont) for ids, cont in zip(prompts, continuations)]
    if all(precision.label != "float32" for precision in candidates):  # a GPU: free the fp32 copy first
        reference = None
        _free_memory()
    figures, held, held_bytes = {}, {}, 0
    for precision in candidates:
        model = forward = None
        try:
            if precision.label == "float32":  # the reference model itself, now with the serving forward
                model, forward = reference, prepare_forward(reference, fused)
                reference = None
            else:
                model, forward = load_causal_lm(location, precision, device, fused)
            served = [served_logits(forward, ids, cont, device) for ids, cont in zip(prompts, continuations)]
            accuracy = divergence(references, served)
            figures[precision.label] = {"passes": accuracy.passes(), **accuracy.as_dict()}
            if accuracy.passes():
                size = _model_bytes(model)
                if held_bytes + size <= _free_bytes(device) / 2:
                    held[precision.label] = (model, forward)
                    held_bytes += size
                else:
                    figures[precision.label].update(
                        _time_rounds({precision.label: forward}, device, prompts[0])[precision.label]
                    )
        except Exception as exc:  # noqa: BLE001 - a path this machine or model cannot run is simply no candidate
            log.warning("dtype auto: %s cannot serve this model here: %s: %s", precision.label, type(exc).__name__, exc)
            figures[precision.label] = {"passes": False, "error": f"{type(exc).__name__}: {exc}"}
        model = forward = reference = None
        _free_memory()
    timed = _time_rounds({label: forward for label, (_, forward) in held.items()}, device, prompts[0])
    for label, timings in timed.items():
        figures[label].update(timings)
    held.clear()
    _free_memory()
    for label, entry in figures.items():
        log.info("dtype auto: %s: %s", label, entry)
    return figures


def _time_rounds(forwards: dict, device: torch.device, prompt: list[int]) -> dict[str, dict]:
    """Per label, ``decode_ms`` (per batch size) and ``prefill_ms``: medians over rounds that alternate the
    labels."""
    decode: dict[str, dict[int, list[float]]] = {label: {b: [] for b in BATCH_SIZES} for label in forwards}
    prefill: dict[str, list[float]] = {label: [] for label in forwards}
    long_prompt = (prompt * (PREFILL_TOKENS // len(prompt) + 1))[:PREFILL_TOKENS]
    order = list(forwards)
    for _ in range(TIMED_ROUNDS):
        for label in order:
            for batch in BATCH_SIZES:
                decode[label][batch].append(decode_step_ms(forwards[label], device, prompt, batch))
            prefill[label].append(prefill_ms(forwards[label], device, long_prompt))
        order.reverse()
    return {
        label: {
            "decode_ms": {str(b): round(statistics.median(times), 2) for b, times in decode[label].items()},
            "prefill_ms": round(statistics.median(prefill[label]), 2),
        }
        for label in forwards
    }


def _free_memory() -> None:
    """Hand back the memory of the models just dropped (quantization leaves reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def prompt_batch(forward, device: torch.device, prompt: list[int], rows: int) -> tuple[torch.Tensor, BatchKV]:
    """``prompt`` prefilled once and held by ``rows`` rows of a decode batch: its last logits and the batch's
    cache, ready for a decode step (what a decode step's timing starts from)."""
    prefill = PrefillKV()
    with torch.inference_mode():
        logits = forward(
            torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device)[None], prefill, None
        )
        prefill.keys = [k.expand(rows, -1, -1, -1) for k in prefill.keys]
        prefill.values = [v.expand(rows, -1, -1, -1) for v in prefill.values]
        kv = BatchKV(device)
        kv.add_rows(prefill, torch.ones((rows, len(prompt)), dtype=torch.long, device=device))
    return logits, kv


def decode_step_ms(forward, device: torch.device, prompt: list[int], batch: int) -> float:
    """Median milliseconds of one decode step for ``batch`` rows that each hold ``prompt``."""
    logits, kv = prompt_batch(forward, device, prompt, batch)
    with torch.inference_mode():
        tokens = logits.argmax(-1).view(1, 1).expand(batch, 1)
        times = []
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            mask, positions = kv.step_inputs()
            _synchronize(device)
            started = time.perf_counter()
            logits = forward(tokens, positions, kv, mask)
            tokens = logits.argmax(-1, keepdim=True)
            _synchronize(device)
            if step >= WARMUP_STEPS:
                times.append(time.perf_counter() - started)
            kv.commit_step()
    return statistics.median(times) * 1000


def prefill_ms(forward, device: torch.device, prompt: list[int]) -> float:
    """Milliseconds of the prefill of ``prompt`` (the faster of two runs: the first may warm caches)."""
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    times = []
    with torch.inference_mode():
        for _ in range(2):
            _synchronize(device)
            started = time.perf_counter()
            forward(tokens, positions, PrefillKV(), None)
            _synchronize(device)
            times.append(time.perf_counter() - started)
    return min(times) * 1000


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _identity(device: torch.device, config_dir: Path) -> dict:
    """What the measurement depends on: the processor (and the instruction set torch uses on it), the model's
    files, and torch."""
    if device.type == "cuda":
        machine = {
            "gpu": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
        }
    else:
        machine = {
            "cpu": _cpu_model(),
            "isa": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "threads": torch.get_num_threads(),
        }
    config = Path(config_dir) / "config.json"
    weights = sorted((p.name, p.stat().st_size) for p in Path(config_dir).glob("*.safetensors"))
    model = {
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else "",
        "weights": weights,
    }
    return {
        "machine": machine,
        "model": model,
        "torch": torch.__version__,
        "method": METHOD,
        "bar": [ACCURACY_BAR.max_mean_kl, ACCURACY_BAR.min_clear_top1, ACCURACY_BAR.clear_margin],
    }


def _cache_key(device: torch.device, config_dir: Path) -> str:
    return hashlib.sha256(json.dumps(_identity(device, config_dir), sort_keys=True).encode()).hexdigest()[:24]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: measure again
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(entries, indent=1))
    os.replace(partial, path)
