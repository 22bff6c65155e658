"""TextAssembler: token ids in, text deltas out, cut before the first stop string."""

from __future__ import annotations

import pytest

from qubrid_lab.engine.detokenize import TextAssembler

REPLACEMENT = "\ufffd"


def stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextAssembler]:
    """Push ``text``'s tokens one by one until the assembler stops; returns every delta, flush included."""
    assembler = TextAssembler(tokenizer.backend_tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        deltas.append(assembler.push(token))
        if assembler.stopped:
            break
    deltas.append(assembler.flush())
    return deltas, assembler


def spans_tokens(tokenizer, text: str, needle: str) -> bool:
    """True when no single token of ``text`` holds the whole of ``needle``."""
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(text, add_special_tokens=False)]
    return needle in text and not any(needle in piece for piece in pieces)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you today?",
        "def add(a, b):\n    return a + b\n",
        "café au lait, naïve, 日本語",
    ],
)
def test_deltas_add_up_to_the_decoded_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    deltas, assembler = stream(tiny_tokenizer, text, stop=[])
    assert "".join(deltas) == tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert assembler.text == text
    assert not assembler.stopped


def test_special_tokens_are_not_part_of_the_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Hello<|im_end|> world", add_special_tokens=False)
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assembler = TextAssembler(tiny_tokenizer.backend_tokenizer, [])
    text = "".join(assembler.push(t) for t in ids) + assembler.flush()
    assert text == "Hello world"


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("Hello, world! How are you today?", "world! How"),
        ("The quick brown fox jumps over the lazy dog.", "fox jumps"),
        ("Numbers like 1, 2, 3, 42 and 2024 appear.", "42 and 20"),
    ],
)
def test_a_stop_string_across_tokens_is_never_sent(tiny_tokenizer, text, stop):
    assert spans_tokens(tiny_tokenizer, text, stop), "the case must put the stop string across tokens"
    deltas, assembler = stream(tiny_tokenizer, text, [stop])
    assert assembler.stopped
    assert all(stop not in delta for delta in deltas)
    assert "".join(deltas) == text[: text.index(stop)]
    assert assembler.text == text[: text.index(stop)]


def test_text_that_may_begin_a_stop_string_is_held_back(tiny_tokenizer):
    text, stop = "Hello, world! How are you today?", "world! How"
    assembler = TextAssembler(tiny_tokenizer.backend_tokenizer, [stop])
    sent = ""
    for token in tiny_tokenizer.encode(text, add_special_tokens=False):
        sent += assembler.push(token)
        if assembler.stopped:
            break
        assert text.startswith(sent)
        assert not any(sent.endswith(stop[:size]) for size in range(1, len(stop))), sent
    assert sent == "Hello, "


def test_the_earliest_of_several_stop_strings_wins(tiny_tokenizer):
    text = "The capital of France is Paris; the capital of Japan is Tokyo."
    deltas, assembler = stream(tiny_tokenizer, text, ["Tokyo", "is Par", "never there"])
    assert assembler.stopped
    assert "".join(deltas) == "The capital of France "


def test_text_that_only_starts_like_a_stop_string_is_released(tiny_tokenizer):
    text = "Hello, world! How are you today?"
    deltas, assembler = stream(tiny_tokenizer, text, ["world? No", "How is"])
    assert not assembler.stopped
    assert "".join(deltas) == text
    # The held-back prefix is released by the token that rules the stop string out, not only at the end.
    assert "".join(deltas[:-1]).startswith("Hello, world! How are")


def test_a_stop_string_at_the_very_start_leaves_no_text(tiny_tokenizer):
    deltas, assembler = stream(tiny_tokenizer, "Hello, world!", ["Hello"])
    assert assembler.stopped
    assert "".join(deltas) == ""


def test_empty_stop_strings_are_ignored(tiny_tokenizer):
    text = "Hello, world!"
    deltas, assembler = stream(tiny_tokenizer, text, [""])
    assert not assembler.stopped
    assert "".join(deltas) == text


@pytest.mark.parametrize("text", ["café", "naïve résumé", "日本", "日本語 and é"])
def test_multibyte_characters_are_never_sent_broken(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert any(REPLACEMENT in tiny_tokenizer.decode([t]) for t in ids), "the case must split a character"
    deltas, _ = stream(tiny_tokenizer, text, [])
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_a_multibyte_stop_string_cuts_cleanly(tiny_tokenizer):
    text = "café 日本語 naïve"
    deltas, assembler = stream(tiny_tokenizer, text, ["日本"])
    assert assembler.stopped
    assert all(REPLACEMENT not in delta and "日" not in delta for delta in deltas)
    assert "".join(deltas) == "café "
