"""Vision-language models on the embedded engine: images reach the model at prefill, and rows with images decode in
the shared batch exactly as transformers' own ``generate`` decodes them alone (tiny models, float32)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from qubrid_lab.engine.base import GenerationHandle, GenerationRequest, drain
from qubrid_lab.engine.forward import transformers_forward
from qubrid_lab.engine.sampling import SamplingParams
from qubrid_lab.engine.scheduler import BatchScheduler
from qubrid_lab.engine.thread import ModelThread
from qubrid_lab.engine.vision import image_inputs, template_messages
from qubrid_lab.errors import InvalidRequestError
from qubrid_lab.models.catalogue import ModelEntry

TOLERANCE = 1e-4


def picture(kind: str) -> Image.Image:
    """Two images that differ everywhere: a flat red one and a blue-green gradient (odd sizes, so the
    processors resize)."""
    if kind == "red":
        return Image.new("RGB", (40, 30), (220, 30, 30))
    gradient = Image.linear_gradient("L").resize((50, 70))
    return Image.merge("RGB", (Image.new("L", (50, 70), 0), gradient, gradient.transpose(Image.FLIP_TOP_BOTTOM)))


def question(text: str = "What is in the picture?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
                {"type": "text", "text": text},
            ],
        }
    ]


@pytest.fixture(scope="module")
def vision_engines(tiny_vision_dirs, tmp_path_factory):
    from qubrid_lab.engine.local import LocalChatEngine

    cache = tmp_path_factory.mktemp("vision-cache")
    engines = {
        family: LocalChatEngine(
            ModelEntry(f"tiny-{family}", "chat", f"dir:{path}"), cache_dir=cache, device="cpu", dtype="float32"
        )
        for family, path in tiny_vision_dirs.items()
    }
    yield engines
    for engine in engines.values():
        engine.close()


async def _tokens(engine, request: GenerationRequest) -> tuple[list, int]:
    run = await engine.start(request)
    try:
        entries = [entry async for event in run.events() for entry in (event.logprobs or [])]
    finally:
        run.cancel()
    return entries, run.prompt_tokens


def reply(engine, messages: list[dict], images: list | None, max_tokens: int = 8, top: int = 0):
    """One greedy reply: its tokens' logprob entries and the prompt's token count."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=top)
    return asyncio.run(_tokens(engine, GenerationRequest(params, messages=messages, images=images)))


