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
    """Key/value buffers ``[rows, heads, capacity, head_dim]`` per layer, plus a ``[rows, capacity]`` mask."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.length = 0  # columns in use; every row's last real token sits in column length - 1
        # Each row's real tokens, kept on the host too: whether a step needs its mask, and which columns only
        # pad, are then known without waiting for the device.
        self.row_lengths: list[int] = []

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
            self._reallocate(torch.arange(self.rows, device=self.device), 0, max(2 * self.capacity, 64))
        positions = self.mask[:, : self.length].sum(dim=1, keepdim=True)
        self.mask[:, self.length] = 1
        padded = any(length != self.length for length in self.row_lengths)
        return self.mask[:, : self.length + 1] if padded else None, positions

    def commit_step(self) -> None:
        self.length += 1
        self.row_lengths = [length + 1 for length in self.row_lengths]

    def add_rows(self, prefill: PrefillKV, mask: torch.Tensor) -> None:
        """Append the rows of a prefilled, left-padded cache whose padding is given by ``mask``."""
        new_len = mask.shape[1]
        added_lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        if not self.keys:
            self.keys = [k.contiguous() for k in prefill.keys]
            self.values = [v.contiguous() for v in prefill.values]
            self.mask = mask.clone()
            self.length = new_len
            self.row_lengths = added_lengths
            self._reallocate(torch.arange(self.rows, device=self.device), 0, new_len + 64)
            return
        length = max(self.length, new_len)
        capacity = max(self.capacity, length + 64)
        old_rows, added = self.rows, mask.shape[0]
        keys, values = [], []
        for i in range(len(self.keys)):
            for source, old, target in (
                (prefill.keys[i], self.keys[i], keys),
                (prefill.values[i], self.values[i], values),
            ):
                heads, head_dim = old.shape[1], old.shape[3]
                merged = torch.zeros((old_rows + added, heads, capacity, head_dim), dtype=old.dtype, device=self.device)
                merged[:old_rows, :, length - self.length : length] = old[:, :, : self.length]
                merged[old_rows:, :, length - new_len : length] = source
                target.append(merged)
        merged_mask = torch.zeros((old_rows + added, capacity), dtype=torch.long, device=self.device)
        merged_mask[:old_rows, length - self.length : length] = self.mask[:, : self.length]
        merged_mask[old_rows:, length - new_len : length] = mask
        self.keys, self.values, self.mask, self.length = keys, values, merged_mask, length
        self.row_lengths = self.row_lengths + added_lengths

    def keep_rows(self, keep: list[int]) -> None:
        """Drop every row not in ``keep`` (in that order) and the columns that only padded them."""
        if not keep:
            self.keys, self.values, self.length, self.row_lengths = [], [], 0, []
            self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
            return
        self.row_lengths = [self.row_lengths[i] for i in keep]
        start = self.length - max(self.row_lengths)
        self._reallocate(torch.tensor(keep, dtype=torch.long, device=self.device), start, self.capacity)

    def _reallocate(self, index: torch.Tensor, start: int, capacity: int) -> None:
        """Copy rows ``index`` and columns ``[start, length)`` into fresh buffers of ``capacity`` columns."""
        kept = self.length - start
        capacity = max(capacity, kept + 1)

        def copy(buffer: torch.Tensor) -> torch.Tensor:
            fresh = buffer.new_zeros((len(index), buffer.shape[1], capacity, buffer.shape[3]))
            fresh[:, :, :kept] = buffer[index, :, start : self.length]
            return fresh

        self.keys = [copy(k) for k in self.keys]
        self.values = [copy(v) for v in self.values]
        mask = self.mask.new_zeros((len(index), capacity))
        mask[:, :kept] = self.mask[index, start : self.length]
        self.mask, self.length = mask, kept
