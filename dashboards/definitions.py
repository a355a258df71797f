"""The five Grafana dashboards, defined once here; `python -m dashboards.build` writes their JSON.

Every query filters on the dashboard variables: `$namespace` (the Kubernetes namespace Prometheus attaches to a
runtime pod's series), `$service` (the LLMService: `model_name` on runtime series, `service` on the operator's),
and `$class` (LS or BE). Each LS service's SLO comes from the `piggyback_slo_*_target_*` gauges the runtime
exports from its config, so thresholds drawn on the panels follow the config instead of numbers typed here.
Router series (one pool's router pods) carry `namespace` and `pool` (the PodMonitor sets `pool`).

Every metric the runtime, the router and the operator export is on a panel, except those in NOT_ON_A_PANEL
(tests/dashboards/test_definitions.py holds both to that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Series filters for the three kinds of series (runtime by service and class, runtime by service, per runtime).
NS = 'namespace=~"$namespace"'
SVC = f'{NS}, model_name=~"$service"'
SVC_CLASS = f'{SVC}, class=~"$class"'
# The operator's per-service series carry the LLMService's namespace and name (its ServiceMonitor honours labels).
OP_SVC = 'namespace=~"$namespace", service=~"$service"'
# SLO panels show LS requests only: BE requests have no SLO (and their queueing would dwarf the LS scale).
SVC_LS = f'{SVC}, class="LS"'
RATE = "$__rate_interval"

# The span the error-budget panel spends the budget over (a month, as the burn-rate alerts assume); with a
# shorter Prometheus retention it covers what is kept.
ERROR_BUDGET_PERIOD = "30d"

# A series whose legend matches this is a target drawn as a dashed red threshold line (Grafana override; the
# render script does the same).
THRESHOLD_LEGEND_REGEX = "^.* (SLO|target)$"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = field(default=("piggyback",))


def _quantiles(metric: str, labels: str, by: str, legend: str) -> tuple[Query, ...]:
    return tuple(
        Query(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{labels}}}[{RATE}])))",
              f"{legend} p{int(q * 100)}")
        for q in (0.5, 0.99)
    )  # fmt: skip


SLO_OVERVIEW = Dashboard(
    uid="piggyback-slo",
    title="Piggyback / SLO overview",
    description="Per LS service: attainment against its target, TTFT and TPOT against the SLO, violations, "
    "admission rejections and predicted headroom.",
    panels=(
        Panel("LS SLO attainment against target", (
            Query(f"piggyback_slo_attainment_ratio{{{SVC}}}", "{{model_name}} attained (sliding window)"),
            Query(f"max by (model_name) (piggyback_slo_attainment_target_ratio{{{SVC}}})", "{{model_name}} target"),
        ), unit="percentunit", description="Share of LS requests that met both TTFT and TPOT SLOs."),
        Panel("LS SLO attainment over the last hour", (
            Query(f'sum by (model_name) (increase(piggyback_slo_requests_total{{{SVC}, attained="true"}}[1h])) / '
                  f"sum by (model_name) (increase(piggyback_slo_requests_total{{{SVC}}}[1h]))", "{{model_name}}"),
        ), unit="percentunit", kind="stat"),
        Panel("TTFT p50 / p99 against SLO", (
            *_quantiles("vllm:time_to_first_token_seconds", SVC_LS, "model_name", "{{model_name}}"),
            Query(f"max by (model_name) (piggyback_slo_ttft_target_seconds{{{SVC}}})", "{{model_name}} SLO"),
        ), unit="s"),
        Panel("TPOT p50 / p99 against SLO", (
            *_quantiles("vllm:request_time_per_output_token_seconds", SVC_LS, "model_name", "{{model_name}}"),
            Query(f"max by (model_name) (piggyback_slo_tpot_target_seconds{{{SVC}}})", "{{model_name}} SLO"),
        ), unit="s"),
        Panel("SLO violations by type", (
            Query(f"sum by (model_name, type) (rate(piggyback_slo_violations_total{{{SVC}}}[{RATE}]))",
                  "{{model_name}} {{type}}"),
        ), unit="reqps"),
        Panel("Admission rejections by reason", (
            Query(f"sum by (model_name, reason) (rate(piggyback_admission_rejections_total{{{SVC_CLASS}}}[{RATE}]))",
                  "{{model_name}} {{reason}}"),
        ), unit="reqps", description="HTTP 429 at arrival: LS requests predicted to miss their SLO, BE queue full."),
        Panel("Predicted LS headroom against LS arrivals", (
            Query(f"sum(piggyback_ls_headroom_requests_per_second{{{NS}}})", "predicted headroom"),
            Query(f'sum(rate(piggyback_requests_total{{{NS}, class="LS"}}[{RATE}]))', "LS arrivals"),
        ), unit="reqps", description="Extra LS request rate the latency model predicts fits under the SLOs."),
        Panel(f"Error budget remaining ({ERROR_BUDGET_PERIOD})", (
            Query(f'1 - (sum by (model_name) (increase(piggyback_slo_requests_total{{{SVC}, attained="false"}}'
                  f"[{ERROR_BUDGET_PERIOD}])) / sum by (model_name) (increase(piggyback_slo_requests_total{{{SVC}}}"
                  f"[{ERROR_BUDGET_PERIOD}]))) / (1 - max by (model_name) (last_over_time("
                  f"piggyback_slo_attainment_target_ratio{{{SVC}}}[{ERROR_BUDGET_PERIOD}])))", "{{model_name}}"),
        ), unit="percentunit", kind="stat", description=f"Share of the error budget (1 - attainment target) not "
           f"spent by missed LS requests over the last {ERROR_BUDGET_PERIOD}; below 0: overspent."),
        Panel("LS requests in the attainment window", (
            Query(f"sum by (model_name) (piggyback_slo_window_requests{{{SVC}}})", "{{model_name}}"),
        ), description="How many requests the sliding attainment above is computed from (few: a noisy ratio)."),
        Panel("Queue time and end-to-end latency p50 / p99", (
            *_quantiles("vllm:request_queue_time_seconds", SVC_CLASS, "class", "{{class}} queue"),
            *_quantiles("vllm:e2e_request_latency_seconds", SVC_CLASS, "class", "{{class}} end-to-end"),
        ), unit="s", description="Arrival to first scheduled on the accelerator; arrival to last token."),
        Panel("Inter-token latency p50 / p99", (
            *_quantiles("vllm:inter_token_latency_seconds", SVC_CLASS, "class", "{{class}}"),
        ), unit="s", description="Time between consecutive output tokens, every request and token."),
    ),
)

COLOCATION = Dashboard(
    uid="piggyback-colocation",
    title="Piggyback / Colocation",
    description="How BE work rides along LS work: BE throughput, rows merged, CPU attention, KV memory on both "
    "sides, and how well the latency model predicts iteration time.",
    panels=(
        Panel("BE output tokens/s", (
            Query(f"sum by (pod) (piggyback_be_tokens_per_second{{{NS}}})", "{{pod}}"),
        ), unit="short"),
        Panel("BE rows merged per iteration", (
            *_quantiles("piggyback_be_rows_merged", NS, "pod", "{{pod}}"),
            Query(f"max by (pod) (piggyback_be_rows_allowed_per_layer{{{NS}}})", "{{pod}} allowed per layer"),
        )),
        Panel("CPU attention queue depth", (
            Query(f"sum by (pod) (piggyback_cpu_attention_queue_depth{{{NS}}})", "{{pod}} rows on CPU workers"),
        )),
        Panel("Engine blocked on CPU attention", (
            Query(f"sum by (pod) (rate(piggyback_cpu_attention_wait_seconds_total{{{NS}}}[{RATE}]))", "{{pod}}"),
        ), unit="percentunit", description="Share of time the engine waited for CPU results (should stay 0)."),
        Panel("KV cache usage: accelerator and host", (
            Query(f"sum by (pod) (vllm:kv_cache_usage_perc{{{NS}}})", "{{pod}} accelerator"),
            Query(f"max by (pod) (piggyback_host_kv_usage_ratio{{{NS}}})", "{{pod}} host"),
        ), unit="percentunit"),
        Panel("Iteration latency: predicted and measured", (
            Query(f"max by (pod) (piggyback_iteration_predicted_seconds{{{NS}}})", "{{pod}} predicted"),
            Query(f"max by (pod) (piggyback_iteration_measured_seconds{{{NS}}})", "{{pod}} measured"),
            *_quantiles("piggyback_iteration_seconds", NS, "pod", "{{pod}} iteration"),
        ), unit="s"),
        Panel("Latency model error", (
            Query(f"max by (pod) (piggyback_latency_model_error_ratio{{{NS}}})", "{{pod}} MAPE"),
        ), unit="percentunit"),
        Panel("CPU attention worker restarts", (
            Query(f"sum by (pod) (increase(piggyback_cpu_worker_restarts_total{{{NS}}}[1h]))", "{{pod}} last hour"),
        ), description="Workers replaced after dying (their BE rows are recomputed); should stay 0."),
        Panel("BE KV moves (hybrid placement)", (
            Query(f"sum by (pod, direction, outcome) (increase(piggyback_be_kv_moves_total{{{NS}}}[1h]))",
                  "{{pod}} {{direction}} {{outcome}}"),
        ), description="BE requests whose KV moved between HBM and host KV in the last hour; a failed move "
                       "leaves the request where it was."),
        # The database is shared by a pool's replicas: every replica reports the same counts, hence max.
        Panel("Batch API: lines of active batches", (
            Query(f"max by (batch_status, line_state) (piggyback_batch_lines{{{NS}}})",
                  "{{batch_status}} batches: {{line_state}}"),
            Query(f"sum by (pod) (piggyback_batch_lines_in_flight{{{NS}}})", "{{pod}} in flight"),
        ), description="Lines of validating, in_progress, cancelling and finalizing batches by state "
                       "(pending, leased, completed, failed), and the lines each replica runs now."),
        Panel("Batch API: lines finished/s", (
            Query(f"sum by (pod, line_state) (rate(piggyback_batch_lines_finished_total{{{NS}}}[{RATE}]))",
                  "{{pod}} {{line_state}}"),
        ), unit="reqps", description="Lines each replica ran to a recorded result (output or error file)."),
        Panel("Remote CPU attention nodes: per-layer round trip", (
            *_quantiles("piggyback_remote_round_trip_seconds", NS, "pod, worker", "{{pod}} worker {{worker}}"),
        ), unit="s", description="From a layer's batch sent to a remote worker to its results back (piggyback.remote). "
           "A batch older than layer_deadline_ms drops the worker."),
        Panel("Remote CPU attention nodes: rows, traffic, misses, KV held", (
            Query(f"sum by (pod, worker) (rate(piggyback_remote_be_rows_total{{{NS}}}[{RATE}]))",
                  "{{pod}} worker {{worker}} rows/s"),
            Query(f"sum by (pod, worker) (rate(piggyback_remote_bytes_sent_total{{{NS}}}[{RATE}]))",
                  "{{pod}} worker {{worker}} bytes/s sent"),
            Query(f"sum by (pod, worker) (rate(piggyback_remote_bytes_received_total{{{NS}}}[{RATE}]))",
                  "{{pod}} worker {{worker}} bytes/s received"),
            Query(f"sum by (pod, worker) (increase(piggyback_remote_deadline_misses_total{{{NS}}}[{RATE}]))",
                  "{{pod}} worker {{worker}} deadline misses"),
            Query(f"sum by (pod, worker) (piggyback_remote_kv_bytes{{{NS}}})", "{{pod}} worker {{worker}} KV bytes"),
            Query(f"sum by (pod) (piggyback_remote_worker_up{{{NS}}})", "{{pod}} workers up"),
            Query(f"sum by (pod) (increase(piggyback_remote_be_retries_total{{{NS}}}[{RATE}]))",
                  "{{pod}} BE requests prefilled again"),
        ), description="BE rows (row x layer) each remote worker served, bytes on its stream, deadline misses, "
           "the BE KV it holds, how many workers take rows, and BE requests prefilled again after their "
           "worker was lost (retry_on_worker_loss)."),
    ),
)

CAPACITY = Dashboard(
    uid="piggyback-capacity",
    title="Piggyback / Capacity and admission",
    description="Pools and replicas, predicted headroom against the LS load, host memory, and why services "
    "are or are not admitted.",
    panels=(
        Panel("Replicas: rendered by the operator and serving", (
            Query(f'sum by (pool) (piggyback_operator_pool_replicas{{{NS}}})', "{{pool}} rendered"),
            Query(f"count(vllm:cache_config_info{{{NS}}})", "runtimes serving"),
        )),
        Panel("Headroom against expected LS load", (
            Query(f"sum(piggyback_ls_headroom_requests_per_second{{{NS}}})", "predicted headroom"),
            Query(f'sum(rate(piggyback_requests_total{{{NS}, class="LS"}}[{RATE}]))', "LS load now"),
            Query(f'max_over_time(sum(rate(piggyback_requests_total{{{NS}, class="LS"}}[{RATE}]))[1h:])',
                  "LS load, 1h peak"),
        ), unit="reqps"),
        Panel("Host memory free for BE KV", (
            Query(f"sum by (pod) (piggyback_host_kv_free_bytes{{{NS}}})", "{{pod}}"),
        ), unit="bytes"),
        Panel("Requests running and waiting", (
            Query(f"sum by (class) (vllm:num_requests_running{{{SVC_CLASS}}})", "{{class}} running"),
            Query(f"sum by (class) (vllm:num_requests_waiting{{{SVC_CLASS}}})", "{{class}} waiting"),
        )),
        Panel("Services by Admitted reason", (
            Query(f'count by (reason) (llmservice_status_condition{{{OP_SVC}, condition="Admitted"}})', "{{reason}}"),
        ), kind="stat"),
        Panel("Tokens per second: prompt and generated", (
            Query(f"sum by (class) (rate(vllm:prompt_tokens_total{{{SVC_CLASS}}}[{RATE}]))", "{{class}} prompt"),
            Query(f"sum by (class) (rate(vllm:generation_tokens_total{{{SVC_CLASS}}}[{RATE}]))",
                  "{{class}} generated"),
        )),
        Panel("Finished requests by reason, preemptions", (
            Query(f"sum by (class, finished_reason) (rate(vllm:request_success_total{{{SVC_CLASS}}}[{RATE}]))",
                  "{{class}} {{finished_reason}}"),
            Query(f"sum by (class) (rate(vllm:num_preemptions_total{{{SVC_CLASS}}}[{RATE}]))",
                  "{{class}} preempted"),
        ), unit="reqps", description="Preempted requests lose their KV and are recomputed later."),
        Panel("Admission decisions", (
            Query(f"sum by (decision, reason) (increase(llmservice_admission_decisions_total[{RATE}]))",
                  "{{decision}} {{reason}}"),
        )),
    ),
)

OPERATOR = Dashboard(
    uid="piggyback-operator",
    title="Piggyback / Operator",
    description="The operator's reconciles, errors, admission decisions and the conditions it writes.",
    panels=(
        Panel("Reconciles by handler", (
            Query(f"sum by (handler) (rate(piggyback_operator_reconciles_total[{RATE}]))", "{{handler}}"),
        ), unit="ops"),
        Panel("Reconcile errors by handler and kind", (
            Query(f"sum by (handler, kind) (rate(piggyback_operator_reconcile_errors_total[{RATE}]))",
                  "{{handler}} {{kind}}"),
        ), unit="ops", description="temporary: retried (e.g. waiting for admission); permanent: needs a spec change."),
        Panel("Admission decisions by class and outcome", (
            Query(f"sum by (class, decision) (rate(llmservice_admission_decisions_total[{RATE}]))",
                  "{{class}} {{decision}}"),
        ), unit="ops"),
        Panel("Services by condition", (
            Query(f"sum by (condition, status) (llmservice_status_condition{{{OP_SVC}}})", "{{condition}}={{status}}"),
        ), kind="stat"),
        Panel("Runtime scrapes by outcome", (
            Query(f"sum by (outcome) (rate(piggyback_operator_runtime_scrapes_total[{RATE}]))", "{{outcome}}"),
        ), unit="ops"),
        Panel("Measured LS attainment in status", (
            Query(f"llmservice_slo_attainment_ratio{{{OP_SVC}}}", "{{namespace}}/{{service}}"),
        ), unit="percentunit"),
    ),
)

ROUTER = Dashboard(
    uid="piggyback-router",
    title="Piggyback / Router",
    description="Each pool's router (pools of several replicas): its leader, stage boundaries, load per stage "
    "and replica, outcomes, admission retries, live migrations and stage re-planning.",
    panels=(
        Panel("Leader routers per pool", (
            Query(f"sum by (pool) (piggyback_router_leader{{{NS}}})", "{{pool}}"),
        ), kind="stat", description="Exactly 1 per pool: the leader plans the stages and starts migrations."),
        Panel("Replicas answering the router's load poll", (
            Query(f"max by (pool, replica) (piggyback_router_replica_up{{{NS}}})", "{{pool}} {{replica}}"),
        ), description="1: the replica answered the last poll of its load (any of the pool's routers)."),
        Panel("Stage boundaries (tokens)", (
            Query(f"max by (pool, stage) (piggyback_router_stage_lower_tokens{{{NS}}})",
                  "{{pool}} stage {{stage}} from"),
            Query(f"max by (pool, stage) (piggyback_router_stage_upper_tokens{{{NS}}})",
                  "{{pool}} stage {{stage}} to"),
        ), description="lengthAware: each stage's length range; the last stage has no upper bound."),
        Panel("Requests waiting or running per stage", (
            Query(f"max by (pool, stage) (piggyback_router_stage_queue_requests{{{NS}}})", "{{pool}} stage {{stage}}"),
        )),
        Panel("Requests waiting or running per replica", (
            Query(f"max by (pool, replica) (piggyback_router_replica_queue_requests{{{NS}}})",
                  "{{pool}} {{replica}}"),
        )),
        Panel("Requests through the router by outcome", (
            Query(f"sum by (pool, outcome) (rate(piggyback_router_requests_total{{{NS}}}[{RATE}]))",
                  "{{pool}} {{outcome}}"),
            Query(f"sum by (pool) (rate(piggyback_router_admission_retries_total{{{NS}}}[{RATE}]))",
                  "{{pool}} 429 retried on another replica"),
        ), unit="reqps"),
        Panel("Live migrations by outcome", (
            Query(f"sum by (pool, outcome) (rate(piggyback_router_migrations_total{{{NS}}}[{RATE}]))",
                  "{{pool}} router: {{outcome}}"),
            Query(f"sum by (direction, outcome) (rate(piggyback_migrations_total{{{NS}}}[{RATE}]))",
                  "runtimes: {{direction}} {{outcome}}"),
        ), unit="ops", description="refused / failed / not_ready leave the request where it was."),
        Panel("Migration time (freeze to commit) p50 / p99", (
            *_quantiles("piggyback_migration_seconds", NS, "pod", "{{pod}}"),
        ), unit="s"),
        Panel("Stage re-plans by outcome", (
            Query(f"sum by (pool, outcome) (increase(piggyback_router_stage_replans_total{{{NS}}}[1h]))",
                  "{{pool}} {{outcome}}"),
        ), description="Last hour; bad_profile: a replica's latency profile was unusable and the plan stayed."),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (SLO_OVERVIEW, COLOCATION, CAPACITY, ROUTER, OPERATOR)

# Exported metrics deliberately on no panel, and why (a test fails on any other metric no panel reads).
_FOR_THE_ENDPOINT_PICKER = (
    "the pod-wide sum of a per-service gauge the panels show per service; exported for the Gateway API In"
    "ference Extension's endpoint picker, which reads one series per pod"
)
NOT_ON_A_PANEL: dict[str, str] = {
    "piggyback_batches": "the batches by status; the Batch API panels show their lines, which is what moves",
    "piggyback_pod_requests_waiting": _FOR_THE_ENDPOINT_PICKER,
    "piggyback_pod_requests_running": _FOR_THE_ENDPOINT_PICKER,
    "piggyback_pod_kv_cache_usage_ratio": _FOR_THE_ENDPOINT_PICKER,
}

# Grafana template variables: (name, label, query). `label_values(metric, label)` is Grafana's Prometheus syntax.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("namespace", "Namespace", "label_values(vllm:cache_config_info, namespace)"),
    ("service", "Service", 'label_values(vllm:num_requests_running{namespace=~"$namespace"}, model_name)'),
    ("class", "Class", 'label_values(vllm:num_requests_running{namespace=~"$namespace"}, class)'),
)

_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel_json(panel: Panel, panel_id: int) -> dict[str, Any]:
    width, height = 12, 8
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": _DATASOURCE,
        "gridPos": {"x": (panel_id - 1) % 2 * width, "y": (panel_id - 1) // 2 * height, "w": width, "h": height},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": _DATASOURCE, "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(panel.queries)
        ],
        "fieldConfig": {
            "defaults": {"unit": panel.unit},
            "overrides": [{
                "matcher": {"id": "byRegexp", "options": THRESHOLD_LEGEND_REGEX},
                "properties": [
                    {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                ],
            }],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
    }


def dashboard_json(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schemaVersion 39), provisionable as is."""
    templating: list[dict[str, Any]] = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"}
    ]
    for name, label, query in VARIABLES:
        templating.append({
            "name": name, "label": label, "type": "query", "datasource": _DATASOURCE,
            "query": {"query": query, "refId": f"var-{name}"}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
        })  # fmt: skip
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": templating},
        "panels": [_panel_json(p, i + 1) for i, p in enumerate(dashboard.panels)],
    }


def file_name(dashboard: Dashboard) -> str:
    return f"{dashboard.uid}.json"
