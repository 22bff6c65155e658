"""Choosing the next token for every row of a batch, each row with its own sampling parameters.

Penalties follow OpenAI's definition: ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``,
where ``count`` is how often the token already appears in that row's generated text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Per-sequence decoding settings, already validated by the wire protocol."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no log probabilities; k: the chosen token's and its k best rivals'
    echo_logprobs: bool = False  # the prompt's own tokens' log probabilities too (text completions' echo)
    grammar: str | None = None  # an llguidance grammar the output must match (structured outputs); None: free

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RowSampler:
    """Sampling state of one sequence: its generator (seeded or not) and its token counts for penalties."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device, seed_offset: int = 0):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed + seed_offset)
            else:
                self.generator.seed()
        self.counts: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def observe(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1


def sample_next(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    """Pick one token per row of ``logits`` (``[rows, vocab]``) honouring each row's parameters."""
    logits = logits.to(torch.float32, copy=True)
    penalised = [i for i, row in enumerate(rows) if row.counts is not None]
    if penalised:
        index = torch.tensor(penalised, device=logits.device)
        counts = torch.stack([rows[i].counts for i in penalised])
        frequency = torch.tensor([rows[i].params.frequency_penalty for i in penalised], device=logits.device)
        presence = torch.tensor([rows[i].params.presence_penalty for i in penalised], device=logits.device)
        logits[index] -= frequency[:, None] * counts + presence[:, None] * (counts > 0).float()

    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device)
        probs = torch.softmax(logits[index] / temperature[:, None], dim=-1)
        if any(rows[i].params.top_p < 1.0 for i in sampled):
            top_p = torch.tensor([rows[i].params.top_p for i in sampled], device=logits.device)
            probs = _nucleus(probs, top_p)
        # each row draws from its own generator; the draws stay on the device, read back once with the rest
        draws = [torch.multinomial(probs[slot], 1, generator=rows[i].generator) for slot, i in enumerate(sampled)]
        chosen = chosen.index_copy(0, index, torch.cat(draws))
    chosen = chosen.tolist()  # the one point where the host waits for the device
    for row, token in zip(rows, chosen):
        row.observe(token)
    return chosen


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose mass reaches ``top_p`` (always one)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p[:, None]] = 0.0
    sorted_probs[:, 0] = torch.where(sorted_probs[:, 0] > 0, sorted_probs[:, 0], 1.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
