"""The closed-loop latency model: measured iteration times correct the profile online, per regime, so that the
SLO controller turns conservative when reality drifts from the profile and recovers when it returns."""

from __future__ import annotations

import itertools
import statistics
import time
from types import SimpleNamespace

import pytest

from piggyback_runtime.scheduler.latency_model import (
    REGIMES,
    IterationShape,
    LatencyModel,
    LinearAttentionModel,
    OnlineCorrection,
    StaircaseModel,
    Step,
    regime_of,
)
from piggyback_runtime.scheduler.slo_control import IterationDemand, LSRequestState, SLOController
from tests.runtime.helpers import greedy, make_request, run_to_completion, tiny_config

BASE_S, PER_ROW_S = 0.010, 0.001
DECODE, PREFILL, DECODE_BE = REGIMES.index("decode"), REGIMES.index("prefill"), REGIMES.index("decode+be")


def linear_model(base_s: float = BASE_S, per_row_s: float = PER_ROW_S) -> LatencyModel:
    """base_s + per_row_s per Dense row, attention free: every prediction is known on paper."""
    top = 1 << 16
    dense = StaircaseModel((Step(1, 1, base_s + per_row_s), Step(top, top, base_s + per_row_s * top)), tile=0,
                           tail_slope=per_row_s)  # fmt: skip
    return LatencyModel(dense, LinearAttentionModel(0.0, 0.0, 0.0))


def test_regimes_separate_decode_prefill_and_iterations_that_merge_be_rows() -> None:
    assert [regime_of(0, 0, 5), regime_of(10, 0, 5), regime_of(0, 3, 5), regime_of(10, 3, 5)] == [0, 1, 2, 3]
    assert REGIMES[regime_of(0, 3, 5)] == "decode+be"
    # BE rows merged and nothing else on the accelerator: the piggyback path's own iterations.
    assert REGIMES[regime_of(0, 3, decode_load=0.0)] == "be-only"
    assert REGIMES[regime_of(0, 3, decode_load=50.0)] == "decode+be"


def test_the_correction_is_exact_after_min_samples_and_follows_reality_back_within_a_few_half_lives() -> None:
    correction = OnlineCorrection(half_life=8, min_samples=3)
    assert correction.factor(DECODE) == 1.0  # nothing seen: the profile as it is
    for _ in range(2):
        correction.observe(DECODE, predicted_s=0.010, measured_s=0.020)
    assert correction.factor(DECODE) == 1.0  # too few samples to act on
    correction.observe(DECODE, predicted_s=0.010, measured_s=0.020)
    assert correction.factor(DECODE) == pytest.approx(2.0)  # no prior to forget: exact at once
    for _ in range(3 * 8):  # the drift ends; within three half-lives the factor is back within 1/8 of it
        correction.observe(DECODE, predicted_s=0.010, measured_s=0.010)
    assert 1.0 < correction.factor(DECODE) <= 1.0 + 1.0 / 8 + 1e-9
    for _ in range(200):
        correction.observe(DECODE, predicted_s=0.010, measured_s=0.010)
    assert correction.factor(DECODE) == pytest.approx(1.0, abs=1e-6)


def test_long_iterations_weigh_more_than_short_ones() -> None:
    correction = OnlineCorrection(half_life=1000, min_samples=1)
    correction.observe(DECODE, predicted_s=0.001, measured_s=0.002)  # a short one, 2× off
    correction.observe(DECODE, predicted_s=0.100, measured_s=0.100)  # a long one, right
    # Σ measured / Σ predicted, not the mean of the ratios (1.5).
    assert correction.factor(DECODE) == pytest.approx(0.102 / 0.101, rel=1e-3)


