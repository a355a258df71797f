"""The operator's services-by-condition series (what the Capacity and Operator dashboards count)."""

from __future__ import annotations

from piggyback_operator import telemetry as t


def _series(service: str) -> dict[tuple[str, str, str], float]:
    (family,) = [f for f in t.REGISTRY.collect() if f.name == "llmservice_status_condition"]
    return {
        (s.labels["condition"], s.labels["status"], s.labels["reason"]): s.value
        for s in family.samples
        if s.labels["namespace"] == "telemetry-test" and s.labels["service"] == service
    }


def test_a_condition_change_replaces_its_series_so_counts_stay_one_per_service() -> None:
    t.record_conditions("telemetry-test", "chat", [{"type": "Admitted", "status": "False", "reason": "ScalingUp"},
                                                    {"type": "Ready", "status": "False", "reason": "ScalingUp"}])
    t.record_conditions("telemetry-test", "chat", [{"type": "Admitted", "status": "True", "reason": "Admitted"},
                                                    {"type": "Ready", "status": "True", "reason": "Ready"}])
    assert _series("chat") == {("Admitted", "True", "Admitted"): 1.0, ("Ready", "True", "Ready"): 1.0}


def test_a_deleted_service_leaves_no_series() -> None:
    t.record_conditions("telemetry-test", "gone", [{"type": "Ready", "status": "True", "reason": "Ready"}])
    t.forget_service("telemetry-test", "gone")
    assert _series("gone") == {}
