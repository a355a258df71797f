"""The operator's own Prometheus metrics (names per the reference conventions: units, `_total` counters)."""

from __future__ import annotations

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
