"""SLO control inside the engine, and the baseline policies selectable by config.

A known latency model (10 ms + 1 ms per Dense row, attention free) replaces the profile, so the decisions
are exact: what the controller allows is what the engine runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from piggyback_runtime import metrics as m
from piggyback_runtime.engine import AdmissionRejected, Engine
from piggyback_runtime.scheduler.latency_model import LatencyModel, LinearAttentionModel, StaircaseModel, Step
from tests.runtime.helpers import (
    assert_matches_reference,
    greedy,
    hf_reference,
    make_request,
    reference_greedy,
    run_to_completion,
    tiny_config,
)

pytestmark = pytest.mark.slow  # engines with CPU worker processes (policy piggyback and neo)

BASE_S, PER_ROW_S = 0.010, 0.001


def known_model() -> LatencyModel:
    top = 1 << 16
    dense = StaircaseModel((Step(1, 1, BASE_S + PER_ROW_S), Step(top, top, BASE_S + PER_ROW_S * top)), tile=0,
                           tail_slope=PER_ROW_S)  # fmt: skip
    return LatencyModel(dense, LinearAttentionModel(0.0, 0.0, 0.0))


def _engine(ttft_ms: float, tpot_ms: float, **piggyback) -> Engine:  # type: ignore[no-untyped-def]
    config = tiny_config(policy="piggyback", max_num_batched_tokens=32, piggyback=piggyback)
    ls = config.services[0]
    slo = ls.slo.model_copy(update={"ttft_ms": ttft_ms, "tpot_ms": tpot_ms})  # type: ignore[union-attr]
    config = config.model_copy(update={"services": [ls.model_copy(update={"slo": slo}), config.services[1]]})
    return Engine(config, latency_model=known_model())


@pytest.fixture
def tight() -> Iterator[Engine]:
    # TPOT 25 ms: an iteration may hold 0.9 × 25 ms = 22.5 ms → 12 Dense rows at 1 ms over the 10 ms base.
    engine = _engine(ttft_ms=10_000, tpot_ms=25)
    yield engine
    engine.close()


def test_ls_request_that_would_miss_its_ttft_is_rejected_and_counted_as_a_miss() -> None:
    engine = _engine(ttft_ms=15, tpot_ms=1000)  # a 32-token prompt needs one 42 ms iteration: > 15 ms
    try:
        with pytest.raises(AdmissionRejected) as info:
            engine.add_request(make_request("late", [1] * 32, greedy(4)))
        assert info.value.reason == "TTFTUnattainable" and info.value.retry_after_s >= 1
        assert "TTFT" in str(info.value)
        assert engine.metrics.requests.labels("chat", "LS", m.OUTCOME_REJECTED)._value.get() == 1
        assert engine.metrics.slo_violations.labels("chat", m.VIOLATION_REJECTED)._value.get() == 1
        assert engine.attainment["chat"].value()[0] == 0.0
        assert not engine.has_work()
        engine.add_request(make_request("short", [1, 2], greedy(2)))  # 12 ms: fits
        run_to_completion(engine)
    finally:
        engine.close()


def test_a_rejection_updates_only_the_attainment_gauge_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under overload 429s outnumber iterations: a rejection must not pay the engine's full gauge sweep
    (every request's labels, the CPU path's gauges, headroom), only show the miss it adds."""
    engine = _engine(ttft_ms=15, tpot_ms=1000)
    try:
        def sweep() -> None:
            raise AssertionError("a rejection swept every gauge")

        monkeypatch.setattr(engine, "_update_gauges", sweep)
        for i in range(3):
            with pytest.raises(AdmissionRejected):
                engine.add_request(make_request(f"late{i}", [1] * 32, greedy(4)))
        assert engine.metrics.slo_attainment.labels("chat")._value.get() == 0.0
        assert engine.metrics.slo_window_requests.labels("chat")._value.get() == 3
    finally:
        engine.close()


def test_admission_is_decided_at_the_edge_of_the_slo_less_the_safety_margin() -> None:
    # One 3-token prompt alone: one iteration of 10 ms + 3 rows = 13 ms. Admission keeps the planner's safety
    # margin (0.1 by default): a queue admitted up to the SLO itself would finish around it and miss half the time.
    exactly = _engine(ttft_ms=13 / 0.9, tpot_ms=1000)
    just_over = _engine(ttft_ms=12.99 / 0.9, tpot_ms=1000)
    try:
        for engine, admitted in ((exactly, True), (just_over, False)):
            request = make_request("edge", [1, 2, 3], greedy(1))
            # Arrival stamped a moment ahead: time the test spends before the decision must not count.
            request.arrival_s = time.monotonic() + 1.0
            if admitted:
                engine.add_request(request)
            else:
                with pytest.raises(AdmissionRejected):
                    engine.add_request(request)
    finally:
        exactly.close()
        just_over.close()