def reference(engine, messages: list[dict], images: list | None, max_tokens: int = 8) -> tuple[Reply, torch.Tensor]:
    """transformers alone on the same model and prompt: the greedy reply, and the first step's logprobs."""
    processor, model = engine.processor, engine.model
    owner = processor if processor.chat_template else processor.tokenizer
    text = owner.apply_chat_template(template_messages(messages), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        first = torch.log_softmax(model(**inputs).logits[0, -1].float(), dim=-1)
    return generated(model, engine.scheduler.eos_ids, max_tokens, **inputs), first


class Reply(list):
    """A greedy reply as (token id, logprob) pairs; equal to another when the tokens are the same and the
    logprobs agree within TOLERANCE (so a shifted position or a wrong cache shows even where the argmax holds)."""

    def __eq__(self, other):
        return len(self) == len(other) and all(
            a[0] == b[0] and abs(a[1] - b[1]) <= TOLERANCE for a, b in zip(self, other)
        )


def generated(model, eos: set[int], max_tokens: int = 8, **inputs) -> Reply:
    """transformers' own greedy generate: each new token with its logprob (the end-of-sequence token left out)."""
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return Reply(
        (token, float(torch.log_softmax(logits[0].float(), dim=-1)[token]))
        for token, logits in zip(tokens, out.logits)
        if token not in eos
    )


def test_two_images_give_different_logits(vision_engines):
    engine = vision_engines["llava"]
    firsts = {}
    for kind in ("red", "gradient"):
        entries, _ = reply(engine, question(), [picture(kind)], max_tokens=1, top=5)
        _, expected = reference(engine, question(), [picture(kind)], max_tokens=1)
        top_values, top_ids = expected.topk(5)
        assert [raw for _, raw, _ in entries[0].top] == [engine.scheduler.texts.bytes_of(i) for i in top_ids.tolist()]
        assert [lp for *_, lp in entries[0].top] == pytest.approx(top_values.tolist(), abs=TOLERANCE)
        firsts[kind] = expected
    assert (firsts["red"] - firsts["gradient"]).abs().max() > 1e-3  # the image changed what the model predicts


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_image_rows_decode_in_the_batch_as_generate_does_alone(vision_engines, family):
    """An image request and a text request decode together (rows of different lengths, padded); each reply is
    the one transformers' generate gives for it alone."""
    engine = vision_engines[family]
    text_only = [{"role": "user", "content": "Tell me something."}]

    async def together():
        return await asyncio.gather(
            _tokens(
                engine,
                GenerationRequest(
                    SamplingParams(temperature=0.0, max_tokens=8, logprobs=0),
                    messages=question(),
                    images=[picture("gradient")],
                ),
            ),
            _tokens(
                engine, GenerationRequest(SamplingParams(temperature=0.0, max_tokens=8, logprobs=0), messages=text_only)
            ),
        )

    (with_image, image_prompt), (plain, _) = asyncio.run(together())
    expected, _ = reference(engine, question(), [picture("gradient")])
    assert [(entry.token_id, entry.logprob) for entry in with_image] == expected
    assert [(entry.token_id, entry.logprob) for entry in plain] == reference(engine, text_only, None)[0]
    assert image_prompt > len(engine.encode_chat([{"role": "user", "content": "What is in the picture?"}]))


def test_the_prompt_counts_each_images_tokens(vision_engines):
    engine = vision_engines["llava"]  # 32x32 pixels in 8x8 patches: 16 tokens per image
    _, one = reply(engine, question(), [picture("red")], max_tokens=1)
    two = [{"role": "user", "content": question()[0]["content"] + question()[0]["content"][:1]}]
    _, both = reply(engine, two, [picture("red"), picture("gradient")], max_tokens=1)
    assert both - one == 16


def test_multimodal_rotary_positions_decode_as_generate_does():
    """The Qwen2-VL family places image tokens on a grid: the prompt's positions come from the model and every
    later one is shifted per row. Decoded beside a text row, the reply is generate's."""
    from tests.conftest import _train_tokenizer
    from tests.vision_models import QWEN_IMAGE, build_qwen2_vl

    tokenizer = _train_tokenizer()
    model, image_processor = build_qwen2_vl(tokenizer)
    pixels = dict(image_processor(images=[picture("gradient")], return_tensors="pt"))
    placeholders = int(pixels["image_grid_thw"].prod()) // 4  # 2x2 patches merge into one token
    text = (
        f"<|im_start|>user\n{QWEN_IMAGE.replace('<|image_pad|>', '<|image_pad|>' * placeholders)}"
        "Describe it.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    tensors = {**pixels, "mm_token_type_ids": (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()}
    inputs = image_inputs(model, ids, tensors)
    assert inputs.positions.shape == (3, 1, ids.shape[1]) and inputs.position_offset != 0
    plain = tokenizer(
        "<|im_start|>user\nHello there, how are you?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )["input_ids"]
    eos = {tokenizer.eos_token_id}
    thread = ModelThread("qwen2-vl test")
    scheduler = BatchScheduler(transformers_forward(model), tokenizer, torch.device("cpu"), eos, 8, thread)

    async def decode():
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)
        handles = [
            GenerationHandle(ids[0].tolist(), params, queue, loop, images=inputs),
            GenerationHandle(plain, params, queue, loop, first_index=1),
        ]
        for handle in handles:
            handle.max_new_tokens = 8
            scheduler.submit(handle)
        replies = {0: [], 1: []}
        async for event in drain(queue, 2):
            replies[event.index] += [(entry.token_id, entry.logprob) for entry in event.logprobs or []]
        return replies

    try:
        replies = asyncio.run(decode())
    finally:
        thread.stop()
    assert replies[0] == generated(model, eos, input_ids=ids, **tensors)
    assert replies[1] == generated(model, eos, input_ids=torch.tensor([plain]))


def test_text_only_models_refuse_images_and_a_wrong_vision_key(chat_engine, tiny_model_dir, tmp_path):
    from qubrid_lab.engine.local import LocalChatEngine

    assert chat_engine.vision is False
    with pytest.raises(InvalidRequestError, match="reads text only"):
        chat_engine.encode_vision_chat(question(), None, [picture("red")])
    with pytest.raises(InvalidRequestError, match="vision: true"):
        LocalChatEngine(
            ModelEntry("not-vision", "chat", f"dir:{tiny_model_dir}", vision=True),
            cache_dir=tmp_path,
            device="cpu",
            dtype="float32",
        )


def test_vision_models_know_it(vision_engines):
    assert all(engine.vision for engine in vision_engines.values())
    assert vision_engines["llava"].precision_choice.how == "set"