def test_a_regime_seen_too_rarely_borrows_the_all_regime_figure_and_a_single_stall_is_clipped() -> None:
    correction = OnlineCorrection(half_life=8, min_samples=3, max_jump=3.0)
    for _ in range(50):
        correction.observe(DECODE, 0.010, 0.015)
    assert correction.samples(PREFILL) == 0
    assert correction.factor(PREFILL) == pytest.approx(correction.factor(DECODE)) == pytest.approx(1.5)
    correction.observe(DECODE, 0.010, 100.0)  # a stall of 100 s: counted as 3 × the estimate, then decays
    decay = 0.5 ** (1 / 8)
    weight = 1 / sum(decay**i for i in range(51))  # the newest observation's share of the decayed sum
    assert correction.factor(DECODE) == pytest.approx(1.5 + weight * (4.5 - 1.5), rel=1e-6)
    for _ in range(40):
        correction.observe(DECODE, 0.010, 0.015)
    assert correction.factor(DECODE) == pytest.approx(1.5, rel=0.01)
    # A real shift larger than max_jump still gets through, within five half-lives.
    for _ in range(5 * 8):
        correction.observe(DECODE, 0.010, 0.100)
    assert correction.factor(DECODE) == pytest.approx(10.0, rel=0.05)
    for bad in ({"half_life": 0}, {"min_samples": 0}, {"max_jump": 1.0}, {"min_factor": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OnlineCorrection(**bad)  # type: ignore[arg-type]


def _decoding(n: int, tpot_s: float) -> list[LSRequestState]:
    return [LSRequestState(tpot_s, None, 0, 100) for _ in range(n)]


def test_the_controller_admits_fewer_be_rows_while_iterations_run_slower_than_predicted_and_recovers() -> None:
    model = linear_model()
    controller = SLOController(model, safety_margin=0.0, max_be_rows_per_layer=1000)
    states = _decoding(10, tpot_s=0.1)
    demand = IterationDemand(10, 1000.0, be_decode_rows_ready=1000)
    # On the profile: 100 ms allow 10 ms + 1 ms × (10 LS + 80 BE rows).
    assert controller.choose(demand, states, 0.0).be_rows_per_layer == pytest.approx(80, abs=1)
    shape = IterationShape(dense_rows=90, decode_attention_load=1000.0, logit_rows=90, be_rows_per_layer=80)
    predicted = [controller.observe(shape, 1.5 * model.predict(shape)) for _ in range(60)]
    # Reality is 1.5 × the profile: the corrected prediction converges on it, and BE shrinks to fit.
    assert predicted[0] == pytest.approx(model.predict(shape))
    assert predicted[-1] == pytest.approx(1.5 * model.predict(shape), rel=0.02)
    slow = controller.choose(demand, states, 0.0).be_rows_per_layer
    # 1.5 × (10 ms + 1 ms × (10 + r)) ≤ 100 ms → r ≤ 46.
    assert slow == 46
    for _ in range(120):
        controller.observe(shape, model.predict(shape))
    assert controller.choose(demand, states, 0.0).be_rows_per_layer == pytest.approx(80, abs=1)


def test_drift_in_iterations_that_merge_be_rows_does_not_penalise_iterations_without_them() -> None:
    model = linear_model()
    controller = SLOController(model, safety_margin=0.0)
    with_be = IterationShape(dense_rows=40, decode_attention_load=100.0, logit_rows=40, be_rows_per_layer=30)
    without_be = IterationShape(dense_rows=10, decode_attention_load=100.0, logit_rows=10)
    for _ in range(50):
        controller.observe(with_be, 2.0 * model.predict(with_be))
        controller.observe(without_be, model.predict(without_be))
    assert controller.correction.factor(DECODE_BE) == pytest.approx(2.0, rel=0.05)
    assert controller.correction.factor(DECODE) == pytest.approx(1.0, rel=0.01)
    assert controller.predict(without_be) == pytest.approx(model.predict(without_be), rel=0.01)


@pytest.mark.slow  # two engines with CPU worker processes
def test_the_engine_feeds_measured_steps_back_and_the_error_metric_shows_the_loop_closing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from piggyback_runtime import engine as engine_module
    from piggyback_runtime.engine import Engine

    # The engine times its steps on a virtual clock that moves tick_s per reading, so every step measures the
    # same whatever the load on this shared machine (a real-clock version failed once in CI).
    tick_s = 0.004
    readings = itertools.count()
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(
        perf_counter=lambda: next(readings) * tick_s, monotonic=time.monotonic))  # fmt: skip
    # A profile that predicts a sixth of what a step takes: its base is set from the median of the steps a
    # first engine measured, warm-up steps left out.
    config = tiny_config(policy="piggyback", max_num_batched_tokens=32)
    probe = Engine(config, latency_model=linear_model())
    try:
        probe.add_request(make_request("probe", [1, 2, 3], greedy(24)))
        measured: list[float] = []
        while probe.has_work():
            probe.step()
            measured.append(probe.model_error.last_measured_s)
        typical_s = statistics.median(measured[3:])
    finally:
        probe.close()
    engine = Engine(config, latency_model=linear_model(base_s=typical_s / 6, per_row_s=0.0))
    try:
        for i in range(4):
            engine.add_request(make_request(f"ls{i}", [1, 2, 3, 4], greedy(36)))
        run_to_completion(engine)
        slo = engine.planner.slo
        assert slo is not None and slo.correction.samples(DECODE) >= 30
        assert slo.correction.factor(DECODE) > 1.5  # it learnt that steps take longer than the profile says
        # The gauge holds the controller's (corrected) prediction of the last step, well above the profile's.
        last_predicted = engine.metrics.iteration_predicted_seconds._value.get()
        assert last_predicted > 1.5 * slo.latency_model.predict(IterationShape(4, 0.0, 0.0, 4))
        # The error metric is that of the corrected predictions: open loop they would sit near -5/6 of every
        # measured step (the unsafe direction); closed, the signed error over the run is far from it.
        assert engine.metrics.latency_model_error._value.get() == pytest.approx(engine.model_error.mape())
        assert engine.model_error.bias() > -0.5  # open loop: -5/6; the early steps, before it learnt, weigh in
    finally:
        engine.close()


def test_with_a_padded_decode_kernel_one_long_context_costs_every_row_and_leaves_less_room_for_be() -> None:
    top = 1 << 16
    dense = StaircaseModel((Step(1, 1, BASE_S + PER_ROW_S), Step(top, top, BASE_S + PER_ROW_S * top)), tile=0,
                           tail_slope=PER_ROW_S)  # fmt: skip
    attention = LinearAttentionModel(0.0, 0.0, 1e-6)  # 1 us per decode token of attention load
    contexts = [100] * 9 + [8000]  # nine short decodes and one long one
    states = [LSRequestState(0.1, None, 0, c) for c in contexts]
    demand = IterationDemand(10, float(sum(contexts)), be_decode_rows_ready=1000,
                             ls_decode_longest_context=max(contexts))  # fmt: skip
    allowed = {}
    for cost in ("sum_of_contexts", "rows_times_longest"):
        model = LatencyModel(dense, attention, decode_cost=cost)
        allowed[cost] = SLOController(model, safety_margin=0.0, max_be_rows_per_layer=1000).choose(demand, states, 0)
    # Paged: 8.9 ms of attention; padded: 10 rows × 8000 = 80 ms of it. 100 ms budget, 10 ms + 1 ms per row.
    assert allowed["sum_of_contexts"].be_rows_per_layer == 71
    assert allowed["rows_times_longest"].be_rows_per_layer == 0


def test_be_only_iterations_are_corrected_apart_from_iterations_that_carry_ls_work_next_to_be_rows() -> None:
    """Measured on the real CPU runtime under overload (issue #26): LS decodes with BE rows merged took about
    2× the profile while iterations that only moved BE rows took about 0.7×. One shared factor made both
    wrong (the BE-only ones by +100%); apart, each prediction follows its own kind."""
    model = linear_model()
    controller = SLOController(model, safety_margin=0.0)
    ls_with_be = IterationShape(dense_rows=12, decode_attention_load=600.0, logit_rows=10, be_rows_per_layer=2)
    be_only = IterationShape(dense_rows=0.5, logit_rows=0, be_rows_per_layer=0.5)
    errors = []
    for _ in range(40):
        for shape, drift in ((ls_with_be, 2.0), (be_only, 0.7), (be_only, 0.7)):
            measured = drift * model.predict(shape)
            errors.append(abs(controller.observe(shape, measured) - measured) / measured)
    assert controller.predict(ls_with_be) == pytest.approx(2.0 * model.predict(ls_with_be), rel=0.02)
    assert controller.predict(be_only) == pytest.approx(0.7 * model.predict(be_only), rel=0.02)
    assert max(errors[-30:]) < 0.02
