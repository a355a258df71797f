"""Every Prometheus metric the runtime exports, defined once.

Names follow vLLM's where the meaning is the same (so dashboards and Gateway-API-Inference-Extension style
routers that read `vllm:*` work unchanged); Piggyback's own SLO figures use the `piggyback_` prefix.
Labels: `model_name` is the service name (what clients send as `model`, as in vLLM), `class` is LS or BE.
The operator imports the names from here; nothing else spells them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # the config schema is only needed for type hints: importing metrics stays light
    from collections.abc import Iterable

    from piggyback_runtime.config import ServiceConfig

# --- names (exposition names; counters gain `_total` on the wire) -----------------------------------
TTFT_SECONDS = "vllm:time_to_first_token_seconds"
INTER_TOKEN_LATENCY_SECONDS = "vllm:inter_token_latency_seconds"
REQUEST_TPOT_SECONDS = "vllm:request_time_per_output_token_seconds"
E2E_LATENCY_SECONDS = "vllm:e2e_request_latency_seconds"
QUEUE_TIME_SECONDS = "vllm:request_queue_time_seconds"
NUM_RUNNING = "vllm:num_requests_running"
NUM_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
PROMPT_TOKENS = "vllm:prompt_tokens"
GENERATION_TOKENS = "vllm:generation_tokens"
REQUEST_SUCCESS = "vllm:request_success"
NUM_PREEMPTIONS = "vllm:num_preemptions"
CACHE_CONFIG_INFO = "vllm:cache_config_info"
# Pod-wide totals of the per-service gauges above: one series per runtime, for consumers that read one series
# per model server. The Gateway API Inference Extension's endpoint picker takes a single series of a family
# (the latest by timestamp, i.e. the first listed), so on a pod serving LS and BE services the vLLM-named
# gauges would give it one service's queue; these give it the pod's.
POD_REQUESTS_RUNNING = "piggyback_pod_requests_running"
POD_REQUESTS_WAITING = "piggyback_pod_requests_waiting"
POD_KV_CACHE_USAGE = "piggyback_pod_kv_cache_usage_ratio"
REQUESTS = "piggyback_requests"
SLO_ATTAINMENT = "piggyback_slo_attainment_ratio"
SLO_VIOLATIONS = "piggyback_slo_violations"
SLO_WINDOW_REQUESTS = "piggyback_slo_window_requests"
ITERATION_SECONDS = "piggyback_iteration_seconds"
# Predicted extra LS request rate that fits under the SLOs at the current mix (exported by the SLO controller).
LS_HEADROOM_RPS = "piggyback_ls_headroom_requests_per_second"
# Host memory still free for BE KV cache blocks.
HOST_KV_FREE_BYTES = "piggyback_host_kv_free_bytes"
HOST_KV_USAGE = "piggyback_host_kv_usage_ratio"
CPU_ATTENTION_QUEUE_DEPTH = "piggyback_cpu_attention_queue_depth"
CPU_ATTENTION_WAIT_SECONDS = "piggyback_cpu_attention_wait_seconds"
CPU_WORKER_RESTARTS = "piggyback_cpu_worker_restarts"
# BE KV moves between accelerator KV and host KV (hybrid placement), by direction and outcome.
BE_KV_MOVES = "piggyback_be_kv_moves"
MOVE_DONE, MOVE_FAILED = "moved", "failed"
BE_ROWS_MERGED = "piggyback_be_rows_merged"
# Remote CPU attention nodes (piggyback.remote), label `worker`: the remote worker's index in the pool.
REMOTE_BE_ROWS = "piggyback_remote_be_rows"
REMOTE_BYTES_SENT = "piggyback_remote_bytes_sent"
REMOTE_BYTES_RECEIVED = "piggyback_remote_bytes_received"
REMOTE_ROUND_TRIP_SECONDS = "piggyback_remote_round_trip_seconds"
REMOTE_DEADLINE_MISSES = "piggyback_remote_deadline_misses"
REMOTE_KV_BYTES = "piggyback_remote_kv_bytes"
REMOTE_WORKER_UP = "piggyback_remote_worker_up"
REMOTE_RETRIES = "piggyback_remote_be_retries"
BE_TOKENS_PER_SECOND = "piggyback_be_tokens_per_second"
ADMISSION_REJECTIONS = "piggyback_admission_rejections"
ITERATION_PREDICTED_SECONDS = "piggyback_iteration_predicted_seconds"
ITERATION_MEASURED_SECONDS = "piggyback_iteration_measured_seconds"
LATENCY_MODEL_ERROR = "piggyback_latency_model_error_ratio"
BE_ROWS_ALLOWED = "piggyback_be_rows_allowed_per_layer"
# Each LS service's SLO as configured, so dashboards and alert rules follow the config instead of typed numbers.
SLO_TTFT_TARGET_SECONDS = "piggyback_slo_ttft_target_seconds"
SLO_TPOT_TARGET_SECONDS = "piggyback_slo_tpot_target_seconds"
SLO_ATTAINMENT_TARGET = "piggyback_slo_attainment_target_ratio"
# LS requests counted in attainment, by whether they attained their SLO (label `attained`: true/false); the
# burn-rate alerts divide the misses by the total over each window.
SLO_REQUESTS = "piggyback_slo_requests"
# Live migration of running requests between replicas (migration.py), label `direction` (out/in) and `outcome`.
MIGRATIONS = "piggyback_migrations"
MIGRATION_SECONDS = "piggyback_migration_seconds"
MIGRATION_DONE = "migrated"
MIGRATION_REFUSED = "refused"  # the target said no (no room, draining, bad state): the request stays put
MIGRATION_FAILED = "failed"  # the target was unreachable or timed out: the request stays put
MIGRATION_NOT_READY = "not_ready"  # the request was not between two decode steps, or already gone
# The Batch API (batch/): batches by status, and lines of the active batches by the batch's status and the line's
# state (pending, leased, completed, failed); lines this replica ran to a result; lines it has in flight now.
BATCHES = "piggyback_batches"  # label status
BATCH_LINES = "piggyback_batch_lines"  # labels batch_status, line_state
BATCH_LINES_FINISHED = "piggyback_batch_lines_finished"  # label line_state: completed, failed
BATCH_LINES_IN_FLIGHT = "piggyback_batch_lines_in_flight"
# The pool router (router/app.py).
ROUTER_STAGE_LOWER_TOKENS = "piggyback_router_stage_lower_tokens"
ROUTER_STAGE_UPPER_TOKENS = "piggyback_router_stage_upper_tokens"  # absent for the last (unbounded) stage
ROUTER_REPLICA_QUEUE = "piggyback_router_replica_queue_requests"  # running + waiting, labels replica, stage
ROUTER_STAGE_QUEUE = "piggyback_router_stage_queue_requests"
ROUTER_REPLICA_UP = "piggyback_router_replica_up"
ROUTER_MIGRATIONS = "piggyback_router_migrations"  # label outcome (MIGRATION_*)
ROUTER_REQUESTS = "piggyback_router_requests"  # label outcome: completed, rejected, failed
ROUTER_RETRIES = "piggyback_router_admission_retries"  # 429s answered by trying the next candidate
ROUTER_STAGE_REPLANS = "piggyback_router_stage_replans"  # label outcome (REPLAN_*): DP re-planning attempts
# 1 while this router holds the pool's leader Lease (router/leader.py): plans the stages, starts migrations.
ROUTER_LEADER = "piggyback_router_leader"
REPLAN_DONE = "replanned"  # the DP chose other stages and the router switched to them
REPLAN_UNCHANGED = "unchanged"  # the DP chose the plan already in use
REPLAN_BAD_PROFILE = "bad_profile"  # a replica's latency profile was missing or invalid: the plan was kept
REPLAN_TOO_FEW_LENGTHS = "too_few_lengths"  # fewer finished requests observed than the minimum: plan kept

LABELS = ("model_name", "class")

# Request outcomes (label `outcome` of piggyback_requests_total).
OUTCOME_FINISHED = "finished"
OUTCOME_ABORTED = "aborted"
OUTCOME_REJECTED = "rejected"
OUTCOME_FAILED = "failed"
OUTCOMES = (OUTCOME_FINISHED, OUTCOME_ABORTED, OUTCOME_REJECTED, OUTCOME_FAILED)

# SLO violation types (label `type`, as llm-d's inference_objective_request_slo_violation_total).
VIOLATION_TTFT = "ttft"
VIOLATION_TPOT = "tpot"
VIOLATION_REJECTED = "rejected"

_LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip


@dataclass(frozen=True)
class RequestTiming:
    """The timestamps (time.monotonic seconds) that the SLO definitions are computed from."""

    arrival_s: float
    scheduled_s: float | None
    first_token_s: float | None
    last_token_s: float | None
    num_output_tokens: int

    @property
    def ttft_s(self) -> float | None:
        """Arrival at the runtime to the first output token leaving it."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """(last token − first token) / (output tokens − 1); undefined for fewer than two tokens."""
        if self.first_token_s is None or self.last_token_s is None or self.num_output_tokens < 2:
            return None
        return (self.last_token_s - self.first_token_s) / (self.num_output_tokens - 1)


def slo_attained(timing: RequestTiming, ttft_slo_s: float, tpot_slo_s: float) -> tuple[bool, bool]:
    """(ttft_ok, tpot_ok) for a finished request. A request with no first token misses TTFT."""
    ttft = timing.ttft_s
    tpot = timing.tpot_s
    ttft_ok = ttft is not None and ttft <= ttft_slo_s
    tpot_ok = tpot is None or tpot <= tpot_slo_s
    return ttft_ok, tpot_ok


class SlidingAttainment:
    """Share of LS requests that attained their SLO among those that ended in the last `window_s`.

    O(1) per record and per read (a running count of the attained ones): the engine reads it after every
    iteration and every admission rejection, and under overload the window holds thousands of requests.
    Thread-safe: the HTTP handlers record the LS rejections they decide themselves (`Engine.refuse_early`)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, bool]] = deque()
        self._attained = 0  # attained requests among _events
        self._lock = threading.Lock()

    def record(self, attained: bool, now_s: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now_s is None else now_s, attained))
            self._attained += attained

    def _expire(self, now_s: float) -> None:
        while self._events and self._events[0][0] < now_s - self.window_s:
            self._attained -= self._events.popleft()[1]

    def value(self, now_s: float | None = None) -> tuple[float, int]:
        """(attainment ratio, requests in window); the ratio is 1.0 when the window is empty."""
        with self._lock:
            self._expire(time.monotonic() if now_s is None else now_s)
            total = len(self._events)
            if total == 0:
                return 1.0, 0
            return self._attained / total, total


