"""The embedded backends: causal LMs and sentence embedders run in this process with transformers.

A model is loaded and run on one "model thread" (see :mod:`qubrid_lab.engine.thread` for why); the server
gives all its models the same one, so their work interleaves instead of competing for the CPU cores.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from qubrid_lab.engine.auto_precision import PrecisionChoice, choose_precision
from qubrid_lab.engine.base import GenerationHandle, GenerationRequest, GenerationRun, start_local
from qubrid_lab.engine.forward import load_causal_lm
from qubrid_lab.engine.lora import LoraSet
from qubrid_lab.engine.prompt_cache import DEFAULT_BYTES
from qubrid_lab.engine.scheduler import BatchScheduler
from qubrid_lab.engine.structured import matchers
from qubrid_lab.engine.thread import ModelThread
from qubrid_lab.engine.vision import encode, is_vision_model, load_vision_lm, render
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.catalogue import ModelEntry
from qubrid_lab.models.device import Precision, pick_device, pick_precision, precision_candidates
from qubrid_lab.models.loading import TRAINED_TEMPLATE_FILE, registered_at, weights_location
from qubrid_lab.models.packed_linear import bound_kernel_caches

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 8  # shorter shared prefixes save less than the extra forward pass costs
MAX_TEMPLATE_PREFIXES = 64


def _config_dir(location: str) -> str:
    if Path(location).is_dir():
        return location
    from transformers.utils import cached_file

    return str(Path(cached_file(location, "config.json")).parent)


def checked_ids(ids: list[int], vocabulary: int, model_id: str, field: str) -> list[int]:
    """``ids`` when every one is a token of a ``vocabulary``-token model; else a 400 naming the first that is not."""
    outside = next((i for i, token in enumerate(ids) if not 0 <= token < vocabulary), None)
    if outside is not None:
        raise InvalidRequestError(
            f"{field}[{outside}] is token id {ids[outside]}, outside model '{model_id}''s "
            f"vocabulary (ids 0 to {vocabulary - 1}).",
            param=field,
        )
    return ids


class LocalChatEngine:
    """A causal LM loaded with transformers and served through the continuous-batching scheduler."""

    def __init__(
        self,
        entry: ModelEntry,
        cache_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_tokens_cap: int | None = None,
        fused: bool = True,
        thread: ModelThread | None = None,
        prompt_cache_bytes: int = DEFAULT_BYTES,
    ):
        bound_kernel_caches()  # in a process of its own (a notebook's), before its first product
        self.model_id = entry.id
        self.entry = entry
        self.device = pick_device(device)
        explicit = None if dtype == "auto" else pick_precision(dtype, self.device)  # a bad name fails before loading
        self.max_tokens_cap = max_tokens_cap
        self._own_thread = thread is None
        self._thread = thread or ModelThread(f"model:{entry.id}")
        self._encode_lock = threading.Lock()
        self._template_prefixes: collections.OrderedDict[str | None, tuple[int, ...]] = collections.OrderedDict()
        started = time.perf_counter()
        self.processor = None  # a vision model's processor (images, and the chat template it renders them with)
        self.tokenizer, self.model, forward, self.created, self.precision_choice = self._thread.submit(
            self._load, cache_dir, explicit, fused
        ).result()
        self.vision = self.processor is not None
        self.precision: Precision = self.precision_choice.precision
        self.lora = LoraSet(self.model)
        self.context_length = int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 2048))
        generation_eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_ids = set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        eos_ids.add(self.tokenizer.eos_token_id)
        eos_ids.discard(None)
        self.scheduler = BatchScheduler(
            forward,
            self.tokenizer,
            self.device,
            eos_ids,
            max_batch_size,
            self._thread,
            self.lora,
            vocab_size=self.model.config.get_text_config().vocab_size,
            prompt_cache_bytes=prompt_cache_bytes,
        )
        self._thread.submit(lambda: self.scheduler.texts.ll_tokenizer).result()  # built now, not on a request
        log.info(
            "loaded %s on %s in %s, in %.1fs",
            entry.id,
            self.device,
            self.precision_choice.summary(),
            time.perf_counter() - started,
        )

    def _load(self, cache_dir: Path, explicit: Precision | None, fused: bool):
        from transformers import AutoTokenizer

        location = weights_location(self.entry, cache_dir)
        config_dir = _config_dir(location)
        if is_vision_model(config_dir):
            return self._load_vision(location, config_dir, explicit)
        if self.entry.vision:
            raise InvalidRequestError(
                f"Model '{self.model_id}' is marked vision: true, but its config has no "
                "vision tower (vision_config): it reads text only. Remove the key."
            )
        tokenizer = AutoTokenizer.from_pretrained(location)
        if tokenizer.chat_template is None:
            raise InvalidRequestError(f"Model '{self.model_id}' has no chat template; it cannot serve chat.")
        if explicit is None:  # measured here, on the model thread, where the model will run
            choice = choose_precision(location, Path(config_dir), tokenizer, self.device, cache_dir, fused)
        else:
            choice = PrecisionChoice(explicit, "set")
        model, forward = load_causal_lm(location, choice.precision, self.device, fused)
        return tokenizer, model, forward, registered_at(config_dir), choice

    def _load_vision(self, location: str, config_dir: str, explicit: Precision | None):
        """A vision-language model. ``dtype auto`` serves it in the device's default precision: the accuracy
        measurement behind auto decodes text with causal LMs only."""
        choice = (
            PrecisionChoice(explicit, "set")
            if explicit
            else PrecisionChoice(precision_candidates(self.device)[0], "default (vision models are not measured)")
        )
        processor, model, forward = load_vision_lm(location, choice.precision, self.device)
        if not (processor.chat_template or processor.tokenizer.chat_template):
            raise InvalidRequestError(f"Model '{self.model_id}' has no chat template; it cannot serve chat.")
        self.processor = processor
        return processor.tokenizer, model, forward, registered_at(config_dir), choice

    def _render(
        self, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None
    ) -> list[int]:
        if self.processor is not None:
            return self.tokenizer.encode(render(self.processor, messages, tools), add_special_tokens=False)
        return list(
            self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                chat_template=chat_template,
            )
        )

    @property
    def native_tools(self) -> bool:
        """Whether the chat template renders tools itself (else the fallback prompt describes them)."""
        return "tools" in (self.tokenizer.chat_template or "")

    def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None
    ) -> list[int]:
        """Token ids of the conversation rendered by the model's own chat template (or ``chat_template``, a
        fine-tune's), ready for the reply."""
        with self._encode_lock:
            ids = self._render(messages, tools, chat_template)
            if chat_template is None:  # the learned prefixes are the model's own template's
                self._learn_template_prefix(messages)
            return ids

    def encode_vision_chat(self, messages: list[dict], tools: list[dict] | None, images: list) -> tuple:
        """A conversation holding images: its token ids (each image's placeholder expanded) and what the images
        add to its prefill (:class:`~qubrid_lab.engine.vision.ImageInputs`)."""
        if self.processor is None:
            raise InvalidRequestError(
                f"Model '{self.model_id}' reads text only; send text parts only, or use a vision model.",
                param="messages",
            )
        with self._encode_lock:
            return encode(self.processor, self.model, render(self.processor, messages, tools), images)

    def _learn_template_prefix(self, messages: list[dict]) -> None:
        """Remember what the template renders before the first non-system message's content.

        That block (the system prompt, given or the template's default, and the next turn's header) starts
        every conversation with the same system message, so its keys/values are computed once and reused
        (:mod:`~qubrid_lab.engine.prompt_cache`). It is found by rendering the conversation's system
        part with two different probe messages and keeping the tokens the two renderings share.
        """
        system = [m for m in messages[:1] if m.get("role") == "system"]
        key = str(system[0].get("content")) if system else None
        if key in self._template_prefixes:
            self._template_prefixes.move_to_end(key)
            return
        probes = [self._render(system + [{"role": "user", "content": text}]) for text in ("A", "Z")]
        shared = 0
        while shared < min(map(len, probes)) and probes[0][shared] == probes[1][shared]:
            shared += 1
        self._template_prefixes[key] = tuple(probes[0][:shared])
        while len(self._template_prefixes) > MAX_TEMPLATE_PREFIXES:
            self._template_prefixes.popitem(last=False)

    def _shared_prefix(self, ids: list[int]) -> int:
        """Length of the longest known template prefix ``ids`` starts with and continues past (0: none)."""
        with self._encode_lock:
            prefixes = list(self._template_prefixes.values())
        best = 0
        for prefix in prefixes:
            if (
                MIN_SHARED_PREFIX <= len(prefix) < len(ids)
                and len(prefix) > best
                and tuple(ids[: len(prefix)]) == prefix
            ):
                best = len(prefix)
        return best

    def encode_text(self, prompt: str) -> list[int]:
        with self._encode_lock:
            return self.tokenizer.encode(prompt, add_special_tokens=True)

    def checked_ids(self, ids: list[int], field: str) -> list[int]:
        """A prompt sent as token ids, each within the vocabulary."""
        return checked_ids(
            ids, min(len(self.tokenizer), self.model.config.get_text_config().vocab_size), self.model_id, field
        )

    def decode(self, ids: list[int]) -> str:
        with self._encode_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def start(self, request: GenerationRequest) -> GenerationRun:
        return start_local(self, request)

    def submit(self, handle: GenerationHandle) -> None:
        """Queue a request; ``handle.max_new_tokens`` is set from its params, the context and the server cap."""
        if not handle.prompt_ids:
            raise InvalidRequestError("The prompt is empty; it needs at least one token.", param=handle.prompt_field)
        room = self.context_length - len(handle.prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"The prompt is {len(handle.prompt_ids)} tokens; model '{self.model_id}' holds at most "
                f"{self.context_length} tokens in all. Shorten the prompt.",
                param=handle.prompt_field,
            )
        wanted = handle.params.max_tokens or self.max_tokens_cap or room
        if wanted > room:
            if handle.params.max_tokens:
                raise InvalidRequestError(
                    f"max_tokens is {wanted} but the prompt already takes {len(handle.prompt_ids)} of the model's "
                    f"{self.context_length} tokens: at most {room} can be generated.",
                    param="max_tokens",
                )
            wanted = room
        handle.max_new_tokens = wanted
        handle.shared_prefix = self._shared_prefix(handle.prompt_ids)
        if handle.params.grammar is not None:
            handle.matchers = matchers(self.scheduler.texts, handle.params.grammar, handle.n, self.model_id)
        self.scheduler.submit(handle)

    @property
    def active_sequences(self) -> int:
        """Sequences decoding or waiting for a slot."""
        return self.scheduler.active_rows

    def add_adapter(self, name: str, adapter_dir: Path) -> None:
        """Load a peft LoRA adapter trained on this model; requests whose handle names it decode with it."""

        def load() -> None:
            self.scheduler.prompts.forget(name)  # a name loaded again may hold other weights
            self.lora.load(name, Path(adapter_dir))

        self._thread.submit(load).result()

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; requests still using it fail on the next step, saying the model was deleted."""

        def remove() -> None:
            self.lora.remove(name)
            self.scheduler.prompts.forget(name)

        self._thread.submit(remove).result()

    def fine_tuned(self, model_id: str, adapter_dir: Path, created: int) -> FineTunedChat:
        """The fine-tuned model ``model_id``: this engine decoding with the LoRA adapter in ``adapter_dir``."""
        return FineTunedChat(model_id, self, adapter_dir, created)

    def close(self) -> None:
        self.scheduler.close()
        if self._own_thread:
            self._thread.stop()


def _trained_template(model_id: str, base: LocalChatEngine, adapter_dir: Path) -> str | None:
    """The chat template an adapter was trained with, when it is not the base model's current one (else None:
    the base's own is used). Saved by training beside the adapter; adapters from elsewhere have none."""
    saved = adapter_dir / TRAINED_TEMPLATE_FILE
    if not saved.is_file() or base.processor is not None:
        return None
    template = saved.read_text()
    if template == base.tokenizer.chat_template:
        return None
    log.warning(
        "%s was trained with a chat template other than %s's current one; its prompts are rendered with "
        "the one it was trained with (%s)",
        model_id,
        base.model_id,
        saved,
    )
    return template


