"""A cached latency profile is checked before it is trusted (profiler.load_or_profile, issue #26 §1).

At start the engine times a few whole decode steps (the probe) and compares them with the cached profile's
predictions: within slo_control.profile_trust_factor it uses the cache, beyond it profiles again. The
decision is a pure function of the timings, tested here with made-up timings; the probe's real timings are
only checked for shape (no assertion on this shared machine's speed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from piggyback_runtime.config import ConfigError, ModelConfig, RuntimeConfig
from piggyback_runtime.model.loader import LoadedModel, load_model
from piggyback_runtime.profiler import (
    CPU_PROBE_ROWS,
    ProbeTiming,
    judge_cached_profile,
    load_or_profile,
    probe_latency,
    profile_key,
)
from piggyback_runtime.scheduler.latency_model import LatencyModel, LinearAttentionModel, StaircaseModel, Step


def model_of(per_row_s: float) -> LatencyModel:
    """A latency model whose Dense time is per_row_s per row (attention free): tells fakes apart by value."""
    top = 1 << 16
    dense = StaircaseModel((Step(1, 1, per_row_s), Step(top, top, per_row_s * top)), tile=0, tail_slope=per_row_s)
    return LatencyModel(dense, LinearAttentionModel(0.0, 0.0, 0.0))


def probes(*pairs: tuple[float, float]) -> list[ProbeTiming]:
    """(predicted ms, measured ms) per probed shape, at 1, 8, 32 rows."""
    return [ProbeTiming(rows, p / 1e3, m / 1e3) for rows, (p, m) in zip((1, 8, 32), pairs, strict=False)]


# --- the decision ------------------------------------------------------------------------------------------------
def test_without_a_cached_profile_the_decision_is_to_profile() -> None:
    decision = judge_cached_profile(None, trust_factor=1.5)
    assert decision.source == "profiled" and decision.off_by is None
    assert "no cached profile" in decision.reason


def test_a_cached_profile_every_probe_agrees_with_is_used() -> None:
    decision = judge_cached_profile(probes((2.0, 2.2), (4.0, 3.5), (8.0, 8.0)), trust_factor=1.5)
    assert decision.source == "cached"
    assert decision.off_by == pytest.approx(1.1428, rel=1e-3)  # the worst shape: 4.0 predicted, 3.5 measured
    assert "verified" in decision.reason and "8 decode row(s)" in decision.reason


def test_one_shape_slower_than_the_trust_factor_allows_means_a_new_profile() -> None:
    # The cache was measured on a quiet machine; now a step of 32 rows takes 2.5x as long.
    decision = judge_cached_profile(probes((2.0, 2.1), (4.0, 4.2), (8.0, 20.0)), trust_factor=1.5)
    assert decision.source == "reprofiled"
    assert decision.off_by == pytest.approx(2.5)
    assert "off by 2.50x" in decision.reason and "32 decode row(s)" in decision.reason
    assert "20.000 ms" in decision.reason and "8.000 ms" in decision.reason


def test_a_profile_too_pessimistic_is_as_untrusted_as_one_too_optimistic() -> None:
    # The case: profiled while other jobs loaded the machine, the model predicts 8.5x too long steps
    # and admission refuses what the SLO would allow.
    decision = judge_cached_profile(probes((17.0, 2.0), (34.0, 4.0)), trust_factor=1.5)
    assert decision.source == "reprofiled" and decision.off_by == pytest.approx(8.5)


def test_a_probe_exactly_at_the_factor_is_still_trusted_and_just_beyond_it_is_not() -> None:
    assert judge_cached_profile(probes((2.0, 3.0)), trust_factor=1.5).source == "cached"
    assert judge_cached_profile(probes((2.0, 3.0001)), trust_factor=1.5).source == "reprofiled"
    assert judge_cached_profile(probes((2.0, 3.0001)), trust_factor=2.0).source == "cached"


def test_a_prediction_or_timing_that_is_not_positive_is_never_trusted() -> None:
    assert ProbeTiming(1, 0.0, 1e-3).off_by() == math.inf
    assert judge_cached_profile(probes((0.0, 2.0), (4.0, 4.0)), trust_factor=100).source == "reprofiled"


def test_the_decision_needs_timings_and_a_factor_of_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least one probe"):
        judge_cached_profile([], trust_factor=1.5)
    with pytest.raises(ValueError, match="trust_factor"):
        judge_cached_profile(probes((2.0, 2.0)), trust_factor=0.5)


# --- load_or_profile with fake measurements ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(ModelConfig(uri="synthetic://tiny-llama"), "cpu")


class FakeDevice:
    """Stands in for the timings: the probe reports `measured_s` for every shape, profiling returns
    model_of(profiled_per_row_s); counts the calls."""

    def __init__(self, measured_s: float, profiled_per_row_s: float) -> None:
        self.measured_s, self.profiled_per_row_s = measured_s, profiled_per_row_s
        self.probes = self.profiles = 0

    def probe(self, loaded: LoadedModel, model: LatencyModel) -> Sequence[ProbeTiming]:
        self.probes += 1
        return [ProbeTiming(rows, model.dense.predict(rows), self.measured_s) for rows in (1,)]

    def profile(self, loaded: LoadedModel) -> LatencyModel:
        self.profiles += 1
        return model_of(self.profiled_per_row_s)


def test_no_cache_profiles_once_and_saves_then_a_verified_cache_is_used(
    loaded: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = FakeDevice(measured_s=1e-3, profiled_per_row_s=1e-3)
    caplog.set_level(logging.INFO, logger="piggyback_runtime.profiler")
    first = load_or_profile(loaded, tmp_path, 1.5, probe=device.probe, profile=device.profile)
    assert (device.probes, device.profiles) == (0, 1)
    assert (tmp_path / profile_key(loaded).file_name()).is_file()
    assert "no cached profile" in caplog.text and ": profiled" in caplog.text
    caplog.clear()
    second = load_or_profile(loaded, tmp_path, 1.5, probe=device.probe, profile=device.profile)
    assert (device.probes, device.profiles) == (1, 1)  # probed, not profiled again
    assert second == first
    assert "cached and verified" in caplog.text


def test_a_cache_the_probe_finds_off_is_replaced_by_a_fresh_profile(
    loaded: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_of(10e-3).save_to_cache(tmp_path, profile_key(loaded))  # stale: predicts 10 ms for one row
    device = FakeDevice(measured_s=2e-3, profiled_per_row_s=2e-3)  # the device now takes 2 ms
    caplog.set_level(logging.INFO, logger="piggyback_runtime.profiler")
    model = load_or_profile(loaded, tmp_path, 1.5, probe=device.probe, profile=device.profile)
    assert (device.probes, device.profiles) == (1, 1)
    assert model == model_of(2e-3)
    assert "cached but off by 5.00x" in caplog.text and "re-profiled" in caplog.text
    # The fresh profile replaced the stale one: the next start verifies it and uses it.
    assert load_or_profile(loaded, tmp_path, 1.5, probe=device.probe, profile=device.profile) == model_of(2e-3)
    assert device.profiles == 1


def test_a_looser_trust_factor_keeps_a_cache_a_tighter_one_replaces(loaded: LoadedModel, tmp_path: Path) -> None:
    model_of(3e-3).save_to_cache(tmp_path, profile_key(loaded))
    device = FakeDevice(measured_s=2e-3, profiled_per_row_s=2e-3)  # off by 1.5x
    assert load_or_profile(loaded, tmp_path, 2.0, probe=device.probe, profile=device.profile) == model_of(3e-3)
    assert load_or_profile(loaded, tmp_path, 1.2, probe=device.probe, profile=device.profile) == model_of(2e-3)


# --- the real probe and the config field -----------------------------------------------------------------------
def test_the_probe_times_each_shape_and_pairs_it_with_the_cached_prediction(loaded: LoadedModel) -> None:
    timings = probe_latency(loaded, model_of(1e-3), repeats=1)
    assert [t.rows for t in timings] == list(CPU_PROBE_ROWS)
    for timing in timings:
        assert timing.predicted_s == pytest.approx(timing.rows * 1e-3)  # this model: Dense only, 1 ms per row
        assert timing.measured_s > 0


def _config(slo_control: dict[str, object]) -> RuntimeConfig:
    service = {"name": "chat", "class": "LS", "slo": {"ttft_ms": 1000, "tpot_ms": 100}}
    return RuntimeConfig.from_dict({"model": {"uri": "synthetic://tiny-llama"}, "services": [service],
                                    "slo_control": slo_control})  # fmt: skip


def test_the_trust_factor_is_a_config_field_above_one() -> None:
    assert _config({}).slo_control.profile_trust_factor == 1.5
    assert _config({"profile_trust_factor": 3}).slo_control.profile_trust_factor == 3
    for bad in (1, 0.5, "loose"):
        with pytest.raises(ConfigError, match="profile_trust_factor"):
            _config({"profile_trust_factor": bad})
