"""The operator's own Prometheus metrics (names per the reference conventions: units, `_total` counters)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "piggyback_operator_reconciles", "Handler invocations by handler.", ("handler",), registry=REGISTRY
)
RECONCILE_ERRORS = Counter(
    "piggyback_operator_reconcile_errors",
    "Handler failures by handler and kind (temporary: retried later; permanent: needs a spec change).",
    ("handler", "kind"), registry=REGISTRY,
)  # fmt: skip
ADMISSION_DECISIONS = Counter(
    "llmservice_admission_decisions",
    "Admission decisions by class, decision (admitted, rejected, scaling) and reason.",
    ("class", "decision", "reason"), registry=REGISTRY,
)  # fmt: skip
SCRAPES = Counter(
    "piggyback_operator_runtime_scrapes", "Runtime /metrics scrapes by outcome (ok, error).", ("outcome",),
    registry=REGISTRY,
)  # fmt: skip
SLO_ATTAINMENT = Gauge(
    "llmservice_slo_attainment_ratio", "Measured LS attainment per LLMService, as written into its status.",
    ("namespace", "service"), registry=REGISTRY,
)  # fmt: skip
# kube-state-metrics style: 1 for each LLMService's current condition (type, status, reason); the series of a
# condition's previous status/reason are removed, so `sum by (reason)` counts services.
SERVICE_CONDITION = Gauge(
    "llmservice_status_condition", "1 per LLMService condition as written into its status (by type, status, reason).",
    ("namespace", "service", "condition", "status", "reason"), registry=REGISTRY,
)  # fmt: skip
POOL_REPLICAS = Gauge(
    "piggyback_operator_pool_replicas", "Runtime replicas the operator rendered for each pool.", ("namespace", "pool"),
    registry=REGISTRY,
)  # fmt: skip

_written_conditions: dict[tuple[str, str], set[tuple[str, str, str]]] = {}


def record_conditions(namespace: str, service: str, conditions: list[dict[str, Any]]) -> None:
    """Export the conditions just written into a service's status, dropping the series they replace."""
    now = {(str(c["type"]), str(c["status"]), str(c.get("reason") or "")) for c in conditions}
    for gone in _written_conditions.get((namespace, service), set()) - now:
        SERVICE_CONDITION.remove(namespace, service, *gone)
    for condition, status, reason in now:
        SERVICE_CONDITION.labels(namespace, service, condition, status, reason).set(1)
    _written_conditions[(namespace, service)] = now


def forget_service(namespace: str, service: str) -> None:
    """A deleted service leaves no condition series behind."""
    for gone in _written_conditions.pop((namespace, service), set()):
        SERVICE_CONDITION.remove(namespace, service, *gone)
