"""A daemon thread that runs all torch work of the models it is given, one call at a time.

torch's OpenMP worker pool belongs to the thread that first runs a parallel region; on a 2-core CPU,
loading a model on one thread and decoding on another made every decode step about twice as slow
(measured in benchmarks/README.md). So models are loaded and run on one thread for their lifetime; the
server shares one among all its models, whose jobs (decode steps, embedding batches) then take turns.

Once it has been idle for :data:`IDLE_TRIM_SECONDS` after work, the thread hands the heap pages freed by that
work back to the OS (:func:`~qubrid_lab.models.device.trim_heap`): under load they are reused, idle they would
keep the process hundreds of MB larger than it needs.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from qubrid_lab.models.device import trim_heap

IDLE_TRIM_SECONDS = 2.0


class ModelThread:
    """Runs submitted callables in order on a single daemon thread; ``submit`` returns a Future."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _work(self) -> None:
        worked = False
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_TRIM_SECONDS if worked else None)
            except queue.Empty:
                trim_heap()
                worked = False
                continue
            if job is None:
                return
            worked = True
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the caller through the future
                    future.set_exception(exc)
