"""Log probabilities of chosen tokens (and, for ``echo``, of prompt tokens), with their most likely rivals.

They come from the model's raw distribution: the log-softmax of its logits before penalties, temperature and
``top_p`` (vLLM's default, "raw logprobs"). They say how likely the model found a token, not how likely this
request's sampler was to pick it, so they are the same for a greedy and a sampled request. Only rows that ask
pay for them: one log-softmax and one top-k over those rows' logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat's top_logprobs (text completions' logprobs: 5)


@dataclass
class TokenLogprob:
    """One token's id, text, exact bytes (part of a character when the tokenizer split one), log probability,
    and the ``top`` most likely tokens at its position as (text, bytes, logprob), best first."""

    token_id: int
    text: str
    token_bytes: bytes
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: list[tuple[str, bytes, float]]


class TokenTexts:
    """Each token id's bytes, read from llguidance's view of the tokenizer (it knows byte-level BPE,
    SentencePiece byte fallback and special tokens alike), built on first use and cached per id."""

    def __init__(self, hf_tokenizer, vocab_size: int | None = None, eos_ids: set[int] | None = None):
        self._hf = hf_tokenizer
        self._vocab_size, self._eos = vocab_size, sorted(eos_ids) if eos_ids else None
        self._ll = None
        self._bytes: dict[int, bytes] = {}

    @property
    def ll_tokenizer(self):
        """llguidance's tokenizer, as wide as the model's logits and ending on its end-of-sequence tokens (what
        grammars are compiled against); about 0.5 s to build for a 49k-token vocabulary."""
        if self._ll is None:
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size, eos_token=self._eos)
        return self._ll

    def bytes_of(self, token_id: int) -> bytes:
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = self.ll_tokenizer.decode_bytes([token_id])
        return found

    def text_of(self, token_id: int) -> str:
        """The token as text; bytes that are part of a character are written as ``\\xNN`` escapes (as OpenAI)."""
        return self.bytes_of(token_id).decode("utf-8", errors="backslashreplace")

    def logprob(self, text: str, token_id: int, logprob: float | None, top: list[tuple[int, float]]) -> TokenLogprob:
        return TokenLogprob(
            token_id, text, self.bytes_of(token_id), logprob, [(self.text_of(i), self.bytes_of(i), lp) for i, lp in top]
        )


def chosen_logprobs(
    logits: torch.Tensor, rows: list[int], tokens: list[int], top: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row index in ``rows`` of ``logits`` (``[rows, vocab]``): the log probability of its token in
    ``tokens`` (indexed like ``rows``) and the ``top`` most likely token ids with theirs."""
    index = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if not top:
        return [(lp, []) for lp in chosen]
    values, ids = logprobs.topk(top, dim=-1)
    return [(lp, list(zip(i, v))) for lp, i, v in zip(chosen, ids.tolist(), values.tolist())]


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each prompt token after the first, given the ones before it: ``logits`` holds every position's
    (``[positions, vocab]``), position i predicting token i + 1."""
    return chosen_logprobs(logits[:-1], list(range(len(ids) - 1)), ids[1:], top)
