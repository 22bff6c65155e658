"""Continuous batching for one causal LM: requests join and leave the running batch between decode steps.

Why not transformers' ``ContinuousBatchingManager``: its per-request logits processors cover temperature,
top-k and top-p only, so presence/frequency penalties and per-request seeds (both in the platform's API) cannot
be honoured, and its paged-attention path is built for GPUs; on a 2-core CPU plain batched SDPA over a right-
aligned cache (:mod:`qubrid_lab.engine.kv`) is faster. See ``benchmarks/README.md`` for the measurements.

The model's thread (:mod:`qubrid_lab.engine.thread`, shared by every model on the device) runs one step
at a time, so other models' work (embeddings) interleaves between decode steps. Each step:
  1. drops rows whose client went away,
  2. prefills waiting requests, packed into one pass where it can (each from the keys/values of the longest
     start it shares with a recent prompt: :mod:`.prompt_cache`), and merges them into the batch,
  3. runs one decode step for every row (on a GPU, replayed from a CUDA graph: :mod:`.cuda_graphs`) and
     samples each row with its own parameters,
  4. streams text deltas (with the log probabilities of their tokens, for rows that ask) and retires
     finished rows.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import threading
import time
from dataclasses import dataclass

import torch

from qubrid_lab.engine.base import Delta, Failure, Finish, GenerationHandle
from qubrid_lab.engine.cuda_graphs import graphed_decode
from qubrid_lab.engine.detokenize import TextAssembler
from qubrid_lab.engine.forward import Forward
from qubrid_lab.engine.kv import BatchKV, PackedPrefillKV, PrefillKV
from qubrid_lab.engine.logprobs import TokenLogprob, TokenTexts, chosen_logprobs, prompt_logprobs
from qubrid_lab.engine.lora import LoraSet
from qubrid_lab.engine.prompt_cache import DEFAULT_BYTES, PromptCache
from qubrid_lab.engine.sampling import RowSampler, sample_next
from qubrid_lab.engine.structured import advance, constrain
from qubrid_lab.engine.thread import ModelThread

log = logging.getLogger(__name__)

MAX_PREFILL_TOKENS = 4096  # bounds how long running rows wait while newcomers are prefilled
MAX_PACKED_TOKENS = 1024  # per packed prefill pass: its attention mask and scores grow with the square of it


@dataclass
class _Row:
    handle: GenerationHandle
    index: int
    adapter: str | None
    sampler: RowSampler
    text: TextAssembler
    next_token: int = -1
    generated: int = 0
    done: bool = False
    matcher: object | None = None  # structured outputs: the llguidance matcher its tokens must satisfy
    # with logprobs asked for: tokens decoded but not yet sent, as (start, end) in the row's text and logprob
    pending: list[tuple[int, int, TokenLogprob]] | None = None
    decoded: int = 0  # characters of text the row's tokens have produced
    position_offset: int = 0  # added to every decode position (a multimodal-rope prompt's images shift them)
    released: int = 0  # characters of it sent

    def taken_logprobs(self, sent: str, final: bool) -> list[TokenLogprob] | None:
        """The pending tokens the text sent so far covers. At the end, every one (a token of an unfinished
        character included), except after a stop string: the tokens the sent text begins in (the one the stop
        string cut included). Never the end-of-sequence token."""
        if self.pending is None:
            return None
        self.released += len(sent)
        taken = 0
        for start, end, _ in self.pending:
            if final and not self.text.stopped:
                taken = len(self.pending)
                break
            if (start >= self.released) if final else (end > self.released):
                break
            taken += 1
        entries, self.pending = [entry for *_, entry in self.pending[:taken]], self.pending[taken:]
        return entries


def _new_tokens(handle: GenerationHandle) -> int:
    """The prompt tokens a prefill computes: those after its cached shared prefix."""
    return len(handle.prompt_ids) - handle.shared_prefix


class BatchScheduler:
    """Owns a model's forward pass and decodes every submitted request in one shared batch."""

    def __init__(
        self,
        forward: Forward,
        tokenizer,
        device: torch.device,
        eos_ids: set[int],
        max_batch_size: int,
        model_thread: ModelThread,
        lora: LoraSet | None = None,
        vocab_size: int | None = None,
        prompt_cache_bytes: int = DEFAULT_BYTES,
    ):
        self.forward = forward
        self.lora = lora
        self.decoder = copy.deepcopy(tokenizer.backend_tokenizer)  # a private copy: decoding runs on this thread
        self.texts = TokenTexts(tokenizer, vocab_size, eos_ids)
        self.device = device
        self.eos_ids = eos_ids
        self.max_batch_size = max_batch_size
        self._pending: collections.deque[GenerationHandle] = collections.deque()
        self._rows: list[_Row] = []
        self._kv = BatchKV(device)
        self.prompts = PromptCache(prompt_cache_bytes)
        self._lock = threading.Lock()
        self._thread = model_thread
        self._packed = getattr(forward, "packed", None)  # many prompts in one prefill pass, where the forward can
        self.graphs = graphed_decode(forward, device)  # decode steps replayed from CUDA graphs, where they apply
        self.packed_prompts = 0  # prompts prefilled in a packed pass, for the metrics and the tests
        self._scheduled = False  # a step is queued on the model thread
        self._closed = False

    @property
    def active_rows(self) -> int:
        """Rows in the batch plus choices still waiting to join it."""
        with self._lock:
            return len(self._rows) + sum(h.n for h in self._pending if not h.cancelled)

    def active_rows_for(self, adapter: str) -> int:
        """Rows and waiting choices that decode with ``adapter``."""
        with self._lock:
            return sum(1 for r in self._rows if r.adapter == adapter and not r.done) + sum(
                h.n for h in self._pending if h.adapter == adapter and not h.cancelled
            )

    def submit(self, handle: GenerationHandle) -> None:
        with self._lock:
            self._pending.append(handle)
            self._schedule()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _schedule(self) -> None:
        """Queue one step on the model thread unless one is queued already (call with the lock held)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._thread.submit(self._step)

    def _step(self) -> None:
        try:
            with torch.inference_mode():
                self._fail_removed_adapters()
                self._retire(cancelled_only=True)
                self._admit()
                self._retire()  # rows that finished on their first token
                if self._rows:
                    self._decode_step()
                self._retire()
        except Exception as exc:  # a failed step must not stop the scheduler or leave clients waiting
            log.exception("generation step failed")
            self._fail_everything(f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._scheduled = False
                if self._rows or self._pending:
                    self._schedule()

    # 1. drop rows whose client went away or whose fine-tuned model was deleted
    def _adapter_loaded(self, handle: GenerationHandle) -> bool:
        if handle.adapter is None or (self.lora is not None and handle.adapter in self.lora):
            return True
        if not handle.cancelled:
            handle.emit(Failure(f"The model '{handle.adapter}' was deleted while this request was running."))
            handle.cancelled = True
        return False

    def _fail_removed_adapters(self) -> None:
        for row in self._rows:
            self._adapter_loaded(row.handle)

    # 2. prefill
    def _admit(self) -> None:
        """Prefill waiting requests and merge them into the batch.

        Prompts the forward can pack (:meth:`~qubrid_lab.engine.forward.FusedLlama.packed`) are prefilled
        together, one pass per adapter for up to :data:`MAX_PACKED_TOKENS`, with no padding; a prompt that
        wants its own tokens' logprobs or carries images, and every prompt on other forwards, is prefilled alone.
        """
        admitted = self._waiting()
        joined: set[int] = set()
        try:
            alone = [h for h in admitted if not self._packs(h)]
            groups = [[h] for h in alone] + self._packs_of([h for h in admitted if self._packs(h)])
            for group in groups:
                if len(group) == 1:
                    self._join(group[0], *self._prefill(group[0]))
                else:
                    for handle, (prefill, logits) in zip(group, self._prefill_packed(group)):
                        self._join(handle, prefill, logits)
                joined.update(id(h) for h in group)
        except Exception:
            for handle in admitted:
                if id(handle) not in joined:
                    handle.emit(Failure("generation failed while reading the prompt; see the server log"))
            raise

    def _waiting(self) -> list[GenerationHandle]:
        """Take the waiting requests that fit in the batch, up to :data:`MAX_PREFILL_TOKENS` of prompt."""
        taken, rows, tokens = [], len(self._rows), 0
        with self._lock:
            while self._pending and tokens < MAX_PREFILL_TOKENS:
                handle = self._pending[0]
                if not handle.cancelled and rows and rows + handle.n > self.max_batch_size:
                    break
                self._pending.popleft()
                if not handle.cancelled:
                    taken.append(handle)
                    rows += handle.n
                    tokens += len(handle.prompt_ids)
        return [handle for handle in taken if self._adapter_loaded(handle)]

    def _packs(self, handle: GenerationHandle) -> bool:
        return (
            self._packed is not None
            and not handle.params.echo_logprobs
            and handle.images is None
            and _new_tokens(handle) <= MAX_PACKED_TOKENS
        )

    @staticmethod
    def _packs_of(handles: list[GenerationHandle]) -> list[list[GenerationHandle]]:
        """``handles`` in groups of one adapter and at most :data:`MAX_PACKED_TOKENS` new prompt tokens."""
        groups: list[list[GenerationHandle]] = []
        filling: dict[str | None, list[GenerationHandle]] = {}  # per adapter, the group still taking prompts
        for handle in handles:
            group = filling.get(handle.adapter)
            if group is None or sum(map(_new_tokens, group)) + _new_tokens(handle) > MAX_PACKED_TOKENS:
                group = filling[handle.adapter] = []
                groups.append(group)
            group.append(handle)
        return groups

    def _prefix(self, handle: GenerationHandle) -> PrefillKV | None:
        """The keys/values of the prompt's start that need no prefill (call within the handle's adapter): the
        longest start it shares with a cached prompt, else its template block (``handle.shared_prefix``: the
        system block every conversation under that system prompt begins with), prefilled alone and kept, so that
        prompts arriving together share it. Sets ``handle.shared_prefix`` to the length returned."""
        length, cached = self.prompts.longest(handle.adapter, handle.prompt_ids)
        if cached is not None and length >= handle.shared_prefix:
            handle.shared_prefix = handle.cached_tokens = length
            return cached
        split = handle.shared_prefix
        if not split:
            return None
        prefix = PrefillKV()
        ids = torch.tensor([handle.prompt_ids[:split]], dtype=torch.long, device=self.device)
        self.forward(ids, torch.arange(split, device=self.device)[None], prefix, None)
        self.prompts.put(handle.adapter, handle.prompt_ids[:split], prefix)
        return prefix

    def _keep(self, handle: GenerationHandle, prefill: PrefillKV) -> None:
        """Cache a text prompt's keys/values for the prompts that will begin like it."""
        self.prompts.put(handle.adapter, handle.prompt_ids, prefill)

    def _prefill(self, handle: GenerationHandle) -> tuple[PrefillKV, torch.Tensor]:
        """One prompt prefilled alone: its keys/values and its last token's logits ``[1, vocab]``."""
        ids = torch.tensor([handle.prompt_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        echo = handle.params.echo_logprobs
        images = handle.images
        extra = {}
        if images is not None:
            extra = images.to(self.device)
            if images.positions is not None:
                positions = images.positions.to(self.device)
        with self._adapters([handle.adapter]):
            # The prompt's logprobs need every position's logits; an image's placeholder tokens are the same for
            # every image, so a prefix holding one cannot be cached by its token ids.
            prefix = None if echo or images else self._prefix(handle)
            split = handle.shared_prefix if prefix is not None else 0
            prefill = PrefillKV(prefix.keys, prefix.values) if prefix is not None else PrefillKV()
            logits = self.forward(ids[:, split:], positions[..., split:], prefill, None, every_position=echo, **extra)
        if images is None:
            self._keep(handle, prefill)
        if echo:
            handle.prompt_logprobs = self._prompt_logprobs(handle, logits[0])
            logits = logits[:, -1]
        return prefill, logits

    def _prefill_packed(self, handles: list[GenerationHandle]) -> list[tuple[PrefillKV, torch.Tensor]]:
        """Prompts of one adapter prefilled in one packed pass: each one's keys/values and last logits."""
        with self._adapters([handles[0].adapter]):
            prefixes = [self._prefix(handle) for handle in handles]
            ids = [token for handle in handles for token in handle.prompt_ids[handle.shared_prefix :]]
            positions = torch.cat(
                [torch.arange(h.shared_prefix, len(h.prompt_ids), device=self.device) for h in handles]
            )
            kv = PackedPrefillKV([_new_tokens(h) for h in handles], prefixes, self.device)
            logits = self._packed(torch.tensor([ids], dtype=torch.long, device=self.device), positions[None], kv)
        self.packed_prompts += len(handles)
        for handle, prefill in zip(handles, kv.prompts):
            self._keep(handle, prefill)
        return [(prefill, logits[i : i + 1]) for i, prefill in enumerate(kv.prompts)]

    def _join(self, handle: GenerationHandle, prefill: PrefillKV, logits: torch.Tensor) -> None:
        """Add a prefilled prompt's rows to the batch (n choices share the prompt: its cache is copied n times)
        and take each row's first token."""
        prefill.keys = [k.expand(handle.n, -1, -1, -1) for k in prefill.keys]
        prefill.values = [v.expand(handle.n, -1, -1, -1) for v in prefill.values]
        length = len(handle.prompt_ids)
        self._kv.add_rows(prefill, torch.ones((handle.n, length), dtype=torch.long, device=self.device))
        logits = logits.expand(handle.n, -1)
        images = handle.images
        new_rows = [
            _Row(
                handle,
                handle.first_index + i,
                handle.adapter,
                RowSampler(handle.params, logits.shape[-1], self.device, seed_offset=i),
                TextAssembler(self.decoder, handle.params.stop),
                matcher=handle.matchers[i] if handle.matchers else None,
                pending=[] if handle.params.logprobs is not None else None,
                position_offset=images.position_offset if images is not None else 0,
            )
            for i in range(handle.n)
        ]
        self._rows.extend(new_rows)
        self._take_next(logits, new_rows)

    def _take_next(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Sample each row's next token (constrained rows within what their grammar allows next) and accept it,
        with its log probability for rows that asked."""
        tokens = sample_next(constrain(logits, [row.matcher for row in rows]), [row.sampler for row in rows])
        self._accept(rows, tokens, self._logprobs(logits, rows, tokens))

    def _prompt_logprobs(self, handle: GenerationHandle, logits: torch.Tensor) -> list[TokenLogprob]:
        """The prompt's tokens with their log probabilities given the tokens before them (the first: None)."""
        ids, top = handle.prompt_ids, handle.params.logprobs or 0
        text = TextAssembler(self.decoder, [])  # no stop strings: each push returns its token's text
        found = [(None, [])] + prompt_logprobs(logits, ids, top)
        return [
            self.texts.logprob(text.push(token), token, lp, alternatives)
            for token, (lp, alternatives) in zip(ids, found)
        ]

    def _logprobs(self, logits: torch.Tensor, rows: list[_Row], tokens: list[int]) -> list | None:
        """Per row, (logprob, top rivals) of its chosen token when it asked for logprobs, else None."""
        wanted = [i for i, row in enumerate(rows) if row.pending is not None]
        if not wanted:
            return None
        top = max(rows[i].handle.params.logprobs for i in wanted)
        found = chosen_logprobs(logits, wanted, [tokens[i] for i in wanted], top)
        per_row: list = [None] * len(rows)
        for i, (logprob, rivals) in zip(wanted, found):
            per_row[i] = (logprob, rivals[: rows[i].handle.params.logprobs])
        return per_row

    # 3. decode
    def _decode_step(self) -> None:
        mask, positions = self._kv.step_inputs()
        offsets = any(row.position_offset for row in self._rows)
        if offsets:
            positions = positions + torch.tensor([[row.position_offset] for row in self._rows], device=self.device)
        ids = torch.tensor([[row.next_token] for row in self._rows], dtype=torch.long)
        # from page-locked memory, the copy to a GPU is queued without the host waiting for it
        ids = ids.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else ids
        adapters = [row.adapter for row in self._rows]
        if self.graphs is not None and not offsets and not any(adapters):
            logits = self.graphs(ids, positions, self._kv)
        else:
            with self._adapters(adapters):
                logits = self.forward(ids, positions, self._kv, mask)
        self._kv.commit_step()
        self._take_next(logits, self._rows)

    def _adapters(self, rows: list[str | None]):
        """Row i of the next forward passes uses LoRA adapter ``rows[i]`` (None: the base model alone)."""
        if self.lora is None or not any(rows):
            return contextlib.nullcontext()
        return self.lora.rows(rows)

    # 4. stream and retire
    def _accept(self, rows: list[_Row], tokens: list[int], logprobs: list | None = None) -> None:
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(rows, tokens)):
            handle = row.handle
            handle.first_token_at = handle.first_token_at or now
            row.generated += 1
            row.next_token = token
            if token in self.eos_ids:
                self._finish(row, "stop", row.text.flush())
                continue
            delta = row.text.push(token)
            if row.pending is not None:
                piece = row.text.piece
                row.pending.append(
                    (row.decoded, row.decoded + len(piece), self.texts.logprob(piece, token, *logprobs[i]))
                )
                row.decoded += len(piece)
            if row.matcher is not None and advance(row.matcher, token):  # the grammar is complete
                self._finish(row, "stop", delta + row.text.flush())
            elif row.text.stopped:
                self._finish(row, "stop", delta)
            elif row.generated >= handle.max_new_tokens:
                self._finish(row, "length", delta + row.text.flush())
            elif delta:
                handle.emit(Delta(row.index, delta, row.taken_logprobs(delta, final=False)))

    def _finish(self, row: _Row, reason: str, delta: str) -> None:
        row.done = True
        row.handle.emit(Finish(row.index, reason, delta, row.generated, row.taken_logprobs(delta, final=True)))

    def _retire(self, cancelled_only: bool = False) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.handle.cancelled and (cancelled_only or not row.done)]
        if len(keep) != len(self._rows):
            order = self._kv.keep_rows(keep)  # the cache may move rows into the slots of those that left
            self._rows = [self._rows[i] for i in order]

    def _fail_everything(self, message: str) -> None:
        with self._lock:
            handles = {id(r.handle): r.handle for r in self._rows}
            handles.update({id(h): h for h in self._pending})
            self._pending.clear()
        for handle in handles.values():
            handle.emit(Failure(message))
        self._rows = []
        self._kv = BatchKV(self.device)
