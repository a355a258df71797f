"""The iteration latency model: staircase Dense fit, linear attention fit, profile cache, model error, profiler."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from piggyback_runtime.scheduler.latency_model import (
    DECODE_COST_PADDED,
    DECODE_COST_SUM,
    DECODE_COSTS,
    PROFILE_DIR_ENV,
    IterationShape,
    LatencyModel,
    LinearAttentionModel,
    ModelError,
    ProfileKey,
    StaircaseModel,
    decode_attention_load,
    default_profile_dir,
    fit_nonnegative_line,
    fit_step_overhead,
    load_or_none,
    prefill_chunk_load,
)

STEP_GRID = [1, *range(8, 513, 8)]  # the GPU profile's grid up to 512 rows


def gpu_like(rows: float) -> float:
    """A GPU-like Dense latency: 1 ms, plus 0.5 ms whenever the rows cross a multiple of 64 (a new tile wave)."""
    return 1e-3 + 0.5e-3 * math.ceil(rows / 64)


def cpu_like(rows: float) -> float:
    """A CPU-like Dense latency: fixed cost plus a cost per row."""
    return 0.2e-3 + 0.01e-3 * rows


def least_squares_line(samples: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(samples)
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    slope = sum((x - mx) * (y - my) for x, y in samples) / sum((x - mx) ** 2 for x, _ in samples)
    return my - slope * mx, slope


# --- f_D: staircase ---------------------------------------------------------------------------------------------
def test_staircase_recovers_a_step_function_exactly_between_and_beyond_the_profiled_rows() -> None:
    model = StaircaseModel.fit([(x, gpu_like(x)) for x in STEP_GRID])
    assert model.tile == 64
    for rows in range(1, 513):  # every row count, profiled or not: the jump sits right after each multiple of 64
        assert model.predict(rows) == pytest.approx(gpu_like(rows), rel=1e-12), rows
    for rows in (513, 576, 577, 700, 1024, 1025):  # extrapolation continues the staircase
        assert model.predict(rows) == pytest.approx(gpu_like(rows), rel=1e-9), rows


def test_staircase_beats_a_linear_fit_on_a_step_function() -> None:
    samples = [(x, gpu_like(x)) for x in STEP_GRID]
    model = StaircaseModel.fit(samples)
    intercept, slope = least_squares_line(samples)
    rows = range(1, 513)
    staircase_error = sum(abs(model.predict(r) - gpu_like(r)) / gpu_like(r) for r in rows) / len(rows)
    linear_error = sum(abs(intercept + slope * r - gpu_like(r)) / gpu_like(r) for r in rows) / len(rows)
    assert staircase_error < 1e-9
    assert linear_error > 0.03  # a line smears every step over its neighbours


def test_staircase_on_a_noisy_linear_profile_is_accurate_on_and_off_the_grid() -> None:
    rng = random.Random(7)
    grid = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512]  # the CPU profile's sparse grid
    samples = [(x, cpu_like(x) * (1 + rng.uniform(-0.03, 0.03))) for x in grid for _ in range(3)]
    model = StaircaseModel.fit(samples)
    assert model.tile == 0  # no tile width explains a line: the gaps are interpolated
    on_grid = [abs(model.predict(x) - cpu_like(x)) / cpu_like(x) for x in grid]
    held_out = [abs(model.predict(x) - cpu_like(x)) / cpu_like(x) for x in range(1, 513) if x not in grid]
    assert max(on_grid) < 0.05
    assert sum(held_out) / len(held_out) < 0.03 and max(held_out) < 0.06
    assert model.predict(1024) == pytest.approx(cpu_like(1024), rel=0.06)  # extrapolated along the tail slope


def test_a_line_sampled_on_a_multiple_of_8_grid_is_not_mistaken_for_tiles() -> None:
    # Every gap of such a grid holds a multiple of 8, so width 8 "explains" the jumps; leave-one-out says no.
    model = StaircaseModel.fit([(x, cpu_like(x)) for x in STEP_GRID])
    assert model.tile == 0
    assert max(abs(model.predict(r) - cpu_like(r)) / cpu_like(r) for r in range(1, 513)) < 0.021


def test_staircase_is_monotone_even_when_the_measurements_are_not() -> None:
    rng = random.Random(3)
    samples = [(x, gpu_like(x) * (1 + rng.uniform(-0.2, 0.2))) for x in STEP_GRID for _ in range(3)]
    model = StaircaseModel.fit(samples)
    predictions = [model.predict(r) for r in range(1, 2049)]
    assert all(a <= b for a, b in itertools.pairwise(predictions))


def test_a_single_timing_spike_does_not_lift_the_fit() -> None:
    samples = [(x, gpu_like(x)) for x in STEP_GRID if x != 16 for _ in range(3)]
    samples += [(16, 0.5)] * 3  # every repeat of 16 rows disturbed: 250 times the real latency
    for reduce in ("median", "min"):
        model = StaircaseModel.fit(samples, reduce=reduce)  # type: ignore[arg-type]
        assert model.predict(100) == pytest.approx(gpu_like(100), rel=1e-9), reduce
        assert model.predict(16) < 2 * gpu_like(16), reduce


def test_min_reduction_never_underestimates_when_noise_only_adds_time() -> None:
    rng = random.Random(11)
    grid = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512]
    # Shared cores: most runs are clean, some are slowed down a lot, the last point in every run.
    samples = [(x, cpu_like(x) * (1 + (rng.expovariate(1.0) if rng.random() < 0.3 else 0.0))) for x in grid]
    samples += [(x, cpu_like(x)) for x in grid if x != 512] + [(512, 40 * cpu_like(512))] * 3
    model = StaircaseModel.fit(samples, reduce="min")
    for rows in range(1, 513):
        assert model.predict(rows) >= cpu_like(rows) * (1 - 1e-9), rows
    # The last point's only bound is batch splitting: at most twice what 256 rows cost.
    assert model.predict(512) <= 2 * cpu_like(256) * (1 + 1e-9)


def test_zero_rows_cost_nothing() -> None:
    assert StaircaseModel.fit([(x, gpu_like(x)) for x in STEP_GRID]).predict(0) == 0.0


# --- f_A: linear in attention load ------------------------------------------------------------------------------
def test_prefill_chunk_load_counts_every_query_key_pair() -> None:
    for start, tokens in ((0, 1), (0, 7), (5, 3), (100, 64)):
        pairs = sum(start + i + 1 for i in range(tokens))  # query at position start+i sees start+i+1 keys
        assert prefill_chunk_load(start, tokens) == pairs


def test_linear_attention_fit_recovers_its_coefficients() -> None:
    true = LinearAttentionModel(2e-4, 3e-9, 5e-8)
    points = [(p, d) for p in (0, 1e4, 1e5, 1e6) for d in (0, 1e3, 1e5) if p or d]
    model = LinearAttentionModel.fit([(p, d, true.predict(p, d)) for p, d in points])
    assert model.intercept == pytest.approx(true.intercept, rel=1e-6)
    assert model.per_prefill_load == pytest.approx(true.per_prefill_load, rel=1e-6)
    assert model.per_decode_load == pytest.approx(true.per_decode_load, rel=1e-6)
    assert model.predict(0, 0) == 0.0  # an iteration with no accelerator attention pays no attention cost


def test_linear_attention_fit_never_makes_more_load_cheaper() -> None:
    # Noise that suggests decode load speeds things up must not yield a negative coefficient.
    samples = [(p, d, 1e-3 + 1e-9 * p - 1e-10 * d) for p in (1e4, 1e5, 1e6) for d in (0, 1e4, 1e6)]
    model = LinearAttentionModel.fit(samples)
    assert model.intercept >= 0 and model.per_prefill_load >= 0 and model.per_decode_load == 0


def test_iteration_latency_is_the_sum_of_its_parts() -> None:
    dense = StaircaseModel.fit([(x, gpu_like(x)) for x in STEP_GRID])
    logits = StaircaseModel.fit([(x, 1e-5 * x) for x in (1, 512)])
    model = LatencyModel(dense, LinearAttentionModel(1e-4, 1e-9, 1e-8), logits, overhead_s=2e-4)
    shape = IterationShape(dense_rows=100, prefill_attention_load=1e5, decode_attention_load=1e4, logit_rows=10)
    expected = 2e-4 + gpu_like(100) + (1e-4 + 1e-4 + 1e-4) + 1e-4
    assert model.predict(shape) == pytest.approx(expected, rel=1e-9)
    assert model.predict_parts(100, 1e5, 1e4, 10) == model.predict(shape)


def test_merged_be_rows_add_the_piggyback_paths_per_layer_work_and_nothing_without_them() -> None:
    dense = StaircaseModel.fit([(x, cpu_like(x)) for x in (1, 512)])
    bare = LatencyModel(dense, LinearAttentionModel(0.0, 0.0, 0.0))
    model = LatencyModel(dense, LinearAttentionModel(0.0, 0.0, 0.0), be_merge_fixed_s=1e-3, be_merge_row_s=2e-5,
                         per_sampled_row_s=1e-5)  # fmt: skip
    assert model.predict_parts(40, 0, 0, 0, 0) == bare.predict_parts(40, 0, 0)
    assert model.predict_parts(40, 0, 0, 0, 30) == pytest.approx(bare.predict_parts(40, 0, 0) + 1e-3 + 30 * 2e-5)
    assert model.predict_parts(40, 0, 0, 8) == pytest.approx(bare.predict_parts(40, 0, 0) + 8e-5)


def test_decode_load_follows_the_kernel_sum_of_contexts_when_paged_rows_times_longest_when_padded() -> None:
    contexts = [100, 100, 4000]
    assert decode_attention_load(DECODE_COST_SUM, 3, sum(contexts), max(contexts)) == 4200
    assert decode_attention_load(DECODE_COST_PADDED, 3, sum(contexts), max(contexts)) == 12000
    # A caller that knows only the sum (longest 0) is charged the sum, never less.
    assert decode_attention_load(DECODE_COST_PADDED, 3, 4200, 0) == pytest.approx(4200)
    dense = StaircaseModel.fit([(x, cpu_like(x)) for x in (1, 512)])
    padded = LatencyModel(dense, LinearAttentionModel(0.0, 0.0, 1e-8), decode_cost=DECODE_COST_PADDED)
    assert padded.decode_load(3, 4200, 4000) == 12000
    with pytest.raises(ValueError, match="decode_cost"):
        LatencyModel(dense, LinearAttentionModel(0.0, 0.0, 0.0), decode_cost="quadratic")
    with pytest.raises(ValueError, match="sum_of_contexts"):
        decode_attention_load("quadratic", 1, 1, 1)


def test_a_nonnegative_line_fit_is_exact_on_a_line_and_clips_a_falling_one() -> None:
    assert fit_nonnegative_line([(1, 3.0), (2, 5.0), (4, 9.0)]) == pytest.approx((1.0, 2.0))
    intercept, slope = fit_nonnegative_line([(1, 3.0), (2, 2.0), (3, 1.0)])
    assert slope == 0 and intercept == pytest.approx(2.0)
    with pytest.raises(ValueError):
        fit_nonnegative_line([])


def test_the_fixed_per_iteration_cost_is_recovered_from_whole_step_timings() -> None:
    rng = random.Random(3)
    dense = StaircaseModel.fit([(x, gpu_like(x)) for x in STEP_GRID])
    logits = StaircaseModel.fit([(x, 1e-5 * x) for x in (1, 512)])
    model = LatencyModel(dense, LinearAttentionModel(1e-4, 1e-9, 1e-8), logits, be_merge_fixed_s=5e-4)
    fixed_s, per_row_s = 3e-3, 4e-5  # what a step costs beyond the modules: the truth to recover
    samples = []
    for rows in (1, 8, 32, 64, 128, 256):
        shape = IterationShape(rows, 0.0, rows * 1024.0, rows, be_rows_per_layer=rows % 3)
        for _ in range(9):
            noise = rng.gauss(0, 5e-5) + (0.02 if rng.random() < 0.1 else 0.0)  # jitter and an odd stall
            samples.append((shape, model.predict(shape) + fixed_s + per_row_s * rows + noise))
    fitted_fixed, fitted_per_row = fit_step_overhead(model, samples)
    assert fitted_fixed == pytest.approx(fixed_s, rel=0.05)
    assert fitted_per_row == pytest.approx(per_row_s, rel=0.05)
    # Already folded into the model, the fit finds nothing left over.
    folded = LatencyModel(dense, model.attention, logits, overhead_s=fixed_s, per_sampled_row_s=per_row_s,
                          be_merge_fixed_s=5e-4)  # fmt: skip
    assert fit_step_overhead(folded, samples)[0] == pytest.approx(fixed_s, rel=0.05)


# --- profile cache ------------------------------------------------------------------------------------------------
def _key(**change: str) -> ProfileKey:
    fields = {"model_uri": "synthetic://tiny-llama", "dtype": "float32", "device_name": "cpu x2", "arch_hash": "ab12"}
    return ProfileKey(**(fields | change))


def _model() -> LatencyModel:
    return LatencyModel(
        StaircaseModel.fit([(x, gpu_like(x)) for x in STEP_GRID]),
        LinearAttentionModel(1e-4, 2e-9, 3e-8),
        StaircaseModel.fit([(x, cpu_like(x)) for x in (1, 64, 512)]),
        overhead_s=1e-4,
        per_sampled_row_s=2e-6,
        be_merge_fixed_s=3e-4,
        be_merge_row_s=4e-6,
        decode_cost=DECODE_COST_PADDED,
        dense_samples=((1.0, 1e-3), (8.0, 2e-3)),
    )


def test_profile_cache_round_trips_through_json(tmp_path: Path) -> None:
    model = _model()
    path = model.save_to_cache(tmp_path, _key())
    json.loads(path.read_text())  # plain JSON, readable by anything
    loaded = load_or_none(tmp_path, _key())
    assert loaded == model
    assert loaded is not None and loaded.dense_samples == model.dense_samples
    assert all(loaded.predict_parts(r, 1e5, 1e3, 4, 2) == model.predict_parts(r, 1e5, 1e3, 4, 2) for r in range(1, 700))
    assert loaded.decode_cost == DECODE_COST_PADDED


@pytest.mark.parametrize(
    "other",
    [{"device_name": "NVIDIA H100 80GB HBM3"}, {"dtype": "bfloat16"}, {"arch_hash": "cd34"}, {"code_version": "0"}],
)
def test_a_profile_made_for_another_key_is_not_used(tmp_path: Path, other: dict[str, str]) -> None:
    key = _key()
    path = _model().save_to_cache(tmp_path, key)
    other_key = _key(**other)
    assert load_or_none(tmp_path, other_key) is None
    # Even if the other key's file name were to point at this file, the stored key is checked.
    path.rename(tmp_path / other_key.file_name())
    assert load_or_none(tmp_path, other_key) is None


def test_missing_or_corrupt_cache_files_read_as_no_profile(tmp_path: Path) -> None:
    assert load_or_none(tmp_path, _key()) is None
    (tmp_path / _key().file_name()).write_text("{not json")
    assert load_or_none(tmp_path, _key()) is None


def test_the_profile_dir_defaults_to_the_user_cache_and_the_environment_overrides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    assert default_profile_dir() == Path("~/.cache/piggyback/profiles").expanduser()
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path))
    assert default_profile_dir() == tmp_path


# --- model error ------------------------------------------------------------------------------------------------
def test_model_error_reports_mean_absolute_and_signed_percentage_error_over_a_window() -> None:
    error = ModelError(window=2)
    assert error.mape() == 0.0 and error.bias() == 0.0
    error.record(predicted_s=0.011, measured_s=0.010)  # +10 %
    error.record(predicted_s=0.008, measured_s=0.010)  # -20 %
    assert error.mape() == pytest.approx(0.15) and error.bias() == pytest.approx(-0.05)
    error.record(predicted_s=0.010, measured_s=0.010)  # the +10 % leaves the window
    assert error.mape() == pytest.approx(0.10) and error.bias() == pytest.approx(-0.10)
    assert error.count == 3 and (error.last_predicted_s, error.last_measured_s) == (0.010, 0.010)


# --- profiler on the real model (CPU) -------------------------------------------------------------------------
@pytest.mark.slow  # profiles a real model, twice
def test_profiling_a_real_model_fits_every_part_and_the_cli_prints_the_fit_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from piggyback_runtime.config import ModelConfig
    from piggyback_runtime.model.loader import load_model
    from piggyback_runtime.profiler import fit_table, profile_latency, profile_main

    loaded = load_model(ModelConfig(uri="synthetic://tiny-llama"), "cpu")
    # How well the fit matches this machine's timings, and how long profiling takes, are wall-clock figures of
    # a shared VM: `piggyback profile` prints them (its table is checked below); the fits themselves are held
    # to known timings above. Here: the profile of a real model has every part, in range.
    model = profile_latency(loaded)
    table = fit_table(model)
    assert all(measured > 0 and predicted > 0 and error >= 0 for _, measured, predicted, error in table)
    assert len(table) >= 10 and all(model.dense.predict(r) > 0 for r, *_ in table)
    a = model.attention
    assert min(a.intercept, a.per_prefill_load, a.per_decode_load) >= 0
    # The fixed per-step cost (whole steps less their modules), the BE path's merge work and the decode kernel's
    # cost kind are part of the profile. Their sizes are differences of this machine's timings, which a burst
    # of foreign load can clip to zero (the fixed cost's recovery is held to known timings above).
    assert model.overhead_s >= 0 and model.per_sampled_row_s >= 0
    assert model.be_merge_fixed_s >= 0 and model.be_merge_row_s >= 0
    assert model.decode_cost in DECODE_COSTS

    config = tmp_path / "runtime.yaml"
    config.write_text(
        "model: {uri: 'synthetic://tiny-llama'}\ndevice: cpu\nservices: [{name: chat, class: LS, "
        "slo: {ttft_ms: 1000, tpot_ms: 100}}]\n"
    )
    out = tmp_path / "profile.json"
    assert profile_main(["--config", str(config), "--out", str(out), "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "measured ms" in printed and "predicted ms" in printed and str(out) in printed
    assert "ms per iteration" in printed and "per BE row per layer" in printed
    key, written = LatencyModel.load(out)
    assert key.model_uri == "synthetic://tiny-llama" and key.dtype == "float32"
    assert written.dense.predict(64) > 0
