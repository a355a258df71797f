"""Replay a simulator workload on the real engine, in real time, and report it as the simulator does.

This is how the simulator is held against the runtime on one machine: the same RuntimeConfig, the same
requests at the same arrival offsets, the same `summary` of the outcome. Requests go straight to the
engine (no HTTP), so what is compared is the engine: planner, model runner, CPU workers.

It lives with the benchmarks, not in `piggyback_runtime.sim`: the simulator models the engine and must not
import it (tests/test_layering.py holds that); this harness runs both.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from piggyback_runtime.engine import AdmissionRejected, Engine
from piggyback_runtime.request import Request, SamplingParams
from piggyback_runtime.scheduler.latency_model import LatencyModel, StaircaseModel
from piggyback_runtime.sim.simulator import RequestRecord, SimResult
from piggyback_runtime.sim.workload import SimRequest


def replay(engine: Engine, requests: Sequence[SimRequest], duration_s: float, drain_s: float = 60.0,
           seed: int = 0) -> SimResult:  # fmt: skip
    """Drive `engine` with `requests` (arrival offsets from now) until the horizon and the LS drain."""
    rng = random.Random(seed)
    vocab = engine.arch.vocab_size
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    records: dict[str, RequestRecord] = {}
    start = time.monotonic()
    index = 0
    be_tokens = 0
    busy_s = 0.0
    iterations = 0
    while True:
        now = time.monotonic() - start
        while index < len(ordered) and ordered[index].arrival_s <= now:
            sim = ordered[index]
            index += 1
            record = RequestRecord(sim.service, sim.service_class, sim.arrival_s, sim.prompt_tokens,
                                   sim.output_tokens)  # fmt: skip
            records[sim.request_id] = record
            request = Request(sim.request_id, sim.service, sim.service_class,
                              [rng.randrange(3, vocab) for _ in range(sim.prompt_tokens)],
                              SamplingParams(max_tokens=sim.output_tokens, temperature=0.0, ignore_eos=True),
                              arrival_s=start + sim.arrival_s)  # fmt: skip
            try:
                engine.add_request(request)
            except AdmissionRejected as exc:
                record.rejected = exc.reason
            if request.slo is not None:
                record.ttft_slo_s, record.tpot_slo_s = request.slo.ttft_s, request.slo.tpot_s
        ls_held = any(r.is_ls for r in engine.requests.values())
        if now >= duration_s + drain_s or (now >= duration_s and not ls_held):
            break
        if not engine.has_work():
            if index >= len(ordered):
                if now >= duration_s:
                    break
                time.sleep(min(0.01, duration_s - now))
                continue
            time.sleep(max(0.0, min(0.01, ordered[index].arrival_s - now)))
            continue
        stepped = time.perf_counter()
        outputs = engine.step()
        busy_s += time.perf_counter() - stepped
        iterations += 1
        at_s = time.monotonic() - start
        for output in outputs:
            record = records[output.request_id]
            if output.new_token_ids:
                if record.first_token_s is None:
                    record.first_token_s = at_s
                record.last_token_s = at_s
                record.tokens_out += len(output.new_token_ids)
                if record.service_class == "BE" and at_s <= duration_s:
                    be_tokens += len(output.new_token_ids)
            if output.finished:
                record.finished_s = at_s if output.finish_reason in ("stop", "length") else None
    end_s = time.monotonic() - start
    return SimResult(
        policy=engine.config.engine.policy, duration_s=duration_s, end_s=end_s, records=list(records.values()),
        be_tokens=be_tokens, gpu_busy_s=busy_s, iterations=iterations, host_bytes_read=0.0,
        host_kv_usage_mean=0.0, host_kv_usage_peak=0.0, be_rows_merged=0, cpu_busy_share=0.0,
        notes=["measured on the real engine"],
    )  # fmt: skip


@dataclass(frozen=True)
class StepCost:
    """What an engine iteration costs beyond the profiled modules: fixed_s + per_row_s × rows sampled."""

    fixed_s: float
    per_row_s: float

    def apply(self, model: LatencyModel) -> LatencyModel:
        """The model with this cost folded into its logits term (which runs once per sampled row)."""
        logits = model.logits
        rows = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, *(s.hi for s in logits.steps)} if logits
                      else {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024})  # fmt: skip
        samples = [(x, (logits.predict(x) if logits else 0.0) + self.fixed_s + self.per_row_s * x) for x in rows]
        return dataclasses.replace(model, logits=StaircaseModel.fit(samples, rel_tol=0.0, abs_tol=0.0))


def calibrate_step_cost(engine: Engine, latency_model: LatencyModel, row_counts: Sequence[int] = (1, 8, 32),
                        steps: int = 12) -> StepCost:  # fmt: skip
    """Measure, on the engine itself, the per-iteration cost its latency profile leaves out (scheduling,
    sampling row by row, output handling in Python): for k decoding requests, the median of (measured step −
    predicted forward), fitted as a line in k."""
    service = engine.config.services[0]
    points: list[tuple[float, float]] = []
    for k in row_counts:
        requests = [Request(f"calibration-{k}-{i}", service.name, service.service_class, [3] * 16,
                            SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True))
                    for i in range(k)]  # fmt: skip
        for request in requests:
            engine.add_request(request)
        residuals: list[float] = []
        try:
            while any(not r.output_token_ids for r in requests):
                engine.step()  # prefills
            for _ in range(steps):
                context = sum(r.num_tokens for r in requests)
                started = time.perf_counter()
                engine.step()
                measured = time.perf_counter() - started
                residuals.append(measured - latency_model.predict_parts(k, 0.0, context, k))
        finally:
            for request in requests:
                engine.abort(request.request_id)
        points.append((float(k), statistics.median(residuals)))
    # Least squares line through the medians; neither part may be negative (the profile is not cut).
    mean_k = sum(k for k, _ in points) / len(points)
    mean_r = sum(r for _, r in points) / len(points)
    spread = sum((k - mean_k) ** 2 for k, _ in points)
    slope = sum((k - mean_k) * (r - mean_r) for k, r in points) / spread if spread else 0.0
    slope = max(0.0, slope)
    return StepCost(max(0.0, mean_r - slope * mean_k), slope)
