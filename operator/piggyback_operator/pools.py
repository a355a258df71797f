"""Pools: the runtime pods shared by the LLMServices of one model in one placement pool, and their children.

Everything here is a pure function of the member services, so a restarted operator renders the same bodies
and server-side apply turns them into no-ops. The pool's name is derived from the pool name and a digest of
the model spec: same weights and same pool, same runtime pods.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from piggyback_operator.api import API_VERSION, KIND, LLMServiceSpec, Toleration
from piggyback_operator.placement import GPU_RESOURCE
from piggyback_operator.quantity import format_bytes, parse_quantity
from piggyback_runtime.config import RuntimeConfig

LABEL_POOL = "piggyback.dev/pool"
LABEL_SERVICE = "piggyback.dev/llmservice"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_CONFIG_HASH = "piggyback.dev/config-hash"
ANNOTATION_SCALED = "piggyback.dev/scaled-replicas"  # replicas added by admission; survives restarts
BASE_LABELS = {"app.kubernetes.io/name": "piggyback", "app.kubernetes.io/managed-by": "piggyback-operator"}
CONFIG_KEY = "runtime.yaml"
CONFIG_DIR = "/etc/piggyback"
RUNTIME_PORT = 8000
PVC_MOUNT_ROOT = "/models"  # where pvc://CLAIM/PATH is mounted; the runtime reads PIGGYBACK_PVC_MOUNT_ROOT
BASE_MEMORY_BYTES = 4 * 2**30  # the runtime process itself: weights staging, tokenizer, Python
BASE_CPU_CORES = 1


def runtime_image() -> str:
    return os.environ.get("PIGGYBACK_RUNTIME_IMAGE", "ghcr.io/piggyback-dev/piggyback:0.1.0")


@dataclass(frozen=True)
class Member:
    """One LLMService as a pool sees it."""

    name: str
    namespace: str
    uid: str
    spec: LLMServiceSpec
    admitted: bool
    deleting: bool
    created: str  # creationTimestamp, for a stable oldest-first order

    @property
    def pool(self) -> str:
        return pool_name(self.spec)

    @property
    def service_class(self) -> str:
        return self.spec.service_class


def model_digest(spec: LLMServiceSpec) -> str:
    canonical = json.dumps(spec.model.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def pool_name(spec: LLMServiceSpec) -> str:
    """`<placement.pool>-<model digest>`: a DNS label (pool names are at most 40 characters)."""
    return f"{spec.placement.pool}-{model_digest(spec)}"


def ordered(members: Sequence[Member]) -> list[Member]:
    return sorted(members, key=lambda m: (m.created, m.name))


def owner_reference(member: Member, controller: bool) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION, "kind": KIND, "name": member.name, "uid": member.uid,
        "controller": controller, "blockOwnerDeletion": True,
    }  # fmt: skip


def render_runtime_config(members: Sequence[Member]) -> RuntimeConfig:
    """The RuntimeConfig of a pool whose admitted members are `members` (all of one model)."""
    members = ordered(members)
    model = members[0].spec.model
    services = []
    for m in sorted(members, key=lambda m: m.name):
        service: dict[str, Any] = {"name": m.name, "class": m.spec.service_class}
        if m.spec.slo is not None:
            service["slo"] = {
                "ttft_ms": m.spec.slo.ttft_ms, "tpot_ms": m.spec.slo.tpot_ms,
                "attainment_target": m.spec.slo.attainment_target,
            }  # fmt: skip
        services.append(service)
    return RuntimeConfig.from_dict(
        {
            "model": {
                "uri": model.uri, "served_model_name": model.served_name, "dtype": model.dtype,
                "max_model_len": model.max_context_length,
            },
            "services": services,
            "piggyback": piggyback_section(members),
            "server": {"host": "0.0.0.0", "port": RUNTIME_PORT},
        },
        source=f"pool {members[0].pool}",
    )


def piggyback_section(members: Sequence[Member]) -> dict[str, Any]:
    """Host KV and CPU attention threads from what the members asked for (the pod requests the same)."""
    host_bytes = sum(parse_quantity(m.spec.resources.host_memory) for m in members)
    cores = sum(m.spec.resources.cpu_cores for m in members)
    section: dict[str, Any] = {}
    if host_bytes > 0:
        section["host_kv_memory_gib"] = host_bytes / 2**30
    if cores > 0:
        section["cpu_threads_per_worker"] = cores
    return section


def merged_node_selector(members: Sequence[Member]) -> tuple[dict[str, str], list[str]]:
    """The union of the members' selectors (a node must satisfy all), and the conflicting keys."""
    merged: dict[str, str] = {}
    conflicts: list[str] = []
    for m in ordered(members):
        for key, value in m.spec.placement.node_selector.items():
            if key in merged and merged[key] != value:
                conflicts.append(f"{key} ({merged[key]!r} vs {value!r} from {m.name})")
            merged.setdefault(key, value)
    return merged, conflicts


