"""Sampling contracts: greedy, seeds independent of the batch, filters, logprobs."""

from __future__ import annotations

import torch

from shoal.worker.sampler import SamplingBatch, inverse_cdf, sample, skip_draws

VOCAB = 100


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _batch(rows: int, **fields) -> SamplingBatch:
    defaults = {
        "temperature": [1.0] * rows, "top_k": [0] * rows, "top_p": [1.0] * rows,
        "min_p": [0.0] * rows, "generators": [None] * rows, "num_logprobs": [None] * rows,
    }  # fmt: skip
    return SamplingBatch(**{**defaults, **fields})


def _draw(logits: torch.Tensor, batch: SamplingBatch, seed: int = 0) -> list[int]:
    return sample(logits.clone(), batch, torch.Generator().manual_seed(seed))[0]


def test_greedy_is_argmax_and_first_on_ties() -> None:
    logits = _logits(4)
    logits[3] = 0.0
    logits[3, [5, 9]] = 1.0
    ids = _draw(logits, _batch(4, temperature=[0.0] * 4))
    assert ids == logits.argmax(-1).tolist() and ids[3] == 5


def test_seeded_row_ignores_batch_composition_and_position() -> None:
    row = _logits(1, seed=7)[0]

    def run(others: int, position: int, seed: int) -> list[int]:
        tokens = []
        gen = torch.Generator().manual_seed(1234)
        for step in range(5):
            logits = _logits(others + 1, seed=100 + step + others)
            logits[position] = row
            gens: list[torch.Generator | None] = [None] * (others + 1)
            gens[position] = gen
            temps = [0.0 if i % 2 else 1.0 for i in range(others + 1)]
            temps[position] = 1.0
            tokens.append(
                _draw(logits, _batch(others + 1, generators=gens, temperature=temps), seed)[
                    position
                ]
            )
        return tokens

    alone = run(0, 0, seed=0)
    assert run(5, 3, seed=1) == alone
    assert run(2, 2, seed=2) == alone
    assert len(set(alone)) > 1  # actually random


def _support(logits: torch.Tensor, draws: int = 3000, **fields) -> set[int]:
    batch = _batch(draws, **{k: [v] * draws for k, v in fields.items()})
    return set(_draw(logits.expand(draws, VOCAB).clone(), batch))


def test_top_k_top_p_min_p_restrict_support() -> None:
    logits = _logits(1, seed=3)[0]
    order = logits.argsort(descending=True).tolist()
    assert _support(logits, top_k=3) == set(order[:3])
    probs = logits.softmax(-1)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.7).sum()) + 1])
    assert _support(logits, top_p=0.7) == nucleus
    assert _support(logits, top_p=0.7, top_k=2) == set(order[:2])
    above = {i for i in range(VOCAB) if probs[i] >= 0.2 * probs.max()}
    assert _support(logits, min_p=0.2) == above
    # Temperature flattens before min-p: more tokens pass.
    assert _support(logits, min_p=0.2, temperature=3.0) > above


def test_banned_tokens_never_drawn() -> None:
    logits = _logits(2)
    top = logits.argmax(-1).tolist()
    batch = _batch(2, temperature=[0.0, 1.0], banned=[(0, top[0]), (1, top[1])])
    for seed in range(20):
        ids = _draw(logits, batch, seed)
        assert ids[0] == logits[0].topk(2).indices[1] and ids[1] != top[1]


def test_logprobs_are_raw_with_ranks_and_top_alternatives() -> None:
    logits = _logits(3)
    raw = logits.log_softmax(-1)
    batch = _batch(
        3, temperature=[0.0, 0.5, 2.0], num_logprobs=[0, 5, None], top_k=[0, 4, 0],
    )  # fmt: skip
    ids, entries = sample(logits.clone(), batch, torch.Generator().manual_seed(0))
    assert entries[2] is None
    token, logprob, rank, top_ids, top_values = entries[0]
    assert token == ids[0] == raw[0].argmax() and rank == 1 and top_ids == top_values == []
    assert abs(logprob - raw[0].max().item()) < 1e-6
    token, logprob, rank, top_ids, top_values = entries[1]
    assert token == ids[1]
    assert abs(logprob - raw[1, token].item()) < 1e-6  # not the temperature-scaled one
    assert rank == int((raw[1] > raw[1, token]).sum()) + 1 and 1 <= rank <= 4
    assert top_ids == raw[1].topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor(top_values), raw[1].topk(5).values)


def test_draws_follow_the_distribution() -> None:
    """20,000 rows of one distribution: each token's share within 1.5% of its probability
    (about 5 standard deviations: the draw is seeded, so this never flakes), and a token
    without mass never drawn."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(20000, 5).clone()
    batch = _batch(20000)
    ids = torch.tensor(sample(logits, batch, torch.Generator().manual_seed(3))[0])
    share = torch.bincount(ids, minlength=5).double() / len(ids)
    assert share[4] == 0
    assert torch.allclose(share, probs.double(), atol=0.015), share


def test_inverse_cdf_edges_land_on_tokens_with_mass() -> None:
    """u = 0 picks the first token with mass; the largest u below 1 the last one, even with
    zero-mass tokens after it and a row whose sum is not 1."""
    probs = torch.tensor([[0.0, 0.0, 0.6, 0.4, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0, 0.0, 0.0]])
    below_one = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0).double())
    assert inverse_cdf(probs, torch.zeros(2, dtype=torch.float64)).tolist() == [2, 1]
    assert inverse_cdf(probs, below_one.expand(2).clone()).tolist() == [3, 3]
    # Halfway through the second row's mass (3.0 in all) is the boundary of token 1 (2.0).
    assert inverse_cdf(probs[1:], torch.tensor([0.5], dtype=torch.float64)).tolist() == [1]
    assert inverse_cdf(probs[1:], torch.tensor([0.7], dtype=torch.float64)).tolist() == [3]


def test_a_seeded_row_resumes_after_skip_draws() -> None:
    """`skip_draws` takes from a row's generator what sampled tokens took: a generator
    advanced past 3 tokens continues the sequence (a resumed request)."""
    row = _logits(1, seed=11)
    gen_a = torch.Generator().manual_seed(99)
    tokens = [_draw(row, _batch(1, generators=[gen_a]))[0] for _ in range(6)]
    gen_b = torch.Generator().manual_seed(99)
    skip_draws(gen_b, 3, torch.device("cpu"))
    assert [_draw(row, _batch(1, generators=[gen_b]))[0] for _ in range(3)] == tokens[3:]
