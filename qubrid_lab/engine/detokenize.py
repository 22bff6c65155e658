"""Turning a stream of token ids (or of text pieces) into text deltas, cut at the first stop string.

Decoding uses the tokenizers library's ``DecodeStream``, which emits text only once a token completes a
character. Text that might be the start of a stop string is held back until the next token (or piece)
settles it, so a stop string never reaches the client, even when it spans several tokens or pieces.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class StopFilter:
    """Accumulates one sequence's text as it arrives in pieces; ``push_text`` returns the delta safe to send."""

    def __init__(self, stop: list[str]):
        self._stop = [s for s in stop if s]
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def push_text(self, piece: str) -> str:
        """Add text; returns new sendable text. Sets ``stopped`` when a stop string appeared."""
        self._text += piece
        if self._stop:
            # A match can only involve new text plus the held-back tail, which is shorter than any stop string.
            search_from = max(0, self._sent - max(len(s) for s in self._stop))
            cut = min((i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self._text = self._text[:cut]
                self.stopped = True
                return self.flush()
        safe = len(self._text) - self._held_back()
        delta = self._text[self._sent : safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return delta

    def flush(self) -> str:
        """The rest of the text, sent when the sequence ends."""
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class TextAssembler(StopFilter):
    """A sequence's token ids decoded as they come; ``push`` returns the delta that is safe to send."""

    def __init__(self, backend_tokenizer, stop: list[str]):
        super().__init__(stop)
        self._backend = backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self.piece = ""  # the text the last token added (before any stop string cut it)

    def push(self, token: int) -> str:
        """Add a token; returns new sendable text. Sets ``stopped`` when a stop string appeared."""
        self.piece = self._stream.step(self._backend, token) or ""
        return self.push_text(self.piece)
