"""Log probabilities on the wire: chat's ``logprobs.content`` and text completions' legacy arrays."""

from __future__ import annotations

from pydantic import Field

from qubrid_lab.engine.logprobs import TokenLogprob
from qubrid_lab.server.protocol.common import WireModel


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(WireModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(WireModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """``logprobs`` of a chat choice or chunk: each token with exactly the asked-for number of rivals."""
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.text,
                "logprob": e.logprob,
                "bytes": list(e.token_bytes),
                "top_logprobs": [{"token": text, "logprob": lp, "bytes": list(raw)} for text, raw, lp in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[TokenLogprob] | None, offset: int) -> dict | None:
    """``logprobs`` of a text completion choice or chunk whose text starts at character ``offset`` of the
    choice: as OpenAI's, each position's rivals include the chosen token (so up to logprobs + 1 of them)."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            None if e.logprob is None else {**{text: lp for text, _, lp in e.top}, e.text: e.logprob} for e in entries
        ],
        "text_offset": offsets,
    }
