"""Per-iteration statistics: one recorder that the engine's Prometheus metrics and the simulator's results
both read, filled in by the planner as it plans (`planned`) and as it takes an iteration's outputs (`ran`).

Pure Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from piggyback_runtime.request import Request
from piggyback_runtime.scheduler.latency_model import ModelError
from piggyback_runtime.scheduler.outputs import TokenEvent


@dataclass
class IterationStats:
    """One iteration as planned and, once `ran`, as it ran."""

    scheduled_tokens: int
    preempted: list[Request] = field(default_factory=list)
    be_rows_allowed: int | None = None  # BE rows per layer the SLO controller allowed (None: not SLO-controlled)
    ran: bool = False
    run_s: float = 0.0  # from the iteration's start until its tokens were out
    measured_s: float = 0.0  # from the start until the planner's bookkeeping was done: what a TPOT waits for
    predicted_s: float | None = None  # what the SLO controller had predicted for it
    tokens: int = 0  # tokens sampled (the plan's and the host-path rows')
    be_tokens: int = 0
    be_rows_merged: int = 0  # summed over layers
    finished: int = 0


class StatsRecorder:
    """Totals over the iterations that ran, and the latest iteration. BE tokens are counted only when they
    leave by `horizon_s` (the simulator's workload duration; the engine counts them all)."""

    def __init__(self, horizon_s: float = math.inf) -> None:
        self.horizon_s = horizon_s
        self.last: IterationStats | None = None
        self.iterations = 0
        self.busy_s = 0.0  # summed measured iteration seconds
        self.tokens = 0
        self.be_tokens = 0
        self.be_rows_merged = 0
        self.preemptions = 0
        self.model_error = ModelError()  # the SLO controller's predictions against the measurements

    def planned(self, scheduled_tokens: int, preempted: list[Request], be_rows_allowed: int | None) -> None:
        self.last = IterationStats(scheduled_tokens, list(preempted), be_rows_allowed)
        self.preemptions += len(preempted)

    def ran(self, now_s: float, run_s: float, measured_s: float, predicted_s: float | None,
            events: Sequence[TokenEvent], be_rows_merged: int) -> IterationStats:  # fmt: skip
        stats = self.last
        assert stats is not None, "an iteration ran that was never planned"
        stats.ran = True
        stats.run_s, stats.measured_s, stats.predicted_s = run_s, measured_s, predicted_s
        stats.tokens = len(events)
        stats.be_tokens = sum(not e.request.is_ls for e in events)
        stats.be_rows_merged = be_rows_merged
        stats.finished = sum(e.finish_reason is not None for e in events)
        self.iterations += 1
        self.busy_s += measured_s
        self.tokens += stats.tokens
        if now_s <= self.horizon_s:
            self.be_tokens += stats.be_tokens
        self.be_rows_merged += be_rows_merged
        if predicted_s is not None:
            self.model_error.record(predicted_s, measured_s)
        return stats
