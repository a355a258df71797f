"""Sampling on fixed logits: which tokens each filter keeps, the distribution it samples from, and seeds.

Each filter is checked two ways: the exact distribution handed to the draw (captured at `sampling.draw`,
the inverse-CDF step), and many seeded draws that must stay inside the kept set and reach every token in it.
A request's draws advance with its output tokens (the draw for token n hashes (seed, n)), so the helpers
append every sampled token to the request, as the engine does.
"""

from __future__ import annotations

import math

import pytest
import torch

from piggyback_runtime import sampling
from piggyback_runtime.request import Request, SamplingParams

# Eight tokens with distinct logits; ranked by logit: 3 > 6 > 0 > 5 > 1 > 7 > 2 > 4.
LOGITS = torch.tensor([2.0, 0.5, -1.0, 4.0, -2.0, 1.0, 3.0, 0.0])
RANKED = [3, 6, 0, 5, 1, 7, 2, 4]
DRAWS = 2_000


def _request(seed: int | None = 0, **params: float | int) -> Request:
    return Request("r", "chat", "LS", [1], SamplingParams(seed=seed, **params))  # type: ignore[arg-type]


def _draws(logits: torch.Tensor, n: int = DRAWS, **params: float | int) -> list[int]:
    request = _request(seed=1234, **params)  # one seeded request: the draws are the same on every run
    return [_sample_and_append(logits[None], [request])[0] for _ in range(n)]


def _sample_and_append(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    tokens = sampling.sample(logits, requests)
    for request, token in zip(requests, tokens, strict=True):
        request.output_token_ids.append(token)
    return tokens


def _distribution(logits: torch.Tensor, monkeypatch: pytest.MonkeyPatch, **params: float | int) -> torch.Tensor:
    """The probabilities the sampler draws from (normalised), captured at sampling.draw."""
    seen: list[torch.Tensor] = []
    real = sampling.draw

    def spy(kept_probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        seen.append(kept_probs.clone())
        return real(kept_probs, uniform)

    monkeypatch.setattr(sampling, "draw", spy)
    sampling.sample(logits[None], [_request(**params)])
    assert len(seen) == 1
    return (seen[0] / seen[0].sum())[0]


def _probs_of(logits: list[float]) -> list[float]:
    return torch.softmax(torch.tensor(logits), -1).tolist()


@pytest.mark.slow  # seconds: thousands of draws for a statistical test
@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_keeps_exactly_the_k_highest_logits(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = set(RANKED[:k])
    draws = _draws(LOGITS, top_k=k)
    assert set(draws) == kept, f"top_k={k} must sample every one of {sorted(kept)} and nothing else"
    # The kept tokens keep their relative probabilities (renormalised softmax over the kept logits).
    probs = _distribution(LOGITS, monkeypatch, top_k=k)
    expected = torch.zeros(len(LOGITS))
    expected[sorted(kept)] = torch.tensor(_probs_of([float(LOGITS[i]) for i in sorted(kept)]))
    torch.testing.assert_close(probs, expected)


def test_top_k_at_or_above_the_vocabulary_is_no_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in (len(LOGITS), len(LOGITS) + 5):
        torch.testing.assert_close(_distribution(LOGITS, monkeypatch, top_k=k), torch.softmax(LOGITS, -1))


# Probabilities 0.4, 0.3, 0.2, 0.1 (the logits are their logs): cumulative 0.4, 0.7, 0.9, 1.0. Each top_p
# below sits strictly between two cumulative sums, so keeping one token too many or too few is visible.
TOP_P_PROBS = [0.1, 0.4, 0.2, 0.3]  # ids 1 > 3 > 2 > 0
TOP_P_LOGITS = torch.tensor(TOP_P_PROBS).log()


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.35, {1}),  # 0.4 already reaches 0.35
        (0.45, {1, 3}),  # 0.4 < 0.45 <= 0.7
        (0.69, {1, 3}),
        (0.71, {1, 3, 2}),  # 0.7 < 0.71 <= 0.9
        (0.95, {1, 3, 2, 0}),
    ],
)
@pytest.mark.slow  # seconds: thousands of draws for a statistical test
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(
    top_p: float, kept: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    probs = _distribution(TOP_P_LOGITS, monkeypatch, top_p=top_p)
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == kept
    mass = sum(TOP_P_PROBS[i] for i in kept)
    for i in kept:  # renormalised over the kept set
        assert math.isclose(float(probs[i]), TOP_P_PROBS[i] / mass, rel_tol=1e-5)
    if len(kept) > 1:  # over many draws: never outside the set, and every kept token comes up
        assert set(_draws(TOP_P_LOGITS, top_p=top_p)) == kept


def test_top_p_then_top_k_together_keep_the_intersection(monkeypatch: pytest.MonkeyPatch) -> None:
    # top_k=3 keeps {1, 3, 2} (0.4, 0.3, 0.2 -> renormalised 4/9, 3/9, 2/9); top_p=0.75 then keeps 4/9 + 3/9 >= 0.75.
    probs = _distribution(TOP_P_LOGITS, monkeypatch, top_k=3, top_p=0.75)
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == {1, 3}


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_divides_the_logits(temperature: float, monkeypatch: pytest.MonkeyPatch) -> None:
    probs = _distribution(LOGITS, monkeypatch, temperature=temperature)
    torch.testing.assert_close(probs, torch.softmax(LOGITS / temperature, -1))


@pytest.mark.slow  # seconds: thousands of draws for a statistical test
def test_lower_temperature_concentrates_the_draws() -> None:
    cold = _draws(LOGITS, temperature=0.25).count(RANKED[0])
    hot = _draws(LOGITS, temperature=3.0).count(RANKED[0])
    # p(top) is 0.98 at T=0.25 and 0.27 at T=3: far apart against the binomial noise of 2,000 draws.
    assert cold > 0.95 * DRAWS and hot < 0.35 * DRAWS


def test_temperature_zero_and_top_k_one_are_greedy() -> None:
    assert _draws(LOGITS, n=20, temperature=0.0) == [RANKED[0]] * 20
    assert _draws(LOGITS, n=20, top_k=1, temperature=5.0) == [RANKED[0]] * 20


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch() -> None:
    def run(seed: int, batch_with_others: bool) -> list[int]:
        request = _request(seed=seed, top_k=5)
        others = [_request(seed=None), _request(seed=99, top_p=0.9)] if batch_with_others else []
        tokens = []
        for _ in range(200):
            batch = [*others, request]
            tokens.append(_sample_and_append(LOGITS.expand(len(batch), -1).clone(), batch)[-1])
        return tokens

    alone = run(7, batch_with_others=False)
    assert run(7, batch_with_others=True) == alone
    assert run(8, batch_with_others=False) != alone  # another seed, another sequence


def test_greedy_and_random_rows_in_one_batch_each_get_their_own_treatment() -> None:
    rows = torch.stack([LOGITS, TOP_P_LOGITS.repeat(2)])
    greedy = _request(seed=None, temperature=0.0)
    sampled = _request(seed=3, top_k=2)
    picks = {_sample_and_append(rows, [greedy, sampled])[1] for _ in range(300)}
    assert sampling.sample(rows, [greedy, sampled])[0] == RANKED[0]
    assert picks == {1, 5}  # TOP_P_LOGITS repeated: ids 1 and 5 share the top logit
