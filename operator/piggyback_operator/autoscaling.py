"""Autoscaling: a KEDA ScaledObject per LLMService with `scaling.autoscaler: keda`, and which replica goes first.

KEDA's ScaledObject targets the LLMService itself through its /scale subresource (spec.replicas): the HPA KEDA
creates writes spec.replicas, the operator renders the pool's Deployment from its members' replicas. The
triggers are what the runtimes export and Prometheus scrapes (the PodMonitor in manifests/components), not GPU
utilisation, which says nothing about whether the SLOs hold:

- LS, queue: the service's queued requests (`vllm:num_requests_waiting`) per replica, AverageValue;
- LS, predicted capacity: the pool's LS request rate over that rate plus the runtimes' predicted headroom
  (`piggyback_ls_headroom_requests_per_second`: extra LS load that still fits under every SLO), a Value the
  HPA keeps at `targetCapacityUtilization` (replicas scale by current/target);
- BE: its backlog (queued BE requests) per replica.

The HPA takes the largest replica count any trigger asks for. Scale-down waits for
`scaleDownStabilizationSeconds` of agreeing recommendations and removes one replica per minute, so each
removed replica drains (runtime: readiness off at SIGTERM, in-flight requests get drain_timeout_s) before the
next goes. Which replica goes: see `deletion_order`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from piggyback_operator import pools
from piggyback_operator.api import API_VERSION, KIND
from piggyback_runtime import metrics as m

KEDA_API_VERSION = "keda.sh/v1alpha1"
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"
RATE_WINDOW = "2m"
# The ReplicaSet controller removes pods with the lowest controller.kubernetes.io/pod-deletion-cost first.
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
DRAIN_FIRST_COST = "-1000"


def prometheus_url() -> str:
    return os.environ.get("PIGGYBACK_PROMETHEUS_URL") or DEFAULT_PROMETHEUS_URL


def _pool_pods(member: pools.Member) -> str:
    """PromQL matchers for the pool's runtime pods: the namespace, and Deployment pod names
    (`<pool>-<template hash>-<suffix>`; the router's pods, `<pool>-router-...`, have one part more)."""
    return f'namespace="{member.namespace}", pod=~"{member.pool}-[a-z0-9]+-[a-z0-9]+"'


def queries(member: pools.Member) -> dict[str, str]:
    """The PromQL of each trigger, by trigger name."""
    pods = _pool_pods(member)
    service = f'{pods}, model_name="{member.name}", class="{member.service_class}"'
    out = {"queue": f"sum({m.NUM_WAITING}{{{service}}}) or vector(0)"}
    if member.service_class == "LS":
        rate = f'sum(rate({m.REQUESTS}_total{{{pods}, class="LS"}}[{RATE_WINDOW}]))'
        out["capacity"] = f"({rate}) / (({rate}) + sum({m.LS_HEADROOM_RPS}{{{pods}}})) or vector(0)"
    return out


def render_scaled_object(member: pools.Member) -> dict[str, Any]:
    """The ScaledObject of an LLMService with `scaling.autoscaler: keda`, owned by it."""
    scaling = member.spec.scaling
    assert scaling is not None and scaling.autoscaler == "keda"
    server = prometheus_url()
    found = queries(member)
    triggers = [{
        "type": "prometheus", "name": "queue", "metricType": "AverageValue",
        "metadata": {"serverAddress": server, "query": found["queue"],
                     "threshold": f"{scaling.target_waiting_requests_per_replica:g}", "ignoreNullValues": "true"},
    }]  # fmt: skip
    if "capacity" in found:
        triggers.append({
            "type": "prometheus", "name": "capacity", "metricType": "Value",
            "metadata": {"serverAddress": server, "query": found["capacity"],
                         "threshold": f"{scaling.target_capacity_utilization:g}", "ignoreNullValues": "true"},
        })  # fmt: skip
    return {
        "apiVersion": KEDA_API_VERSION, "kind": "ScaledObject",
        "metadata": {
            "name": member.name, "namespace": member.namespace,
            "labels": {**pools.BASE_LABELS, pools.LABEL_COMPONENT: "autoscaler", pools.LABEL_SERVICE: member.name,
                       pools.LABEL_POOL: member.pool},
            "ownerReferences": [pools.owner_reference(member, controller=True)],
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": member.name},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": scaling.polling_interval_seconds,
            # The HPA keeps KEDA's own name (keda-hpa-<name>): no clash with an HPA a person made.
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds,
                    # One replica a minute: each drains before the next goes.
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
                "scaleUp": {"stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}]},
            }}},
            "triggers": triggers,
        },
    }  # fmt: skip


def deletion_order(pods: Sequence[Any], in_flight: Mapping[str, float], count: int) -> list[str]:
    """The `count` runtime pods to remove first on a scale-down: not ready ones, then those with the fewest
    requests in flight at the last scrape (the shortest drain, the fewest requests to finish or fail), then by
    name. `pods` carry name and endpoint (None when not ready)."""
    def key(pod: Any) -> tuple[int, float, str]:
        if pod.endpoint is None:
            return (0, 0.0, pod.name)
        return (1, in_flight.get(pod.endpoint, float("inf")), pod.name)

    ranked = sorted(pods, key=key)
    return [p.name for p in ranked[: max(0, count)]]