class FineTunedChat:
    """A fine-tuned model: its base model's engine, decoding with the job's LoRA adapter.

    It shares the base's weights, batch and model thread; its rows and the base's decode side by side.
    """

    def __init__(self, model_id: str, base: LocalChatEngine, adapter_dir: Path, created: int):
        self.model_id = model_id
        self.base = base
        self.entry = ModelEntry(
            model_id, "chat", f"dir:{adapter_dir}", owned_by="user", description=f"LoRA fine-tune of {base.model_id}"
        )
        self.created = created
        self.context_length = base.context_length
        self.chat_template = _trained_template(model_id, base, Path(adapter_dir))
        base.add_adapter(model_id, adapter_dir)

    @property
    def native_tools(self) -> bool:
        return "tools" in (self.chat_template or self.base.tokenizer.chat_template or "")

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.base.encode_chat(messages, tools, self.chat_template)

    def encode_text(self, prompt: str) -> list[int]:
        return self.base.encode_text(prompt)

    def checked_ids(self, ids: list[int], field: str) -> list[int]:
        return self.base.checked_ids(ids, field)

    def decode(self, ids: list[int]) -> str:
        return self.base.decode(ids)

    async def start(self, request: GenerationRequest) -> GenerationRun:
        return start_local(self, request)

    def submit(self, handle: GenerationHandle) -> None:
        handle.adapter = self.model_id
        self.base.submit(handle)

    @property
    def active_sequences(self) -> int:
        return self.base.scheduler.active_rows_for(self.model_id)

    def close(self) -> None:
        self.base.remove_adapter(self.model_id)


