"""Key/value caches: a prompt's own while it is prefilled, and the batch's that rows join and leave.

transformers' ``DynamicCache`` grows by concatenation, which copies the whole cache on every step; here each
layer writes into a preallocated buffer that doubles when full, and rows are right-aligned so that one
decode step appends one column for every row. Rows of different lengths are left-padded and masked.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class KVWriter(Protocol):
    """Where a forward pass puts each layer's new keys/values; returns the layer's full keys/values."""

    length: int

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor): ...


class PrefillKV:
    """Collects one prompt's keys/values, layer by layer, during its prefill.

    Built on a cached prefix (``keys``/``values`` of the prompt's first tokens), it prefills only the rest:
    each layer's new keys/values are appended to the prefix's, and ``length`` tells the forward how many
    positions come before the new tokens.
    """

    def __init__(self, keys: list[torch.Tensor] | None = None, values: list[torch.Tensor] | None = None) -> None:
        self.keys: list[torch.Tensor] = list(keys or [])
        self.values: list[torch.Tensor] = list(values or [])
        self.length = self.keys[0].shape[-2] if self.keys else 0

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if layer < len(self.keys):
            key_states = torch.cat([self.keys[layer], key_states], dim=-2)
            value_states = torch.cat([self.values[layer], value_states], dim=-2)
            self.keys[layer], self.values[layer] = key_states, value_states
        else:
            self.keys.append(key_states)
            self.values.append(value_states)
        return key_states, value_states


class PackedPrefillKV:
    """Keys/values of many prompts prefilled together as one packed sequence.

    Prompt ``i`` is ``lengths[i]`` new tokens on top of ``prefixes[i]`` (a cached prefix's keys/values, or
    None). The forward pass writes the packed new keys/values ``[1, heads, sum(lengths), head_dim]``; each
    prompt's own (prefix and new tokens) are kept apart in ``prompts[i]``, and the pass attends over all of
    them laid end to end, with :attr:`mask` letting each new token see its own prefix and, causally, its own
    prompt only.
    """

    def __init__(self, lengths: list[int], prefixes: list[PrefillKV | None], device: torch.device):
        self.lengths = lengths
        self.prompts = [PrefillKV(p.keys, p.values) if p is not None else PrefillKV() for p in prefixes]
        self.length = 0  # the mask says what is attended to
        befores = [prompt.length for prompt in self.prompts]
        self.mask = torch.zeros((sum(lengths), sum(lengths) + sum(befores)), dtype=torch.bool, device=device)
        row = column = 0
        for length, before in zip(lengths, befores):
            self.mask[row : row + length, column : column + before] = True
            self.mask[row : row + length, column + before : column + before + length] = torch.ones(
                (length, length), dtype=torch.bool, device=device
            ).tril()
            row, column = row + length, column + before + length
        self.last_tokens = torch.tensor(lengths, device=device).cumsum(0) - 1

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        keys, values = [], []
        for prompt, k, v in zip(
            self.prompts, key_states.split(self.lengths, dim=-2), value_states.split(self.lengths, dim=-2)
        ):
            k, v = prompt.write(layer, k, v)
            keys.append(k)
            values.append(v)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def as_transformers_cache(writer: KVWriter, layers: int) -> DynamicCache:
    """A transformers cache object whose layers write through ``writer``."""
    cache = DynamicCache()
    cache.layers = [_BufferLayer(writer, i) for i in range(layers)]
    return cache


class _BufferLayer(DynamicLayer):
    """One layer of a :class:`KVWriter` seen as a transformers cache layer."""

    def __init__(self, store: KVWriter, index: int):
        super().__init__()
        self.store = store
        self.index = index
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.store.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.store.length


class BatchKV:
    """Key/value buffers ``[rows, heads, capacity, head_dim]`` per layer, plus a ``[rows, capacity]`` mask.

    The buffers hold more rows than are in use (up to the next power of two), so that rows join and leave
    in place: a joining prompt no longer than the batch is written into spare rows, and a leaving row's slot
    is filled by moving one of the last rows into it. Both copy only the rows that change, where rebuilding
    the buffers copied the whole cache of every layer, each time a request started or ended (8% of the model
    thread's time at 16 concurrent requests on a 2-core CPU; benchmarks/README.md). Rows are rebuilt, and the
    columns that only pad trimmed, when the cache must grow or a quarter of its columns has become padding.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.length = 0  # columns in use; every row's last real token sits in column length - 1
        # Each row's real tokens, kept on the host too: whether a step needs its mask, and which columns only
        # pad, are then known without waiting for the device.
        self.row_lengths: list[int] = []
        # the whole buffers, spare rows included; keys/values/mask are views of their first rows
        self._all_keys: list[torch.Tensor] = []
        self._all_values: list[torch.Tensor] = []
        self._all_mask = self.mask

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        end = self.length + key_states.shape[-2]
        self.keys[layer][:, :, self.length : end] = key_states
        self.values[layer][:, :, self.length : end] = value_states
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def step_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Prepare one decode step: the attention mask (None when nothing is padded) and each row's next
        position. The step's forward pass then writes through :meth:`write`."""
        if self.length + 1 > self.capacity:
            start = self.length - max(self.row_lengths)
            self._reallocate(list(range(self.rows)), start, max(2 * (self.length - start), 64))
        positions = self.mask[:, : self.length].sum(dim=1, keepdim=True)
        self.mask[:, self.length] = 1
        padded = any(length != self.length for length in self.row_lengths)
        return self.mask[:, : self.length + 1] if padded else None, positions

    def commit_step(self) -> None:
        self.length += 1
        self.row_lengths = [length + 1 for length in self.row_lengths]

    def add_rows(self, prefill: PrefillKV, mask: torch.Tensor) -> None:
        """Append the rows of a prefilled, left-padded cache whose padding is given by ``mask``."""
        new_len, added = mask.shape[1], mask.shape[0]
        added_lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        old_rows = self.rows
        if not self.keys:  # the first rows: the prefill's shapes and dtype make the buffers
            self.keys, self.values, self._all_keys, self._all_values = prefill.keys, prefill.values, [], []
        if not self._all_keys or new_len > self.length or not self._spare_rows(added):
            # rebuild: the old rows shift right when the newcomer is longer than the batch
            length = max(self.length, new_len)
            capacity = max(self.capacity, length + 64)
            self._reallocate(list(range(old_rows)), 0, capacity, rows=old_rows + added, shift=length - self.length)
            self.length = length
        rows = slice(old_rows, old_rows + added)
        columns = slice(self.length - new_len, self.length)
        for layer in range(len(prefill.keys)):
            self._all_keys[layer][rows, :, columns] = prefill.keys[layer]
            self._all_values[layer][rows, :, columns] = prefill.values[layer]
        self._all_mask[rows] = 0  # a reused row's old contents are masked out
        self._all_mask[rows, columns] = mask
        self.row_lengths = self.row_lengths + added_lengths
        self._view(old_rows + added)

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Drop every row not in ``keep``. Returns the rows' new order, as their old indices: ``keep`` itself
        when the buffers are rebuilt, else each remaining row in its old slot but for the last rows, which move
        into the slots of rows that left."""
        if not keep:
            self.keys, self.values, self.length, self.row_lengths = [], [], 0, []
            self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
            self._all_keys, self._all_values, self._all_mask = [], [], self.mask
            return []
        start = self.length - max(self.row_lengths[i] for i in keep)
        if start >= max(16, self.length // 4) or not self._spare_rows(0):
            self.row_lengths = [self.row_lengths[i] for i in keep]
            self._reallocate(keep, start, self.capacity)
            return list(keep)
        count, kept = len(keep), set(keep)
        holes = [slot for slot in range(count) if slot not in kept]
        movers = [row for row in keep if row >= count]
        order = list(range(count))
        if holes:
            target = torch.tensor(holes, device=self.device)
            source = torch.tensor(movers, device=self.device)
            for buffer in (*self._all_keys, *self._all_values, self._all_mask):
                buffer[target] = buffer[source]
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        self.row_lengths = [self.row_lengths[row] for row in order]
        self._view(count)
        return order

    def _spare_rows(self, wanted: int) -> bool:
        """Whether the views are still this object's own (a CUDA graph's buffers may have replaced them, see
        :mod:`.cuda_graphs`) and the buffers have ``wanted`` rows to spare."""
        return (
            bool(self._all_keys)
            and self.keys[0].data_ptr() == self._all_keys[0].data_ptr()
            and self.rows + wanted <= self._all_mask.shape[0]
        )

    def _view(self, rows: int) -> None:
        self.keys = [k[:rows] for k in self._all_keys]
        self.values = [v[:rows] for v in self._all_values]
        self.mask = self._all_mask[:rows]

    def _reallocate(self, index: list[int], start: int, capacity: int, rows: int | None = None, shift: int = 0):
        """Copy rows ``index`` and columns ``[start, length)`` into fresh buffers of ``capacity`` columns, with
        room for ``rows`` rows (at least), the columns moved right by ``shift``."""
        kept = self.length - start
        capacity = max(capacity, kept + shift + 1)
        rows = max(rows or 0, len(index))
        spare = 1 << (rows - 1).bit_length()  # the next power of two
        source = torch.tensor(index, dtype=torch.long, device=self.device)
        template_keys = self._all_keys or self.keys
        template_values = self._all_values or self.values

        def copy(buffer: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            fresh = buffer.new_zeros((spare, *buffer.shape[1:2], capacity, *buffer.shape[3:]))
            if kept and len(index):
                fresh[: len(index), :, shift : shift + kept] = old[source, :, start : self.length]
            return fresh

        self._all_keys = [copy(k, old) for k, old in zip(template_keys, self.keys)]
        self._all_values = [copy(v, old) for v, old in zip(template_values, self.values)]
        mask = self.mask.new_zeros((spare, capacity))
        if kept and len(index):
            mask[: len(index), shift : shift + kept] = self.mask[source, start : self.length]
        self._all_mask, self.length = mask, kept + shift
        self._view(len(index))
