"""The keys/values of recent prompts, found again by their tokens.

A prompt that begins like one seen before prefills only what follows the common part: a conversation's next
turn (its history was the last turn's prompt), the same request sent again, or a new conversation under a
system block already seen. Any start of a cached prompt is reusable, to the token, as a position's keys and
values depend on the tokens before it only. vLLM's prefix cache shares whole blocks (128 tokens on its CPU
build), so a prompt shorter than a block finds nothing there; here prompts are kept whole, and a lookup
compares a new prompt's tokens with each entry's (a handful of byte comparisons per entry: :func:`_common`).

Entries are per LoRA adapter (an adapter on the attention's projections changes the keys and values), held
within a byte budget, least recently used dropped first. A reused prefix was computed in a pass of a
different size than the rest of the prompt, so the rest can differ from a whole prefill in the last bits;
``tests/engine/test_accuracy.py`` bounds that against fp32 as it does every other engine path.
"""

from __future__ import annotations

import array
import collections
from dataclasses import dataclass

import torch

from qubrid_lab.engine.kv import PrefillKV

MIN_REUSED_TOKENS = 8  # a shorter common start saves less than slicing and joining the cached tensors costs
DEFAULT_BYTES = 32 * 1024 * 1024  # SmolLM2 in fp32: ~700 tokens (46 KiB each)


@dataclass
class _Entry:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    size: int


def _tokens(ids: list[int]) -> bytes:
    return array.array("q", ids).tobytes()


def _common(a: bytes, b: bytes) -> int:
    """How many leading tokens ``a`` and ``b`` (as :func:`_tokens`) share: a binary search over slices."""
    low, high = 0, min(len(a), len(b)) // 8
    view_a, view_b = memoryview(a), memoryview(b)
    while low < high:
        middle = (low + high + 1) // 2
        if view_a[: middle * 8] == view_b[: middle * 8]:
            low = middle
        else:
            high = middle - 1
    return low


class PromptCache:
    """Prompts' keys/values by adapter and tokens, within ``max_bytes`` (0 keeps nothing)."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple[str | None, bytes], _Entry] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to the cache

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, adapter: str | None, ids: list[int]) -> tuple[int, PrefillKV | None]:
        """The longest cached start of ``ids`` short of its last token (whose logits the prefill must give),
        with its keys/values: ``(length, kv)``, or ``(0, None)`` when none reaches :data:`MIN_REUSED_TOKENS`."""
        probe = _tokens(ids[:-1])
        best, found = 0, None
        for key in self._entries:
            if key[0] == adapter and key[1][:8] == probe[:8]:
                length = _common(key[1], probe)
                if length > best:
                    best, found = length, key
        if found is None or best < MIN_REUSED_TOKENS:
            self.misses += 1
            return 0, None
        self.hits += 1
        self.reused_tokens += best
        self._entries.move_to_end(found)
        entry = self._entries[found]
        return best, PrefillKV([k[..., :best, :] for k in entry.keys], [v[..., :best, :] for v in entry.values])

    def put(self, adapter: str | None, ids: list[int], prefill: PrefillKV) -> None:
        """Keep a prompt's keys/values (``[1, heads, len(ids), head_dim]`` per layer). An entry the prompt
        extends is dropped (this one covers it); a prompt an entry already covers is not kept twice."""
        if self.max_bytes <= 0 or len(ids) < MIN_REUSED_TOKENS:
            return
        tokens = _tokens(ids)
        for key in list(self._entries):
            if key[0] != adapter:
                continue
            if key[1].startswith(tokens):
                self._entries.move_to_end(key)
                return
            if tokens.startswith(key[1]):
                self._drop(key)
        keys = [k.contiguous() for k in prefill.keys]  # not a view holding a larger buffer alive
        values = [v.contiguous() for v in prefill.values]
        size = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if size > self.max_bytes:
            return
        self._entries[(adapter, tokens)] = _Entry(keys, values, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def forget(self, adapter: str) -> None:
        """Drop an adapter's entries (it was unloaded, or replaced under the same name)."""
        for key in [key for key in self._entries if key[0] == adapter]:
            self._drop(key)

    def _drop(self, key: tuple[str | None, bytes]) -> None:
        self.bytes -= self._entries.pop(key).size