class LocalEmbeddingEngine:
    """A sentence-transformers model; each request's inputs are embedded in one batch, L2-normalised."""

    def __init__(self, entry: ModelEntry, cache_dir: Path, device: str = "auto", thread: ModelThread | None = None):
        self.model_id = entry.id
        self.entry = entry
        self.device = pick_device(device)
        self._own_thread = thread is None
        self._thread = thread or ModelThread(f"model:{entry.id}")
        self.model, self.created = self._thread.submit(self._load, cache_dir).result()
        self.max_input_tokens = int(self.model.max_seq_length)

    def _load(self, cache_dir: Path):
        from sentence_transformers import SentenceTransformer

        location = weights_location(self.entry, cache_dir)
        return SentenceTransformer(location, device=str(self.device)), registered_at(_config_dir(location))

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        # All outputs per input, so the tokens are counted from the attention masks of the one tokenization
        # (a second tokenizer pass just to count made each request about 10% slower).
        with torch.inference_mode():
            outputs = self.model.encode(texts, batch_size=64, output_value=None)
            vectors = torch.stack([output["sentence_embedding"] for output in outputs]).float()
            tokens = sum(int(output["attention_mask"].sum()) for output in outputs)
        return torch.nn.functional.normalize(vectors, p=2, dim=1).numpy(), tokens

    def _embed_ids(self, inputs: list[list[int]]) -> tuple[np.ndarray, int]:
        """Inputs sent as token ids go to the model as they are (no special tokens added), cut to its limit."""
        rows = [ids[: self.max_input_tokens] for ids in inputs]
        width = max(map(len, rows))
        pad = self.model.tokenizer.pad_token_id or 0
        features = {
            "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        }
        if "token_type_ids" in self.model.tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode():
            features = {name: tensor.to(self.device) for name, tensor in features.items()}
            vectors = self.model(features)["sentence_embedding"].float().cpu()
        return torch.nn.functional.normalize(vectors, p=2, dim=1).numpy(), sum(map(len, rows))

    async def embed(self, inputs: list[str | list[int]]) -> tuple[np.ndarray, int]:
        """Embeddings of ``inputs`` (texts, or token ids; float32, one row each) and how many tokens they took
        (after truncation to the model's limit)."""
        if isinstance(inputs[0], str):
            return await asyncio.wrap_future(self._thread.submit(self._embed, inputs))
        vocabulary = len(self.model.tokenizer)
        for i, ids in enumerate(inputs):
            checked_ids(ids, vocabulary, self.model_id, f"input[{i}]" if len(inputs) > 1 else "input")
        return await asyncio.wrap_future(self._thread.submit(self._embed_ids, inputs))

    def close(self) -> None:
        if self._own_thread:
            self._thread.stop()
