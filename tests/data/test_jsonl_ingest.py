"""JSONL chat datasets (OpenAI's format): what is read, and every rejection naming its line."""

from __future__ import annotations

import json

import pytest

from qubrid_lab.data.csv_ingest import DatasetError
from qubrid_lab.data.dataset_files import inspect_dataset, read_dataset
from qubrid_lab.data.jsonl_ingest import read_conversations


def conversation(*turns, **extra) -> str:
    return json.dumps(
        {
            "messages": [dict(zip(("role", "content"), turn)) if isinstance(turn, tuple) else turn for turn in turns],
            **extra,
        }
    )


def write(tmp_path, *lines: str, name: str = "chats.jsonl", prefix: bytes = b"") -> object:
    path = tmp_path / name
    path.write_bytes(prefix + "\n".join(lines).encode())
    return path


def test_conversations_are_read_with_text_content_and_weights(tmp_path):
    path = write(
        tmp_path,
        conversation(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
        "",
        conversation(
            ("user", "Two?"),
            {"role": "assistant", "content": "One.", "weight": 0},
            ("user", "Again?"),
            {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
        ),
        prefix=b"\xef\xbb\xbf",
    )
    rows = read_dataset(path)
    assert len(rows) == 2 and inspect_dataset(path, "chats.jsonl").columns == ["messages"]
    assert rows[0]["messages"] == [
        {"role": "system", "content": "Be brief.", "weight": 1},
        {"role": "user", "content": "Hi", "weight": 1},
        {"role": "assistant", "content": "Hello!", "weight": 1},
    ]
    assert [m["weight"] for m in rows[1]["messages"]] == [1, 0, 1, 1] and rows[1]["messages"][3]["content"] == "Two."


@pytest.mark.parametrize(
    "lines, words",
    [
        (['{"messages": [}'], ["Line 1", "not valid JSON"]),
        ([conversation(("user", "a"), ("assistant", "b")), '{"prompt": "x"}'], ["Line 2", "no 'messages' list"]),
        ([conversation(("user", "a"))], ["Line 1", "no assistant message"]),
        ([conversation(("user", "a"), {"role": "assistant", "content": "b", "weight": 0})], ["no assistant message"]),
        ([conversation(("user", "a"), ("tool", "b"))], ["messages[1]", "tool calls are not supported"]),
        ([conversation(("user", "a"), {"role": "assistant", "content": "b", "weight": 2})], ["weight must be 0 or 1"]),
        (
            [conversation({"role": "user", "content": "a", "weight": 0}, ("assistant", "b"))],
            ["assistant messages only"],
        ),
        ([conversation(("user", "a"), ("assistant", "b"), tools=[])], ["tool and function definitions"]),
        ([conversation(("user", 5), ("assistant", "b"))], ["messages[0]", "content must be text"]),
        ([], ["no conversations"]),
    ],
)
def test_a_bad_file_is_refused_naming_the_line(tmp_path, lines, words):
    with pytest.raises(DatasetError) as refused:
        read_conversations(write(tmp_path, *lines))
    assert all(word in refused.value.message for word in words), refused.value.message


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(conversation(("user", "a"), ("assistant", "b")).encode() + b'\n{"messages": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match="Line 2 is not UTF-8"):
        read_conversations(path)


def test_only_csv_and_jsonl_names_are_accepted(tmp_path):
    with pytest.raises(DatasetError, match=r"neither \.csv nor \.jsonl"):
        inspect_dataset(write(tmp_path, "x", name="chats.json"), "chats.json")
