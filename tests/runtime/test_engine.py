"""Engine behaviour: sampling parameters, stop conditions, finish reasons, request validation, metrics."""

from __future__ import annotations

import pytest

from piggyback_runtime import metrics as m
from piggyback_runtime.engine import Engine, RequestError, UnknownServiceError
from piggyback_runtime.request import Request, SamplingParams
from tests.runtime.helpers import greedy, make_request, run_to_completion, tiny_config


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_config())


def _generate(engine: Engine, params: SamplingParams, prompt: list[int] | None = None, rid: str = "r") -> Request:
    request = make_request(rid, prompt or [1, 20, 21, 22], params)
    engine.add_request(request)
    run_to_completion(engine)
    return request


def test_max_tokens_finishes_with_length(engine: Engine) -> None:
    request = _generate(engine, greedy(7))
    assert len(request.output_token_ids) == 7 and request.finish_reason == "length"


def test_same_seed_gives_the_same_sample_and_other_seeds_differ(engine: Engine) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=1234, ignore_eos=True)
    first = _generate(engine, params, rid="a").output_token_ids
    # Another request sharing the batch must not disturb a seeded request's sample.
    noise = make_request("noise", [1, 2, 3], SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True))
    engine.add_request(noise)
    second = _generate(engine, params, rid="b").output_token_ids
    assert first == second
    others = {
        tuple(
            _generate(
                engine, SamplingParams(max_tokens=12, temperature=1.5, seed=s, ignore_eos=True), rid=f"s{s}"
            ).output_token_ids
        )
        for s in range(4)
    }
    assert len(others) > 1


def test_top_k_one_is_greedy(engine: Engine) -> None:
    sampled = _generate(engine, SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=3, ignore_eos=True))
    assert sampled.output_token_ids == _generate(engine, greedy(10), rid="g").output_token_ids


def test_tiny_top_p_keeps_only_the_most_likely_token(engine: Engine) -> None:
    sampled = _generate(engine, SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True))
    assert sampled.output_token_ids == _generate(engine, greedy(10), rid="g").output_token_ids


def test_stop_token_id_finishes_with_stop_and_is_not_in_the_text(engine: Engine) -> None:
    reference = _generate(engine, greedy(10), rid="ref").output_token_ids
    stop_at = reference[4]
    first = reference.index(stop_at)
    request = _generate(
        engine, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_at,), ignore_eos=True)
    )
    assert request.finish_reason == "stop"
    assert request.output_token_ids == reference[: first + 1]
    assert request.output_text == engine.tokenizer.decode(reference[:first])


def test_eos_finishes_unless_ignored(engine: Engine) -> None:
    reference = _generate(engine, greedy(10), rid="ref").output_token_ids
    eos = reference[2]
    saved = engine.loaded.eos_token_ids
    engine.loaded.eos_token_ids = (eos,)
    try:
        stopped = _generate(engine, SamplingParams(max_tokens=10, temperature=0))
        ignored = _generate(engine, greedy(10), rid="ignored")
    finally:
        engine.loaded.eos_token_ids = saved
    assert stopped.finish_reason == "stop" and len(stopped.output_token_ids) == reference.index(eos) + 1
    assert ignored.finish_reason == "length"


def test_stop_string_cuts_the_text_before_it(engine: Engine) -> None:
    reference = _generate(engine, greedy(16), rid="ref")
    text = reference.output_text
    assert len(text) > 6, "the tiny model should produce some text"
    stop = text[3:5]
    request = _generate(engine, SamplingParams(max_tokens=16, temperature=0, stop=(stop,), ignore_eos=True))
    assert request.finish_reason == "stop"
    assert request.output_text == text[: text.index(stop)]


def test_invalid_requests_are_refused_with_what_to_change(engine: Engine) -> None:
    with pytest.raises(UnknownServiceError, match="`nope` does not exist"):
        engine.add_request(Request("x", "nope", "LS", [1, 2], greedy(2)))
    with pytest.raises(RequestError, match="maximum context length"):
        engine.add_request(make_request("x", [1] * 2040, greedy(100)))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request(make_request("x", [], greedy(2)))
    with pytest.raises(RequestError, match="KV blocks"):
        engine.add_request(make_request("x", [1] * 1000, greedy(100)))  # 256 blocks of 4 tokens hold 1024
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert not engine.has_work()


def test_ttft_and_tpot_follow_the_design_definitions() -> None:
    timing = m.RequestTiming(
        arrival_s=10.0, scheduled_s=10.5, first_token_s=11.0, last_token_s=13.0, num_output_tokens=5
    )
    assert timing.ttft_s == pytest.approx(1.0)
    assert timing.tpot_s == pytest.approx(0.5)
    assert m.slo_attained(timing, ttft_slo_s=1.0, tpot_slo_s=0.5) == (True, True)
    assert m.slo_attained(timing, ttft_slo_s=0.99, tpot_slo_s=0.49) == (False, False)
    one_token = m.RequestTiming(10.0, 10.0, 11.0, 11.0, 1)
    assert one_token.tpot_s is None and m.slo_attained(one_token, 2.0, 0.001) == (True, True)


def test_sliding_attainment_forgets_old_requests() -> None:
    window = m.SlidingAttainment(window_s=10.0)
    assert window.value(now_s=0.0) == (1.0, 0)
    window.record(False, now_s=0.0)
    window.record(True, now_s=5.0)
    assert window.value(now_s=6.0) == (0.5, 2)
    assert window.value(now_s=12.0) == (1.0, 1)


def test_ls_slo_misses_are_counted_by_type() -> None:
    config = tiny_config()
    strict = config.model_copy(update={"services": [
        config.services[0].model_copy(update={"slo": config.services[0].slo.model_copy(  # type: ignore[union-attr]
            update={"ttft_ms": 1e-6, "tpot_ms": 1e-6})}),
        config.services[1],
    ]})  # fmt: skip
    engine = Engine(strict)
    _generate(engine, greedy(4))
    violations = engine.metrics.slo_violations
    assert violations.labels("chat", m.VIOLATION_TTFT)._value.get() == 1
    assert violations.labels("chat", m.VIOLATION_TPOT)._value.get() == 1
    assert engine.attainment["chat"].value()[0] == 0.0
