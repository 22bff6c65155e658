"""Decode steps replayed from CUDA graphs.

On a GPU, a small model's decode step is hundreds of small kernels, and launching them one by one from Python
takes far longer than running them: SmolLM2-135M on an H200 took 13.7 ms per step eager and 1.9 ms replayed
from a graph (benchmarks/README.md). A CUDA graph records one step's kernels once and replays them all with
one launch. It replays fixed addresses and shapes, so the step it records

* runs a fixed number of rows: the batch rounded up to a power of two (the extra rows compute on nothing);
* attends over the cache's whole capacity, the mask hiding the columns not in use, and writes the new
  keys/values at a column index held in device memory;
* reads its inputs from, and writes the logits into, buffers of its own.

The batch's cache (:class:`~qubrid_lab.engine.kv.BatchKV`) is moved into the graphs' buffers when rows join
or leave (BatchKV then builds fresh buffers) and from then on refers to them, so the steps in between copy
nothing. One set of buffers serves every row count at one cache capacity; a new capacity (the cache grew)
starts a new set, and its graphs are recorded again as they are needed.

Only the lean Llama forward (:class:`~qubrid_lab.engine.forward.FusedLlama`) is replayed, and only for steps
with no LoRA adapter in the batch (the adapters' per-row updates are hooks whose row groups change); other
steps run eagerly. With ``capture=False`` the same fixed-shape step runs without a graph: that is how the
CPU tests check its arithmetic against the eager step.
"""

from __future__ import annotations

import torch

from qubrid_lab.engine.kv import BatchKV


def bucket(rows: int) -> int:
    """The row count a graph is recorded for: ``rows`` rounded up to a power of two."""
    return 1 << (rows - 1).bit_length()


class _ColumnWriter:
    """The forward's cache writer inside a graph: writes each layer's new keys/values at the device-held
    column and hands attention the whole buffers."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], column: torch.Tensor):
        self.keys, self.values, self.column = keys, values, column
        self.length = 0  # a decode step's single token needs no causal mask from it

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        self.keys[layer].index_copy_(2, self.column, key_states)
        self.values[layer].index_copy_(2, self.column, value_states)
        return self.keys[layer], self.values[layer]


class _Buffers:
    """Everything the graphs at one cache capacity read and write, for up to ``rows`` rows."""

    def __init__(self, kv: BatchKV, rows: int):
        self.capacity = kv.capacity
        self.rows = rows
        self.keys = [k.new_zeros((rows, *k.shape[1:])) for k in kv.keys]
        self.values = [v.new_zeros((rows, *v.shape[1:])) for v in kv.values]
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=kv.device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=kv.device)
        self.mask = torch.zeros((rows, self.capacity), dtype=torch.bool, device=kv.device)
        self.column = torch.zeros(1, dtype=torch.long, device=kv.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}

    def holds(self, kv: BatchKV) -> bool:
        """Whether ``kv`` refers to these buffers already (no row joined or left since the last step)."""
        return kv.keys[0].data_ptr() == self.keys[0].data_ptr()

    def adopt(self, kv: BatchKV) -> None:
        """Copy the cache in and make ``kv`` refer to these buffers from now on."""
        rows = kv.rows
        for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
            self.keys[layer][:rows].copy_(k)
            self.values[layer][:rows].copy_(v)
        kv.keys = [k[:rows] for k in self.keys]
        kv.values = [v[:rows] for v in self.values]


class GraphedDecode:
    """Runs decode steps of ``forward`` (a FusedLlama on a CUDA device) from CUDA graphs."""

    def __init__(self, forward, capture: bool = True):
        self.forward = forward
        self.capture = capture
        self._buffers: _Buffers | None = None
        self.recorded = 0  # graphs recorded so far, for the tests and the logs

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, kv: BatchKV) -> torch.Tensor:
        """One decode step for every row of ``kv``, after :meth:`BatchKV.step_inputs`: the rows' logits."""
        rows, padded_rows = kv.rows, bucket(kv.rows)
        buffers = self._buffers
        if buffers is None or buffers.capacity != kv.capacity or buffers.rows < padded_rows:
            # a new capacity, or more rows than ever: new buffers (the old ones' graphs go with them)
            buffers = self._buffers = _Buffers(kv, max(padded_rows, buffers.rows if buffers else 0))
        if not buffers.holds(kv):
            buffers.adopt(kv)
        buffers.ids[:rows].copy_(ids)
        buffers.positions[:rows].copy_(positions)
        buffers.mask[:rows].copy_(kv.mask)
        if padded_rows > rows:  # rows computing on nothing attend to one column, so that no score is all masked
            buffers.mask[rows:padded_rows] = False
            buffers.mask[rows:padded_rows, 0] = True
        buffers.column.fill_(kv.length)
        graph, logits = buffers.graphs.get(padded_rows, (None, None))
        if graph is None:
            graph, logits = self._record(buffers, padded_rows)
        if graph is not None:
            graph.replay()
        return logits[:rows]

    def _step(self, buffers: _Buffers, rows: int) -> torch.Tensor:
        writer = _ColumnWriter([k[:rows] for k in buffers.keys], [v[:rows] for v in buffers.values], buffers.column)
        return self.forward(buffers.ids[:rows], buffers.positions[:rows], writer, buffers.mask[:rows])

    def _record(self, buffers: _Buffers, rows: int):
        """Record the step for ``rows`` rows (without ``capture``: run it, and keep no graph)."""
        if not self.capture:
            return None, self._step(buffers, rows)
        # Warm-up runs on a side stream (as CUDA graphs require) also run the step for real: the graph records
        # the same inputs, so the replay that follows writes the same column again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(buffers, rows)
        torch.cuda.current_stream().wait_stream(stream)
        # Each graph has a memory pool of its own: a pool shared by handle is freed with the last graph that
        # used it, and its handle then cannot record again (the graphs of replaced buffers go at once).
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._step(buffers, rows)
        buffers.graphs[rows] = (graph, logits)
        self.recorded += 1
        return graph, logits


def graphed_decode(forward, device: torch.device) -> GraphedDecode | None:
    """Graph replay for ``forward``'s decode steps where it applies (a FusedLlama on CUDA), else None."""
    from qubrid_lab.engine.forward import FusedLlama

    if device.type != "cuda" or not isinstance(forward, FusedLlama):
        return None
    return GraphedDecode(forward)
