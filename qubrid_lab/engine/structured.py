"""Constrained decoding: rows whose output must match a grammar (structured outputs) decode in the same batch
as free rows, each step masking the tokens its grammar forbids.

Grammars are llguidance's (JSON schemas compile to them; ``server/protocol/response_format.py``). Each
constrained choice has its own matcher, advanced by every token it takes; a row whose grammar is complete
(nothing but the end of the sequence may follow) finishes with ``stop``. Free rows pay nothing.
"""

from __future__ import annotations

import logging

import torch

from qubrid_lab.engine.logprobs import TokenTexts
from qubrid_lab.errors import InvalidRequestError

log = logging.getLogger(__name__)

ANY_OBJECT = {"type": "object"}
# compact JSON: a small model left free to add whitespace can spend its whole budget on newlines
GRAMMAR_DEFAULTS = {"whitespace_flexible": False}


def json_grammar(schema: dict, strict: bool) -> str:
    """The llguidance grammar for JSON valid against ``schema``; ValueError saying why when it cannot be."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(
            schema, defaults=GRAMMAR_DEFAULTS, overrides=None if strict else {"lenient": True}
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the schema cannot be used: {exc}") from exc
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(
            f"the schema cannot be enforced: {problem}"
            + (" (strict mode enforces every keyword; leave strict unset to ignore those it cannot)" if strict else "")
        )
    return grammar


def matchers(texts: TokenTexts, grammar: str, n: int, model_id: str):
    """One matcher per choice for ``grammar``; a grammar this model's tokenizer cannot serve is a 400."""
    from llguidance import LLMatcher

    found = [LLMatcher(texts.ll_tokenizer, grammar) for _ in range(n)]
    if found[0].is_error():
        raise InvalidRequestError(
            f"response_format cannot be enforced for model '{model_id}': {found[0].get_error()}",
            param="response_format",
        )
    return found


def constrain(logits: torch.Tensor, row_matchers: list) -> torch.Tensor:
    """``logits`` with every row's forbidden tokens at -inf (a copy; unchanged when no row is constrained)."""
    constrained = [i for i, matcher in enumerate(row_matchers) if matcher is not None]
    if not constrained:
        return logits
    from llguidance.torch import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

    index = torch.tensor(constrained, device=logits.device)
    rows = logits[index].float()
    mask = allocate_token_bitmask(len(constrained), rows.shape[-1])
    for slot, i in enumerate(constrained):
        fill_next_token_bitmask(row_matchers[i], mask, slot)
    apply_token_bitmask_inplace(rows, mask.to(rows.device))
    masked = logits.float().clone()
    masked[index] = rows
    return masked


def advance(matcher, token: int) -> bool:
    """Feed the row's chosen token to its matcher; True when the grammar is complete."""
    if not matcher.consume_token(token):
        log.warning("a constrained row took token %d, which its grammar refused: %s", token, matcher.get_error())
        return True
    return matcher.is_stopped()
