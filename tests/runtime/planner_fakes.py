"""What the planner's unit tests drive it with instead of an engine: a clock the test moves and a latency model
whose iteration time is known exactly."""

from __future__ import annotations

from piggyback_runtime.scheduler.latency_model import LatencyModel, LinearAttentionModel, StaircaseModel, Step


class Clock:
    """Seconds that move only when the test sets `now`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def staircase_model(per_row_s: float = 1e-3) -> LatencyModel:
    """An iteration costs `per_row_s` per row (power-of-two steps up to 64 rows) plus a small attention term."""
    steps = tuple(Step(x, x, x * per_row_s) for x in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
    return LatencyModel(StaircaseModel(steps, 0, per_row_s), LinearAttentionModel(0.0, 1e-7, 1e-7))
