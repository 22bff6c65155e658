"""Timing two ways of computing the same products on this machine, for the choices a model's load measures
(:mod:`qubrid_lab.models.weight_only`: integer or float weights by row count, packed or plain float weights)."""

from __future__ import annotations

import time
from typing import Callable

REPEATS = 5


def compare_ms(
    first: Callable[[], object], second: Callable[[], object], repeats: int = REPEATS
) -> tuple[float, float]:
    """Milliseconds of the fastest of ``repeats`` runs of each, the two taken in turns after one untimed run of
    each. On a shared machine a burst of other load only ever adds time, so the fastest run is the closest to
    each one's own cost; taking turns keeps a slow stretch from landing on one side only. (A median of three
    runs, one side after the other, put the same layer shape's crossover anywhere from 8 rows to "every row
    count" between loads on the AMD EPYC of benchmarks/README.md, session j.)"""
    first(), second()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for side, fn in enumerate((first, second)):
            started = time.perf_counter()
            fn()
            best[side] = min(best[side], time.perf_counter() - started)
    return best[0] * 1e3, best[1] * 1e3
