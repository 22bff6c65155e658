"""sample_next / RowSampler / _nucleus: every row of a batch sampled with its own parameters."""

from __future__ import annotations

import torch

from qubrid_lab.engine.sampling import RowSampler, SamplingParams, _nucleus, sample_next

VOCAB = 50
CPU = torch.device("cpu")


def sampler(**params) -> RowSampler:
    return RowSampler(SamplingParams(**params), VOCAB, CPU)


def flat_logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    """Logits close enough to uniform that sampling has plenty of tokens to choose from."""
    return torch.randn((rows, VOCAB), generator=torch.Generator().manual_seed(seed)) * 0.5


def draw(row: RowSampler, logits: torch.Tensor, steps: int) -> list[int]:
    return [sample_next(logits.clone(), [row])[0] for _ in range(steps)]


def test_greedy_rows_pick_the_argmax():
    logits = flat_logits(rows=4, seed=1)
    rows = [sampler(temperature=0.0) for _ in range(4)]
    assert sample_next(logits.clone(), rows) == logits.argmax(dim=-1).tolist()


def test_greedy_rows_own_no_generator():
    assert sampler(temperature=0.0).generator is None
    assert sampler(temperature=0.7).generator is not None


def test_the_same_seed_draws_the_same_tokens():
    logits = flat_logits()
    first = draw(sampler(temperature=1.0, seed=7), logits, 64)
    again = draw(sampler(temperature=1.0, seed=7), logits, 64)
    assert first == again
    assert len(set(first)) > 10  # it really sampled, rather than always taking one token


def test_different_seeds_draw_different_tokens():
    logits = flat_logits()
    assert draw(sampler(temperature=1.0, seed=7), logits, 64) != draw(sampler(temperature=1.0, seed=8), logits, 64)


def test_the_seed_offset_separates_choices_of_one_request():
    logits = flat_logits()
    params = SamplingParams(temperature=1.0, seed=7)
    choices = [draw(RowSampler(params, VOCAB, CPU, seed_offset=i), logits, 32) for i in range(3)]
    assert choices[0] != choices[1] != choices[2] != choices[0]


def test_unseeded_rows_differ_from_each_other():
    logits = flat_logits()
    assert draw(sampler(temperature=1.0), logits, 64) != draw(sampler(temperature=1.0), logits, 64)


def test_a_tiny_top_p_always_takes_the_top_token():
    logits = flat_logits(seed=3)
    top = int(logits.argmax())
    assert set(draw(sampler(temperature=1.0, top_p=1e-6, seed=1), logits, 200)) == {top}


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    row = RowSampler(SamplingParams(temperature=1.0, top_p=0.6, seed=0), 5, CPU)
    drawn = {sample_next(logits.clone(), [row])[0] for _ in range(300)}
    assert drawn == {1, 3}  # 0.4 + 0.3 reaches 0.6; the rest is cut


def test_nucleus_applies_each_rows_own_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.4], [0.1, 0.5, 0.4], [0.1, 0.5, 0.4]])
    kept = _nucleus(probs.clone(), torch.tensor([0.3, 0.8, 1.0]))
    expected = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.5, 0.4], [0.1, 0.5, 0.4]])
    assert torch.allclose(kept, expected)


def test_nucleus_keeps_the_top_token_even_at_zero():
    kept = _nucleus(torch.tensor([[0.2, 0.7, 0.1]]), torch.tensor([0.0]))
    assert kept[0].nonzero().flatten().tolist() == [1]


def greedy_run(steps: int, **penalties) -> list[int]:
    """Greedy choices from a fixed row where token 0 leads token 1 by 0.5 and every other token trails."""
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 0], logits[0, 1] = 2.0, 1.5
    row = sampler(temperature=0.0, **penalties)
    return [sample_next(logits.clone(), [row])[0] for _ in range(steps)]


def test_without_penalties_greedy_repeats_itself():
    assert greedy_run(5) == [0, 0, 0, 0, 0]


def test_frequency_penalty_grows_with_each_repeat():
    # token 0: 2 - count, token 1: 1.5 - count; each repeat costs one more.
    assert greedy_run(5, frequency_penalty=1.0) == [0, 1, 0, 1, 0]


def test_presence_penalty_is_paid_once():
    # after both were used, 0 leads again (2 - 1 > 1.5 - 1) however often it repeats.
    assert greedy_run(5, presence_penalty=1.0) == [0, 1, 0, 0, 0]


def test_a_negative_presence_penalty_favours_used_tokens():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 0], logits[0, 1] = 1.5, 2.0
    row = sampler(temperature=0.0, presence_penalty=-1.0)
    row.observe(0)
    assert sample_next(logits.clone(), [row]) == [0]


def test_rows_of_one_batch_behave_as_if_alone():
    settings = [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 3},
        {"temperature": 0.0, "frequency_penalty": 1.5},
        {"temperature": 0.8, "top_p": 0.5, "seed": 4},
        {"temperature": 1.3, "presence_penalty": 0.7, "seed": 5},
    ]
    steps = 40
    base = flat_logits(rows=len(settings), seed=9)

    together_rows = [sampler(**s) for s in settings]
    together = [sample_next(base.clone(), together_rows) for _ in range(steps)]
    for i, s in enumerate(settings):
        alone = draw(sampler(**s), base[i : i + 1], steps)
        assert [step[i] for step in together] == alone, s


def test_penalties_count_only_the_rows_own_tokens():
    logits = torch.full((2, VOCAB), -5.0)
    logits[:, 0], logits[:, 1] = 2.0, 1.5
    penalised, plain = sampler(temperature=0.0, frequency_penalty=1.0), sampler(temperature=0.0)
    picks = [sample_next(logits.clone(), [penalised, plain]) for _ in range(3)]
    assert picks == [[0, 0], [1, 0], [0, 0]]


def test_penalties_leave_the_callers_logits_alone():
    logits = flat_logits()
    before = logits.clone()
    row = sampler(temperature=0.0, frequency_penalty=1.0, presence_penalty=1.0)
    for _ in range(3):
        sample_next(logits, [row])
    assert torch.equal(logits, before)
