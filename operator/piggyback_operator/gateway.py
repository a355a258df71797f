"""`placement.routing: gateway`: the pool as a Gateway API Inference Extension InferencePool, with its EPP.

Per pool the operator renders (owned by every member, like the pool's other children):
- an `inference.networking.k8s.io/v1` InferencePool `<pool>` selecting the pool's runtime pods on the runtime
  port, whose endpointPickerRef names the EPP Service; an HTTPRoute of the user's Gateway routes to it;
- the stock endpoint picker (EPP, image `PIGGYBACK_EPP_IMAGE`): a ServiceAccount, a RoleBinding to the
  `piggyback-epp` ClusterRole shipped in manifests/base (the operator may bind exactly that role, so it needs
  no pod or InferencePool reads of its own to grant them), a Deployment and its Service (gRPC ext-proc).

The EPP scrapes each runtime pod's /metrics for the names given below: queue depth, running requests,
KV-cache usage and the cache configuration. Its defaults are vLLM's names, which the runtime exports too, but
per service (labels model_name, class), and the EPP reads a single series of a family (the latest by
timestamp: the first listed), so on a pod serving an LS and a BE service it would see one service's queue.
The flags therefore name the runtime's pod-wide totals (piggyback_pod_*, one unlabelled series each);
`vllm:cache_config_info` is one series already. LoRA scraping is switched off (an empty --lora-info-metric,
as the upstream chart does for servers without adapters): the runtime serves no LoRA adapters, so it has no
`vllm:lora_requests_info` to export, and a series with empty adapter lists would carry nothing.

Flags, ports and probes follow the EPP of gateway-api-inference-extension v1.5.0 (pkg/epp/server/options.go,
config/charts/epplib); the InferencePool validates against that release's CRD (tests/operator/schemas/).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from piggyback_operator import pools
from piggyback_runtime import metrics as m

INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"
INFERENCE_POOL_GROUP = "inference.networking.k8s.io"
DEFAULT_EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
EPP_CLUSTER_ROLE = "piggyback-epp"  # manifests/base/epp-rbac.yaml
EPP_GRPC_PORT = 9002  # ext-proc, what the gateway calls
EPP_HEALTH_PORT = 9003  # gRPC health
EPP_METRICS_PORT = 9090
EPP_UID = 65532  # the distroless image's nonroot user
# What the EPP reads from each model server's /metrics (its flags), and the runtime's name for each.
EPP_METRIC_FLAGS: dict[str, str] = {
    "total-queued-requests-metric": m.POD_REQUESTS_WAITING,
    "total-running-requests-metric": m.POD_REQUESTS_RUNNING,
    "kv-cache-usage-percentage-metric": m.POD_KV_CACHE_USAGE,
    "cache-info-metric": m.CACHE_CONFIG_INFO,
    "lora-info-metric": "",  # no LoRA adapters: scraping off
}


def epp_image() -> str:
    return os.environ.get("PIGGYBACK_EPP_IMAGE") or DEFAULT_EPP_IMAGE


def epp_name(pool: str) -> str:
    return f"{pool}-epp"


def _meta(name: str, namespace: str, members: Sequence[pools.Member], component: str) -> dict[str, Any]:
    return {
        "name": name, "namespace": namespace,
        "labels": {**pools.BASE_LABELS, pools.LABEL_COMPONENT: component, pools.LABEL_EPP_FOR: members[0].pool},
        "ownerReferences": [pools.owner_reference(m, controller=False) for m in pools.ordered(members)],
    }  # fmt: skip


def render_inference_pool(pool: str, namespace: str, members: Sequence[pools.Member]) -> dict[str, Any]:
    meta = _meta(pool, namespace, members, "inference-pool")
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION, "kind": "InferencePool", "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {pools.LABEL_POOL: pool}},
            "targetPorts": [{"number": pools.RUNTIME_PORT}],
            "appProtocol": "http",
            # FailOpen: with the EPP down the gateway still reaches a replica, whose own admission (429 with
            # Retry-After when the SLOs have no room) still protects the LS services.
            "endpointPickerRef": {"kind": "Service", "name": epp_name(pool), "port": {"number": EPP_GRPC_PORT},
                                  "failureMode": "FailOpen"},
        },
    }  # fmt: skip


def epp_args(pool: str, namespace: str) -> list[str]:
    args = ["--pool-name", pool, "--pool-namespace", namespace, "--pool-group", INFERENCE_POOL_GROUP,
            "--grpc-port", str(EPP_GRPC_PORT), "--grpc-health-port", str(EPP_HEALTH_PORT),
            "--metrics-port", str(EPP_METRICS_PORT), "--zap-encoder", "json"]  # fmt: skip
    return args + [f"--{flag}={name}" for flag, name in EPP_METRIC_FLAGS.items()]


def render_epp(
    pool: str, namespace: str, members: Sequence[pools.Member], enabled: bool = True
) -> list[dict[str, Any]]:
    """ServiceAccount, RoleBinding, Deployment and Service of the pool's EPP (0 replicas unless `enabled`:
    a pool that left gateway routing keeps the objects, scaled down, until its members go)."""
    name = epp_name(pool)
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, namespace, members, "epp")}
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(name, namespace, members, "epp"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": EPP_CLUSTER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }  # fmt: skip
    grpc_probe = {"grpc": {"port": EPP_HEALTH_PORT, "service": "inference-extension"}}
    container = {
        "name": "epp", "image": epp_image(), "args": epp_args(pool, namespace),
        "env": [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "grpc", "containerPort": EPP_GRPC_PORT, "protocol": "TCP"},
                  {"name": "grpc-health", "containerPort": EPP_HEALTH_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": EPP_METRICS_PORT, "protocol": "TCP"}],
        "readinessProbe": {**grpc_probe, "periodSeconds": 2},
        "livenessProbe": {**grpc_probe, "initialDelaySeconds": 5, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": EPP_UID, "runAsGroup": EPP_UID, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "privileged": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }  # fmt: skip
    selector = {pools.LABEL_EPP_FOR: pool}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, namespace, members, "epp"),
        "spec": {
            "replicas": 1 if enabled else 0,
            # One active picker (its prefix-cache state is per process); Recreate, as upstream ships it.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**pools.BASE_LABELS, pools.LABEL_COMPONENT: "epp", **selector}},
                "spec": {
                    "serviceAccountName": name,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    # Mirrors the longest drain of the pool's pods, as upstream advises.
                    "terminationGracePeriodSeconds": pools.termination_grace_period_s(members),
                    "enableServiceLinks": False,
                    "containers": [container],
                },
            },
        },
    }  # fmt: skip
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace, members, "epp"),
        "spec": {"selector": selector, "type": "ClusterIP", "ports": [
            {"name": "grpc-ext-proc", "port": EPP_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
             "appProtocol": "http2"},
            {"name": "http-metrics", "port": EPP_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
        ]},
    }  # fmt: skip
    return [account, binding, deployment, service]