class OptionalGauge(Collector):
    """A gauge that is absent from /metrics until it has a value (absent means unknown, not zero)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float | None) -> None:
        self.value = value

    def collect(self):  # type: ignore[no-untyped-def]
        if self.value is not None:
            yield GaugeMetricFamily(self.name, self.documentation, value=self.value)

    def describe(self):  # type: ignore[no-untyped-def]
        return []


class PodTotals(Collector):
    """Unlabelled sums, at scrape time, of labelled gauges (each service's series of one pod)."""

    def __init__(self, sources: tuple[tuple[str, str, Gauge], ...], registry: CollectorRegistry) -> None:
        self.sources = sources
        registry.register(self)

    def collect(self):  # type: ignore[no-untyped-def]
        for name, documentation, gauge in self.sources:
            total = sum(s.value for family in gauge.collect() for s in family.samples)
            yield GaugeMetricFamily(name, documentation, value=total)

    def describe(self):  # type: ignore[no-untyped-def]
        return [GaugeMetricFamily(name, documentation) for name, documentation, _ in self.sources]


class RuntimeMetrics:
    """All metrics of one runtime, on their own registry (tests run several runtimes in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            TTFT_SECONDS,
            "Arrival at the runtime to first output token (DESIGN.md TTFT).",
            LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            INTER_TOKEN_LATENCY_SECONDS,
            "Time between consecutive output tokens of a request.",
            LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.request_tpot = Histogram(
            REQUEST_TPOT_SECONDS,
            "Per-request TPOT: (last token - first token) / (output tokens - 1).",
            LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.e2e_latency = Histogram(
            E2E_LATENCY_SECONDS,
            "Arrival to last token of a finished request.",
            LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_time = Histogram(
            QUEUE_TIME_SECONDS,
            "Arrival to first scheduled on the accelerator.",
            LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.num_running = Gauge(NUM_RUNNING, "Requests holding KV and being computed.", LABELS, registry=r)
        self.num_waiting = Gauge(
            NUM_WAITING, "Requests admitted but not yet scheduled (or preempted).", LABELS, registry=r
        )
        self.kv_cache_usage = Gauge(KV_CACHE_USAGE, "Share (0-1) of accelerator KV blocks held.", LABELS, registry=r)
        self.pod_totals = PodTotals((
            (POD_REQUESTS_RUNNING, "Requests running, all services of this runtime.", self.num_running),
            (POD_REQUESTS_WAITING, "Requests waiting, all services of this runtime.", self.num_waiting),
            (POD_KV_CACHE_USAGE, "Share (0-1) of accelerator KV blocks held, all services.", self.kv_cache_usage),
        ), registry=r)  # fmt: skip
        self.prompt_tokens = Counter(PROMPT_TOKENS, "Prompt tokens of admitted requests.", LABELS, registry=r)
        self.generation_tokens = Counter(GENERATION_TOKENS, "Output tokens produced.", LABELS, registry=r)
        self.request_success = Counter(
            REQUEST_SUCCESS, "Requests finished normally, by finish reason.", (*LABELS, "finished_reason"), registry=r
        )
        self.num_preemptions = Counter(
            NUM_PREEMPTIONS, "Requests preempted (KV freed, recomputed later).", LABELS, registry=r
        )
        self.migrations = Counter(
            MIGRATIONS, "Live migrations of running requests, by direction (out, in) and outcome.",
            ("direction", "outcome"), registry=r,
        )  # fmt: skip
        self.migration_seconds = Histogram(
            MIGRATION_SECONDS, "Freeze to commit of an outgoing live migration (KV export and import).",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            REQUESTS, "Requests by outcome: finished, aborted, rejected, failed.", (*LABELS, "outcome"), registry=r
        )
        self.slo_attainment = Gauge(
            SLO_ATTAINMENT, "LS SLO attainment over the sliding window (1 if empty).", ("model_name",), registry=r
        )
        self.slo_window_requests = Gauge(
            SLO_WINDOW_REQUESTS, "LS requests ended within the sliding window.", ("model_name",), registry=r
        )
        self.slo_violations = Counter(
            SLO_VIOLATIONS, "LS SLO violations by type: ttft, tpot, rejected.", ("model_name", "type"), registry=r
        )
        self.slo_requests = Counter(
            SLO_REQUESTS, "LS requests counted in attainment, by attained (true, false); rejected ones count as false.",
            ("model_name", "attained"), registry=r,
        )  # fmt: skip
        self.slo_ttft_target = Gauge(SLO_TTFT_TARGET_SECONDS, "Configured TTFT SLO of each LS service.",
                                     ("model_name",), registry=r)  # fmt: skip
        self.slo_tpot_target = Gauge(SLO_TPOT_TARGET_SECONDS, "Configured TPOT SLO of each LS service.",
                                     ("model_name",), registry=r)  # fmt: skip
        self.slo_attainment_target = Gauge(
            SLO_ATTAINMENT_TARGET, "Configured share (0-1) of LS requests that must attain their SLO.", ("model_name",),
            registry=r,
        )  # fmt: skip
        self.iteration_seconds = Histogram(
            ITERATION_SECONDS, "Wall time of one engine iteration.", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.cache_config_info = Gauge(
            CACHE_CONFIG_INFO,
            "KV cache configuration (value is always 1).",
            ("block_size", "num_gpu_blocks"),
            registry=r,
        )

        # The piggyback path (policy `piggyback`).
        self.host_kv_usage = Gauge(HOST_KV_USAGE, "Share (0-1) of host-DRAM BE KV blocks held.", registry=r)
        self.host_kv_free_bytes = Gauge(HOST_KV_FREE_BYTES, "Host DRAM still free for BE KV blocks.", registry=r)
        self.cpu_attention_queue_depth = Gauge(
            CPU_ATTENTION_QUEUE_DEPTH, "BE rows whose attention is on a CPU worker right now.", registry=r
        )
        self.cpu_attention_wait_seconds = Counter(
            CPU_ATTENTION_WAIT_SECONDS,
            "Time the engine spent blocked on CPU attention results while it had accelerator work (should stay 0).",
            registry=r,
        )
        self.cpu_worker_restarts = Counter(CPU_WORKER_RESTARTS, "CPU attention workers replaced after dying.",
                                           registry=r)  # fmt: skip
        self.be_kv_moves = Counter(BE_KV_MOVES, "BE requests whose KV the runtime moved between accelerator "
                                   "and host KV, by direction and outcome.", ["direction", "outcome"],
                                   registry=r)  # fmt: skip
        # Remote CPU attention nodes (piggyback.remote).
        worker = ("worker",)
        self.remote_be_rows = Counter(REMOTE_BE_ROWS, "BE rows (one row, one layer) a remote worker served.",
                                      worker, registry=r)  # fmt: skip
        self.remote_bytes_sent = Counter(REMOTE_BYTES_SENT, "Bytes the engine sent to a remote worker.", worker,
                                         registry=r)  # fmt: skip
        self.remote_bytes_received = Counter(REMOTE_BYTES_RECEIVED, "Bytes the engine received from a remote worker.",
                                             worker, registry=r)  # fmt: skip
        self.remote_round_trip_seconds = Histogram(
            REMOTE_ROUND_TRIP_SECONDS, "Per-layer round trip of a remote worker's batch (sent to results back).",
            worker, buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )  # fmt: skip
        self.remote_deadline_misses = Counter(
            REMOTE_DEADLINE_MISSES, "Remote workers dropped because a layer's batch missed the deadline.", worker,
            registry=r,
        )  # fmt: skip
        self.remote_kv_bytes = Gauge(REMOTE_KV_BYTES, "BE KV a remote worker holds in its DRAM.", worker, registry=r)
        self.remote_worker_up = Gauge(REMOTE_WORKER_UP, "1 while a remote worker takes BE rows, else 0.", worker,
                                      registry=r)  # fmt: skip
        self.remote_be_retries = Counter(
            REMOTE_RETRIES, "BE requests prefilled again after their attention worker was lost.", registry=r
        )
        self.be_rows_merged = Histogram(
            BE_ROWS_MERGED, "BE rows merged into the Dense batch in one iteration (summed over layers).",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r,
        )  # fmt: skip
        self.be_tokens_per_second = Gauge(
            BE_TOKENS_PER_SECOND, "BE output tokens per second over the last 10 s.", registry=r
        )

        # SLO control (policy `piggyback`).
        self.admission_rejections = Counter(
            ADMISSION_REJECTIONS, "Requests rejected at arrival (HTTP 429), by reason.", (*LABELS, "reason"),
            registry=r,
        )  # fmt: skip
        self.iteration_predicted_seconds = Gauge(
            ITERATION_PREDICTED_SECONDS, "Latency model's prediction for the last iteration's shape.", registry=r
        )
        self.iteration_measured_seconds = Gauge(
            ITERATION_MEASURED_SECONDS, "Measured forward time of the last iteration (what the model predicts).",
            registry=r,
        )  # fmt: skip
        self.latency_model_error = Gauge(
            LATENCY_MODEL_ERROR, "Mean absolute percentage error of the latency model over recent iterations.",
            registry=r,
        )  # fmt: skip
        self.be_rows_allowed = Gauge(
            BE_ROWS_ALLOWED, "BE rows per layer the SLO controller allowed in the last iteration.", registry=r
        )
        self.ls_headroom = OptionalGauge(
            LS_HEADROOM_RPS, "Predicted extra LS request rate (requests/s) that fits under the SLOs at the current "
            "mix; absent until the runtime has seen LS requests.", registry=r,
        )  # fmt: skip

        self.batches = Gauge(BATCHES, "Batches (Batch API) by status.", ("status",), registry=r)
        self.batch_lines = Gauge(BATCH_LINES, "Lines of the active batches, by batch status and line state.",
                                 ("batch_status", "line_state"), registry=r)  # fmt: skip
        self.batch_lines_finished = Counter(BATCH_LINES_FINISHED, "Batch lines this replica ran to a recorded "
                                            "result, by outcome.", ("line_state",), registry=r)  # fmt: skip
        self.batch_lines_in_flight = Gauge(BATCH_LINES_IN_FLIGHT, "Batch lines this replica runs now.", registry=r)

    def export_slo_targets(self, services: Iterable[ServiceConfig]) -> None:
        """Publish every LS service's configured SLO (and zero its attainment counters) from the start."""
        for service in services:
            if service.slo is None:
                continue
            self.slo_ttft_target.labels(service.name).set(service.slo.ttft_s)
            self.slo_tpot_target.labels(service.name).set(service.slo.tpot_s)
            self.slo_attainment_target.labels(service.name).set(service.slo.attainment_target)
            for attained in ("true", "false"):
                self.slo_requests.labels(service.name, attained)

    def record_slo_outcome(self, service: str, attained: bool) -> None:
        self.slo_requests.labels(service, "true" if attained else "false").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metric_family_names() -> list[str]:
    """Every metric family the runtime exports (counters without `_total`), from a fresh registry."""
    return sorted(family.name for family in RuntimeMetrics().registry.collect())


class RouterMetrics:
    """The pool router's metrics: stage boundaries, per-stage and per-replica load, migrations, retries."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stage_lower_tokens = Gauge(ROUTER_STAGE_LOWER_TOKENS, "Lower length bound of a stage (tokens).",
                                        ("stage",), registry=r)  # fmt: skip
        self.stage_upper_tokens = Gauge(ROUTER_STAGE_UPPER_TOKENS, "Upper length bound of a stage (tokens).",
                                        ("stage",), registry=r)  # fmt: skip
        self.replica_queue = Gauge(ROUTER_REPLICA_QUEUE, "A replica's running + waiting requests, last polled.",
                                   ("replica", "stage"), registry=r)  # fmt: skip
        self.stage_queue = Gauge(ROUTER_STAGE_QUEUE, "Running + waiting requests over a stage's replicas.",
                                 ("stage",), registry=r)  # fmt: skip
        self.replica_up = Gauge(ROUTER_REPLICA_UP, "1 if the replica answered its last load poll.", ("replica",),
                                registry=r)  # fmt: skip
        self.migrations = Counter(ROUTER_MIGRATIONS, "Live migrations the router started, by outcome.",
                                  ("outcome",), registry=r)  # fmt: skip
        self.requests = Counter(ROUTER_REQUESTS, "Requests through the router, by outcome.", ("outcome",),
                                registry=r)  # fmt: skip
        self.retries = Counter(ROUTER_RETRIES, "Admission rejections answered by trying the next replica.",
                               registry=r)  # fmt: skip
        self.stage_replans = Counter(ROUTER_STAGE_REPLANS, "Stage re-planning (DP) attempts, by outcome.",
                                     ("outcome",), registry=r)  # fmt: skip
        self.leader = Gauge(ROUTER_LEADER, "1 while this router is the pool's leader (plans stages, migrates).",
                            registry=r)  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
