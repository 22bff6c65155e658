"""Tiny vision-language models built from configs (random weights, nothing downloaded), for the vision tests.

Each pairs a small vision tower with the tiny chat model's 2-layer Llama-sized language model and the tokenizer
trained in ``conftest.py``, plus the image placeholder tokens its family uses. Their text is gibberish; the tests
check mechanics: images reach the model, positions and caches line up with transformers' own ``generate``.

The Qwen2-VL family's processor needs torchvision (for its video half), which PyPI cannot install beside this
CPU build of torch; that model is built without a processor and its tests make the prompt the way the
processor does (image processor for the pixels, one placeholder per merged patch).
"""

from __future__ import annotations

from pathlib import Path

import torch

# A chat template that renders text parts and an image placeholder for each image part (strings as they are).
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _text_config(vocab_size: int, tokenizer) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )


def _quiet_special_tokens(model, tokenizer) -> None:
    """As the tiny chat model: zero output rows for special tokens, so greedy replies run to max_tokens."""
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.all_special_ids] = 0.0


def _save(model, processor, target: Path) -> Path:
    _quiet_special_tokens(model, processor.tokenizer)
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def build_llava(tokenizer, target: Path) -> Path:
    """LLaVA: a CLIP vision tower (32x32 images, 8x8 patches: 16 image tokens) projected into the language model."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE.replace("IMAGE", "<image>"),
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=LlamaConfig(**_text_config(len(processor.tokenizer), tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(11)
    return _save(LlavaForConditionalGeneration(config).eval(), processor, target)


def build_idefics3(tokenizer, target: Path) -> Path:
    """Idefics3 (SmolVLM's architecture): images split into 32x32 tiles plus a global view, 4 tokens each."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>"]}
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}),
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=TEMPLATE.replace("IMAGE", "<image>"),
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        text_config=LlamaConfig(**_text_config(len(processor.tokenizer), tokenizer)).to_dict(),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(12)
    return _save(Idefics3ForConditionalGeneration(config).eval(), processor, target)


def build_qwen2_vl(tokenizer):
    """Qwen2-VL (multimodal rotary positions): ``(model, image_processor)``; 28x28-pixel merged patches."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokens = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    start, image, end, video = map(tokenizer.convert_tokens_to_ids, tokens)
    text = _text_config(len(tokenizer), tokenizer)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}  # sums to head_dim / 2 (16 / 2)
    config = Qwen2VLConfig(
        text_config=text,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_chans=3,
        ),
    )
    torch.manual_seed(13)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    _quiet_special_tokens(model, tokenizer)
    return model, image_processor
