"""Shared fixtures: an isolated environment and a tiny chat model built from scratch (nothing is downloaded).

The tiny model is a 2-layer Llama with random weights and a byte-level BPE tokenizer trained here on a few
sentences. Its text is gibberish; the tests built on it check mechanics (batching, stop strings, limits,
the wire format), never quality.
"""

from __future__ import annotations

import os

# huggingface_hub reads these once, when it is first imported (during collection), so they are set here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "A tiny model answers every question with random words.",
    "Stop strings end a completion before they are shown to anyone.",
    "Continuous batching lets requests join and leave between decode steps.",
    "The capital of France is Paris; the capital of Japan is Tokyo.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text too.",
    "def add(a, b):\n    return a + b\n",
    "Users ask, assistants answer, and systems set the rules.",
    "Streaming sends each new piece of text as soon as it is ready.",
]


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """No test reads or writes ~/.qubrid_lab, sees the developer's API keys, or reaches the Hub."""
    home = tmp_path_factory.mktemp("qubrid_lab_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setenv("QUBRID_LAB_HOME", str(home))
        for name in ("QUBRID_LAB_API_KEYS", "QUBRID_LAB_API_KEY_FILE", "QUBRID_LAB_MODELS"):
            patch.delenv(name, raising=False)
        yield home


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """The tiny model's matrices are too small to split across cores; with two OpenMP threads on a busy
    2-core machine a batched decode step was 20-30x slower (threads spin while the other core is taken)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A transformers directory holding the tiny chat model and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = _train_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    # Random weights would now and then pick a special token and end a reply early; a zero row in the
    # output head gives those tokens a logit below the best one at every step, so greedy replies always
    # run to max_tokens and tests can count on their length.
    with torch.no_grad():
        for token in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 0.0
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = pad
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, loaded the way the engine loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model in float32, for tests that drive it directly (no engine, no scheduler thread)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def engine_factory(tiny_model_dir, tmp_path_factory):
    """Builds ``LocalChatEngine``s on the tiny model (CPU); every engine built is closed at the end."""
    from qubrid_lab.engine.local import LocalChatEngine
    from qubrid_lab.models.catalogue import ModelEntry

    engines = []
    cache_dir = tmp_path_factory.mktemp("model-cache")

    def build(model_id: str = "tiny-chat", dtype: str = "float32", **options) -> LocalChatEngine:
        entry = ModelEntry(model_id, "chat", f"dir:{tiny_model_dir}", owned_by="tests")
        engine = LocalChatEngine(entry, cache_dir=cache_dir, device="cpu", dtype=dtype, **options)
        engines.append(engine)
        return engine

    build.cache_dir = cache_dir
    yield build
    for engine in engines:
        engine.close()


@pytest.fixture(scope="session")
def chat_engine(engine_factory):
    """One float32 engine shared by the tests that only read from it."""
    return engine_factory()


@pytest.fixture(scope="session")
def tiny_vision_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny vision-language models (see ``tests/vision_models.py``) as transformers directories, by family."""
    from tests.vision_models import build_idefics3, build_llava

    return {
        "llava": build_llava(_train_tokenizer(), tmp_path_factory.mktemp("tiny-llava")),
        "idefics3": build_idefics3(_train_tokenizer(), tmp_path_factory.mktemp("tiny-idefics3")),
    }


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a transformers directory (converted once, cached across runs)."""
    from tests.smollm2 import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_served(smollm2_dir):
    """``served(label)``: SmolLM2 loaded as the engine serves it in that precision (float32, bfloat16,
    float16, int8), as ``(model, forward)``; each is loaded once per session."""
    from qubrid_lab.engine.forward import load_causal_lm
    from qubrid_lab.models.device import Precision

    loaded = {}

    def served(label: str):
        if label not in loaded:
            loaded[label] = load_causal_lm(str(smollm2_dir), Precision.from_label(label), torch.device("cpu"))
        return loaded[label]

    return served


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_dir):
    """``plain(dtype)``: SmolLM2 as plain transformers loads it (its own forward, nothing fused), once each."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def plain(dtype: torch.dtype):
        if dtype not in loaded:
            loaded[dtype] = AutoModelForCausalLM.from_pretrained(
                smollm2_dir, dtype=dtype, attn_implementation="sdpa"
            ).eval()
        return loaded[dtype]

    return plain


@pytest.fixture(scope="session")
def checked_answers(smollm2_served, smollm2_tokenizer):
    """The prompts whose answers the end-to-end tests check, once each is confirmed to win by a clear margin.

    Served through the engine's forward in every precision listed for it, the greedy answer must contain the
    expected word, and every token on the way must lead its runner-up by ``MIN_ANSWER_MARGIN`` nats, so no
    precision, batch or machine can flip it.
    """
    from tests.smollm2 import ANSWERS_BY_PRECISION, CAPITAL_CHAT, CAPITAL_TEXT, MIN_ANSWER_MARGIN, greedy_answer

    for label, answers in ANSWERS_BY_PRECISION.items():
        _, forward = smollm2_served(label)
        for answer in answers:
            text, margin = greedy_answer(forward, smollm2_tokenizer, answer.ids(smollm2_tokenizer), answer.expected)
            assert answer.expected in text and margin >= MIN_ANSWER_MARGIN, (
                f"{label}: {answer} answered {text!r} with a smallest lead of {margin:.2f} nats; "
                f"pick a prompt whose answer wins by {MIN_ANSWER_MARGIN} or more"
            )
    return {"chat": CAPITAL_CHAT, "text": CAPITAL_TEXT}
