"""benchmarks/overload.py's headroom agreement check and benchmarks/iteration_trace.py's summary, on made-up data:
what each says is decided by the definitions, not by this machine's speed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from iteration_trace import noise_floor, summarise
from overload import LS, OK, REJECTED, Record, Report, Settings, headroom_agreement


def _report(admitted_low: int, refused_low: int, gauge_low: list[float], admitted_over: int, refused_over: int,
            gauge_over: list[float]) -> Report:  # fmt: skip
    report = Report(Settings(phase_s=10.0, duration_s=10.0, lower_multiples=(1.0,)))
    for phase, ok, refused in (("1x", admitted_low, refused_low), ("overload", admitted_over, refused_over)):
        report.phases[phase] = {"offered_rps": 1.0, "duration_s": 10.0, "headroom_rps": None, "model_error": None}
        report.records += [Record(LS, phase, 0.0, OK) for _ in range(ok)]
        report.records += [Record(LS, phase, 0.0, REJECTED) for _ in range(refused)]
    report.headroom_samples = {"1x": gauge_low, "overload": gauge_over}
    return report


def test_the_gauge_agrees_when_mean_gauge_plus_admitted_matches_what_overload_lets_through() -> None:
    # 1x: 5 admitted/s, gauge 5/s on average: "10/s fit". Overload: 10/s admitted, the gauge near 0.
    agrees, detail = headroom_agreement(_report(50, 0, [4.0, 6.0], 100, 400, [0.0, 1.0]))
    assert agrees, detail
    assert "= 10.00/s vs 10.00/s" in detail


def test_a_gauge_that_promises_far_more_than_admission_lets_through_disagrees() -> None:
    agrees, detail = headroom_agreement(_report(50, 0, [40.0], 100, 400, [0.0]))
    assert not agrees and "outside" in detail


def test_a_gauge_that_shows_room_while_admission_refuses_disagrees() -> None:
    agrees, detail = headroom_agreement(_report(50, 0, [5.0], 100, 400, [8.0]))
    assert not agrees and "above" in detail


def test_a_lower_load_at_which_admission_already_binds_is_no_baseline() -> None:
    agrees, detail = headroom_agreement(_report(50, 10, [5.0], 100, 400, [0.0]))
    assert not agrees and "no lower load" in detail


def _row(t: float, regime: int, raw_s: float, measured_s: float, predicted_s: float) -> dict[str, float]:
    return {"t": t, "regime": regime, "raw_s": raw_s, "measured_s": measured_s, "predicted_s": predicted_s,
            "ls_decode_rows": 1, "ls_prefill_tokens": 0}  # fmt: skip


def test_the_noise_floor_is_zero_for_a_constant_drift_and_the_spread_of_a_noisy_one() -> None:
    steady = [_row(i * 0.1, 0, 0.01, 0.02, 0.02) for i in range(20)]
    assert noise_floor(steady) == 0.0
    # Alternating 1.5x and 2.5x the profile in one window: the best constant (the median, either) leaves
    # |1.5 - 2.5| / 2.5 or / 1.5 on half of them.
    noisy = [_row(i * 0.1, 0, 0.01, 0.01 * (1.5 if i % 2 else 2.5), 0.02) for i in range(4)]
    assert noise_floor(noisy) > 0.2
    table = summarise(noisy)
    assert "| decode | yes | 4 |" in table and "noise floor" in table