def test_be_rows_per_layer_follow_the_controller_and_never_exceed_its_bound(tight: Engine) -> None:
    for i in range(6):
        tight.add_request(make_request(f"be{i}", [1, 5, 6], greedy(12), "BE"))
    for i in range(8):
        tight.add_request(make_request(f"ls{i}", [1, 7], greedy(12)))
    allowed: list[float] = []
    unconstrained: list[tuple[int, float]] = []  # (rows ready before the step, rows allowed) with no LS work
    merged_before = tight.metrics.be_rows_merged._sum.get()
    assert tight.piggyback is not None
    while tight.has_work():
        ls_present = any(r.is_ls for r in (*tight.scheduler.running, *tight.scheduler.waiting))
        ready_before = tight.piggyback.runnable_rows()
        tight.step()
        allowed.append(tight.metrics.be_rows_allowed._value.get())
        assert tight.piggyback.max_rows_per_layer == allowed[-1]
        if not ls_present:
            unconstrained.append((ready_before, allowed[-1]))
    # While 8 LS requests decode (8 rows of the 12 that fit), at most 4 BE rows may join a layer.
    assert min(allowed) <= 4
    # With the LS requests gone, BE takes every row that is ready (the step may find even more ready).
    assert any(ready for ready, _ in unconstrained)
    assert all(rows >= ready for ready, rows in unconstrained)
    assert tight.metrics.be_rows_merged._sum.get() > merged_before


def test_headroom_is_absent_until_ls_requests_were_seen_then_exported(tight: Engine) -> None:
    assert b"piggyback_ls_headroom_requests_per_second" not in tight.metrics.render()
    tight.add_request(make_request("ls", [1, 2, 3], greedy(4)))
    run_to_completion(tight)
    tight._headroom_due_s = 0.0
    tight.step()
    assert tight.metrics.ls_headroom.value is not None and tight.metrics.ls_headroom.value > 0


def test_be_requests_beyond_the_bounded_host_kv_queue_are_rejected() -> None:
    engine = Engine(
        tiny_config(policy="piggyback", piggyback={"num_host_kv_blocks": 3}, slo_control={"max_be_queue": 1}),
        latency_model=known_model(),
    )
    try:
        holder, queued = (make_request(f"be{i}", [1, 5, 6, 7], greedy(16), "BE") for i in range(2))
        engine.add_request(holder)  # takes all 3 host blocks (20 of 24 tokens)
        engine.add_request(queued)  # waits for host KV: the queue is now full
        with pytest.raises(AdmissionRejected) as info:
            engine.add_request(make_request("overflow", [1, 5], greedy(4), "BE"))
        assert info.value.reason == "BEQueueFull" and "max_be_queue" in str(info.value)
        assert engine.metrics.admission_rejections.labels("batch", "BE", "BEQueueFull")._value.get() == 1
        run_to_completion(engine)
        assert holder.finish_reason == queued.finish_reason == "length"
    finally:
        engine.close()


def test_ls_only_runs_no_be_work_while_ls_work_exists() -> None:
    engine = Engine(tiny_config(policy="ls-only"))
    be = make_request("be", [1, 5, 6], greedy(4), "BE")
    ls = make_request("ls", [1, 7, 8], greedy(6))
    engine.add_request(be)
    engine.add_request(ls)
    while ls.finish_reason is None:
        engine.step()
        assert not be.output_token_ids
    run_to_completion(engine)
    assert be.finish_reason == "length"


def test_headroom_policy_keeps_be_within_its_share_of_kv() -> None:
    engine = Engine(tiny_config(policy="headroom", num_kv_blocks=40, headroom_be_kv_share=0.25))
    requests = [make_request(f"be{i}", [1, *range(5, 20)], greedy(8), "BE") for i in range(6)]
    for request in requests:
        engine.add_request(request)
    while engine.has_work():
        engine.step()
        be_blocks = sum(len(engine.allocator.blocks_of(r.request_id)) for r in requests)
        assert be_blocks <= 10
    assert all(r.finish_reason == "length" for r in requests)


def test_neo_offloads_every_decode_and_waits_for_it_synchronously() -> None:
    engine = Engine(tiny_config(policy="neo"))
    try:
        prompts = [[1, *range(40, 40 + n)] for n in (3, 9, 14)]
        requests = [make_request(f"n{i}", p, greedy(10), "LS" if i % 2 else "BE") for i, p in enumerate(prompts)]
        for request in requests:
            engine.add_request(request)
        run_to_completion(engine)
        hf = hf_reference(engine.arch, engine.model.state_dict())
        for request, prompt in zip(requests, prompts, strict=True):
            assert_matches_reference(request.output_token_ids, *reference_greedy(hf, prompt, 10))
        assert engine.metrics.cpu_attention_wait_seconds._value.get() > 0
        assert engine.metrics.be_rows_merged._sum.get() > 0
    finally:
        engine.close()
