"""Split plans for runtime tests: `SplitPlans` wraps `engine.planner.schedule` and splits every plan that prefills at
half its tokens, recording what each split cut, whether or not the planner's own rule (`Planner._cpu_rows_ride`, which
splits only where the CPU path is behind) would split it here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from piggyback_runtime.engine import Engine
from piggyback_runtime.scheduler.batching import IterationPlan, split_chunks


@dataclass
class SplitPlans:
    engine: Engine
    # Before each plan, wait for the CPU results in flight: rows are then READY at the layers the plan reaches,
    # so every merge point sees rows whatever this machine's load (the runtime itself never waits).
    settle_cpu: bool = True
    split: int = 0  # plans split
    cut_classes: set[str] = field(default_factory=set)  # "LS", "BE-host", "BE-gpu": the chunk cut between A and B
    _schedule: Callable[..., IterationPlan] | None = None

    def __enter__(self) -> SplitPlans:
        self._schedule = self.engine.planner.schedule
        self.engine.planner.schedule = self  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.planner.schedule = self._schedule  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> IterationPlan:
        pb = self.engine.piggyback
        if self.settle_cpu and pb is not None:
            while any(row.state == "waiting" for row in pb.rows.values()):
                pb.idle_wait(0.01)
                pb.collect()
        assert self._schedule is not None
        plan = self._schedule(*args, **kwargs)
        if plan.prefills and plan.num_tokens >= 2:
            plan.split_at = plan.num_tokens // 2
            self.split += 1
            first, second = split_chunks(plan)
            if first[-1].request is second[0].request:
                request = second[0].request
                self.cut_classes.add("LS" if request.is_ls else f"BE-{request.placement}")
        return plan
