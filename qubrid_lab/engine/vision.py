"""Vision-language models on the embedded engine: loading them, and the prompt inputs images add.

A vision-language model (LLaVA, SmolVLM/Idefics3, the Qwen2-VL family, ...) loads with transformers'
image-text-to-text classes and its own processor, which renders the chat template with image placeholders,
expands each placeholder into the image's tokens, and turns each image into the tensors its vision tower reads.
Its language model decodes in the same continuous batch as any causal LM: images enter only at prefill, where
the processor's tensors go to the model's forward with the prompt.

Models with multimodal rotary positions (the Qwen2-VL family, found by their ``get_rope_index``) place an
image's tokens on a grid, so their prompt's positions are computed here at prefill and every later position is
shifted by the prompt's offset (its "rope delta"); the scheduler keeps that offset per row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qubrid_lab.engine.forward import transformers_forward
from qubrid_lab.models.device import Precision, quantize, release_freed_memory


def is_vision_model(config_dir: str) -> bool:
    """Whether the model in ``config_dir`` reads images (its config has a vision tower)."""
    config = Path(config_dir) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())


@dataclass
class ImageInputs:
    """What a prompt's images add to its prefill: the processor's tensors, and for models with multimodal
    rotary positions, the prompt's positions and the offset of every position after it."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: torch.Tensor | None = None
    position_offset: int = 0

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: tensor.to(device) for name, tensor in self.tensors.items()}


def load_vision_lm(location: str, precision: Precision, device: torch.device):
    """``(processor, model, forward)`` for a vision-language model in ``precision`` on ``device``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(location)
    model = AutoModelForImageTextToText.from_pretrained(
        location, dtype=precision.load_dtype, attn_implementation="sdpa"
    )
    model.to(device).eval()
    forward = transformers_forward(model)
    model = quantize(model, precision)
    release_freed_memory(model)
    return processor, model, forward


def template_messages(messages: list[dict]) -> list[dict]:
    """``messages`` as a processor's chat template takes them: each ``image_url`` part a bare image placeholder
    (the images themselves go to the processor in the same order)."""
    rendered = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image"} if part["type"] == "image_url" else {"type": "text", "text": part["text"]}
                for part in content
            ]
        rendered.append({**message, "content": content})
    return rendered


def render(processor, messages: list[dict], tools: list[dict] | None) -> str:
    """The conversation as prompt text, through the processor's chat template (the tokenizer's when it has none)."""
    owner = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    return owner.apply_chat_template(
        template_messages(messages), tools=tools, add_generation_prompt=True, tokenize=False
    )


def encode(processor, model, text: str, images: list) -> tuple[list[int], ImageInputs]:
    """Token ids of ``text`` with each image placeholder expanded, and what the images add to the prefill."""
    wants_types = rope_index(model) is not None  # multimodal positions need each token's kind (text or image)
    batch = processor(
        text=[text],
        images=images,
        return_tensors="pt",
        add_special_tokens=False,
        **({"return_mm_token_type_ids": True} if wants_types else {}),
    )
    ids = batch.pop("input_ids")
    batch.pop("attention_mask", None)
    return ids[0].tolist(), image_inputs(model, ids, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})


def rope_index(model):
    """The model's multimodal rotary position function (the Qwen2-VL family's ``get_rope_index``), or None."""
    return getattr(getattr(model, "model", None), "get_rope_index", None)


def image_inputs(model, ids: torch.Tensor, tensors: dict[str, torch.Tensor]) -> ImageInputs:
    """What the processor's ``tensors`` for the prompt ``ids`` (``[1, length]``) add to its prefill."""
    inputs = ImageInputs(tensors)
    positions_of = rope_index(model)
    if positions_of is not None and "image_grid_thw" in tensors:
        positions, deltas = positions_of(
            ids, mm_token_type_ids=tensors["mm_token_type_ids"], image_grid_thw=tensors["image_grid_thw"]
        )
        inputs.positions, inputs.position_offset = positions, int(deltas.flatten()[0])
    return inputs
