"""The batched sampler: distributions against a reference, seeds independent of batch company, no host reads.

Draws are derandomised: every seed is fixed, so each test sees the same samples on every run. The
chi-square bounds sit at a one-in-a-million false-alarm level for a correct sampler, far from the
statistic a wrong filter or temperature produces (hundreds to thousands).
"""

from __future__ import annotations

import math

import pytest
import torch

from piggyback_runtime import sampling
from piggyback_runtime.request import Request, SamplingParams

VOCAB = 40
LOGITS = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 2.0
DRAWS = 6_000


def _request(seed: int | None, step: int = 0, **params: float | int) -> Request:
    request = Request(f"r{seed}", "chat", "LS", [1], SamplingParams(seed=seed, **params))  # type: ignore[arg-type]
    request.output_token_ids.extend([0] * step)  # the draw for output token `step`
    return request


def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Written from the definitions, one row, float64: softmax(logits / T) restricted to the k most likely
    tokens, renormalised, then to the smallest most-likely-first prefix whose mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k > 0 else order
    mass = sum(float(probs[i]) for i in kept)
    prefix, running = [], 0.0
    for token in kept:
        prefix.append(token)
        running += float(probs[token]) / mass
        if running >= top_p:
            break
    out = torch.zeros_like(probs)
    out[prefix] = probs[prefix]
    return out / out.sum()


def chi_square_bound(degrees_of_freedom: int, z: float = 4.75) -> float:
    """Upper critical value at about p = 1e-6 (Wilson-Hilferty approximation; no scipy needed)."""
    k = degrees_of_freedom
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def assert_matches(draws: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    counts = torch.bincount(draws, minlength=VOCAB).double()
    support = expected > 0
    outside = counts[~support].sum()
    assert outside == 0, f"{label}: {int(outside)} draws of tokens the filter removes"
    expected_counts = expected[support] * len(draws)
    statistic = float(((counts[support] - expected_counts) ** 2 / expected_counts).sum())
    degrees = int(support.sum()) - 1
    if degrees == 0:
        return
    assert statistic < chi_square_bound(degrees), (
        f"{label}: chi-square {statistic:.1f} over {degrees} degrees of freedom (bound "
        f"{chi_square_bound(degrees):.1f}): the draws do not follow the reference distribution"
    )


CONFIGS = [
    {"temperature": 1.0},
    {"temperature": 0.6},
    {"temperature": 1.7, "top_k": 7},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 0.9, "top_k": 12, "top_p": 0.7},
]


@pytest.mark.slow  # seconds: thousands of draws for a statistical test
def test_one_batch_mixing_every_filter_samples_each_row_from_its_own_reference_distribution() -> None:
    # All five configurations share one call (30,000 rows): one set of tensor ops serves them all.
    requests = [_request(seed=1000 * index + draw, **config)
                for index, config in enumerate(CONFIGS) for draw in range(DRAWS)]  # fmt: skip
    tokens = torch.tensor(sampling.sample(LOGITS.expand(len(requests), -1).contiguous(), requests))
    for index, config in enumerate(CONFIGS):
        expected = reference_distribution(LOGITS, config["temperature"], int(config.get("top_k", 0)),
                                          float(config.get("top_p", 1.0)))  # fmt: skip
        assert_matches(tokens[index * DRAWS : (index + 1) * DRAWS], expected, str(config))


@pytest.mark.slow  # seconds: thousands of draws for a statistical test
def test_consecutive_tokens_of_one_seeded_request_follow_the_distribution() -> None:
    # The draws of one request over its steps (the hash's counter) are as good as draws over seeds.
    requests = [_request(seed=77, step=step, top_k=9) for step in range(DRAWS)]
    tokens = torch.tensor(sampling.sample(LOGITS.expand(DRAWS, -1).contiguous(), requests))
    assert_matches(tokens, reference_distribution(LOGITS, 1.0, 9, 1.0), "one seed, 6000 steps")


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    logits_by_step = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(9))
    company_generator = torch.Generator().manual_seed(10)

    def run(company: int) -> list[int]:
        request = _request(seed=4242, top_p=0.9, temperature=0.8)
        tokens = []
        for step_logits in logits_by_step:
            others = [_request(seed=None, step=3, top_k=5), _request(seed=5, temperature=0.0),
                      _request(seed=6, temperature=2.0)][:company]  # fmt: skip
            noise = torch.randn(len(others), VOCAB, generator=company_generator)
            batch = [*others[: company // 2], request, *others[company // 2 :]]  # not always the same row
            rows = torch.cat((noise[: company // 2], step_logits[None], noise[company // 2 :]))
            token = sampling.sample(rows, batch)[company // 2]
            request.output_token_ids.append(token)
            tokens.append(token)
        return tokens

    alone = run(company=0)
    assert run(company=3) == alone
    assert run(company=2) == alone
    assert len(set(alone)) > 5  # it really samples (a constant sequence would pass the equality trivially)


def test_the_sampler_reads_no_device_value() -> None:
    # On the meta device any read of a value raises: a sampler that consults the device (an .item() to
    # choose a path, a .tolist() of a mask) fails here. Its result is a device tensor of token ids.
    requests = [_request(seed=1, top_k=3), _request(seed=None, temperature=0.0), _request(seed=2, top_p=0.5)]
    params = sampling.SamplingTensors.build(requests, VOCAB).to(torch.device("meta"))
    tokens = sampling.sample_on_device(LOGITS.expand(3, -1).to("meta"), params)
    assert tokens.device.type == "meta" and tokens.shape == (3,) and tokens.dtype == torch.int64


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 3])
def test_the_counter_hash_gives_uniform_draws(seed: int) -> None:
    draws = torch.tensor([sampling.uniform_for(seed, step) for step in range(20_000)])
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    counts = torch.histc(draws, bins=20, min=0.0, max=1.0)
    statistic = float(((counts - 1000.0) ** 2 / 1000.0).sum())
    assert statistic < chi_square_bound(19)