def merged_tolerations(members: Sequence[Member]) -> list[Toleration]:
    seen: list[Toleration] = []
    for m in ordered(members):
        for t in m.spec.placement.tolerations:
            if t not in seen:
                seen.append(t)
    return seen


def gpus_per_replica(members: Sequence[Member]) -> int:
    return max(m.spec.resources.gpus for m in members)


def memory_per_replica(members: Sequence[Member]) -> float:
    return BASE_MEMORY_BYTES + sum(parse_quantity(m.spec.resources.host_memory) for m in members)


def cpu_per_replica(members: Sequence[Member]) -> int:
    return BASE_CPU_CORES + sum(m.spec.resources.cpu_cores for m in members)


def desired_replicas(members: Sequence[Member], scaled: int) -> int:
    """At least every member's `replicas`; admission-driven scale-ups kept within the largest max."""
    floor = max(m.spec.replicas for m in members)
    ceiling = max(floor, *(m.spec.max_replicas for m in members))
    return min(max(floor, scaled), ceiling)


def labels(pool: str) -> dict[str, str]:
    return {**BASE_LABELS, LABEL_COMPONENT: "runtime", LABEL_POOL: pool}


def _volumes(uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": "", "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # torch shares tensors through /dev/shm
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if uri.startswith("pvc://"):
        claim = uri.removeprefix("pvc://").split("/", 1)[0]
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    return volumes, mounts


def render_children(
    pool: str, namespace: str, members: Sequence[Member], replicas: int, scaled: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ConfigMap, Deployment) of a pool serving the admitted `members`, owned by every one of them."""
    members = ordered(members)
    config = render_runtime_config(members)
    config_yaml = config.to_yaml()
    config_hash = hashlib.sha256(config_yaml.encode()).hexdigest()[:16]
    owners = [owner_reference(m, controller=False) for m in members]  # shared: no single controller
    pool_labels = labels(pool)
    selector, _ = merged_node_selector(members)
    tolerations = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in merged_tolerations(members)]
    memory = format_bytes(memory_per_replica(members))
    gpus = str(gpus_per_replica(members))
    volumes, mounts = _volumes(config.model.uri)
    volumes[0]["configMap"]["name"] = pool
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": pool, "namespace": namespace, "labels": pool_labels, "ownerReferences": owners},
        "data": {CONFIG_KEY: config_yaml},
    }  # fmt: skip
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "runtime",
        "image": runtime_image(),
        "command": ["piggyback"],
        "args": ["serve", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "env": [{"name": "PIGGYBACK_PVC_MOUNT_ROOT", "value": PVC_MOUNT_ROOT}],
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": str(cpu_per_replica(members)), "memory": memory, GPU_RESOURCE: gpus},
            "limits": {"memory": memory, GPU_RESOURCE: gpus},
        },
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        # Loading weights takes minutes on large models; liveness starts counting after this succeeds.
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 90},
        "securityContext": {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": pool, "namespace": namespace, "labels": pool_labels, "ownerReferences": owners,
            "annotations": {ANNOTATION_SCALED: str(scaled)},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {LABEL_POOL: pool}},
            # No surge: a surge replica needs a spare GPU, which a full node does not have.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": pool_labels, "annotations": {ANNOTATION_CONFIG_HASH: config_hash}},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "nodeSelector": selector,
                    "tolerations": tolerations,
                    "containers": [container],
                    "volumes": volumes,
                    "enableServiceLinks": False,
                },
            },
        },
    }  # fmt: skip
    return configmap, deployment


def render_service(member: Member) -> dict[str, Any]:
    """The Service of one LLMService: the pool's pods, owned by that LLMService alone."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": member.name, "namespace": member.namespace,
            "labels": {**BASE_LABELS, LABEL_COMPONENT: "endpoint", LABEL_SERVICE: member.name, LABEL_POOL: member.pool},
            "ownerReferences": [owner_reference(member, controller=True)],
        },
        "spec": {
            "selector": {LABEL_POOL: member.pool},
            "ports": [{"name": "http", "port": RUNTIME_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }  # fmt: skip


def endpoint_url(member: Member) -> str:
    return f"http://{member.name}.{member.namespace}.svc:{RUNTIME_PORT}/v1"


def pod_endpoint(body: Mapping[str, Any]) -> str | None:
    """host:port of a ready runtime pod, from its IP and its container port named http."""
    status = body.get("status", {}) or {}
    ip = status.get("podIP")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if not ip or not ready or body.get("metadata", {}).get("deletionTimestamp"):
        return None
    for container in body.get("spec", {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http":
                return f"{ip}:{port['containerPort']}"
    return f"{ip}:{RUNTIME_PORT}"
