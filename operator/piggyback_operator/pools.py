"""Pools: the runtime pods shared by the LLMServices of one model in one placement pool, and their children.

Everything here is a pure function of the member services, so a restarted operator renders the same bodies
and server-side apply turns them into no-ops. The pool's name is derived from the pool name and a digest of
the model spec: same weights and same pool, same runtime pods.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from piggyback_operator.api import API_VERSION, KIND, LLMServiceSpec, Toleration
from piggyback_operator.placement import GPU_RESOURCE, gpu_memory_bytes
from piggyback_operator.quantity import format_bytes, parse_quantity
from piggyback_runtime.config import INTERNAL_TOKEN_ENV, EngineConfig, RuntimeConfig

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
RUNTIME_UID = 10001  # the image's `piggyback` user (Dockerfile)
CACHE_DIR = "/var/cache/piggyback"  # emptyDir: the CPU-attention kernel build and the latency profile
# The runtime's default (ServerConfig.drain_timeout_s), repeated so the grace period is derived from one number.
DEFAULT_DRAIN_TIMEOUT_S = 20
# The runtime exits within drain_timeout_s + 5 s (it fails what is left, then stops its workers); the other
# 10 s cover process start-up of the teardown and a loaded node, so the kubelet's SIGKILL never cuts the drain.
GRACE_MARGIN_S = 15
# The share of GPU memory a runtime fills: the runtime's own default, rendered so the ConfigMap states it.
GPU_MEMORY_UTILIZATION = EngineConfig.model_fields["gpu_memory_utilization"].default


def runtime_image() -> str:
    return os.environ.get("PIGGYBACK_RUNTIME_IMAGE", "ghcr.io/piggyback-dev/piggyback-runtime:0.1.0")


def router_image() -> str:
    """The pool routers' image: the Dockerfile's torch-free `router` target."""
    return os.environ.get("PIGGYBACK_ROUTER_IMAGE", "ghcr.io/piggyback-dev/piggyback-router:0.1.0")


ROUTER_CLUSTER_ROLE = "piggyback-router"  # manifests/base/router-rbac.yaml: the router's Lease (leader election)


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


def api_key_env(service: str) -> str:
    """The environment variable holding a service's API key: PIGGYBACK_API_KEY_<NAME>, '-' as '_'."""
    return "PIGGYBACK_API_KEY_" + service.upper().replace("-", "_")


def drain_timeout_s(members: Sequence[Member]) -> int:
    """The pool drains for the longest any member asked for: one process serves them all."""
    asked = [m.spec.drain_timeout_seconds for m in members if m.spec.drain_timeout_seconds is not None]
    return max(asked) if asked else DEFAULT_DRAIN_TIMEOUT_S


def termination_grace_period_s(members: Sequence[Member]) -> int:
    return math.ceil(drain_timeout_s(members)) + GRACE_MARGIN_S


def render_runtime_config(members: Sequence[Member], remote: Mapping[str, Any] | None = None) -> RuntimeConfig:
    """The RuntimeConfig of a pool whose admitted members are `members` (all of one model); `remote`: its
    piggyback.remote section (the pool has a RayCluster of CPU attention nodes)."""
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
        if m.spec.limits is not None:
            if m.spec.limits.default_max_tokens is not None:
                service["default_max_tokens"] = m.spec.limits.default_max_tokens
            if m.spec.limits.max_tokens is not None:
                service["max_tokens_limit"] = m.spec.limits.max_tokens
        if m.spec.api_key_secret_ref is not None:
            service["api_key_env"] = api_key_env(m.name)
        services.append(service)
    return RuntimeConfig.from_dict(
        {
            "model": {
                "uri": model.uri, "served_model_name": model.served_name, "dtype": model.dtype,
                "max_model_len": model.max_context_length,
            },
            "services": services,
            "engine": engine_section(members),
            "piggyback": {**piggyback_section(members), **({"remote": dict(remote)} if remote else {})},
            "server": {"host": "0.0.0.0", "port": RUNTIME_PORT, "drain_timeout_s": drain_timeout_s(members)},
            **batch_section(members),
        },
        source=f"pool {members[0].pool}",
    )


def engine_section(members: Sequence[Member]) -> dict[str, Any]:
    """The accelerator KV cache's share of GPU memory, and the GPU's memory where the pool's nodeSelector pins
    its product (node labels from GPU feature discovery). The runtime measures the device it lands on and sizes
    the cache from it; the pinned figure caps that, so a replica never counts on more than the product has."""
    section: dict[str, Any] = {"gpu_memory_utilization": GPU_MEMORY_UTILIZATION}
    if (tp := tensor_parallel_size(members)) > 1:
        section["tensor_parallel_size"] = tp
    selector, _ = merged_node_selector(members)
    memory = gpu_memory_bytes(selector)
    if memory is not None:
        section["accelerator_memory_gib"] = math.floor(memory / 2**20) / 1024  # whole MiB: a stable rendering
    return section


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
        for key, value in m.spec.node_selector.items():
            if key in merged and merged[key] != value:
                conflicts.append(f"{key} ({merged[key]!r} vs {value!r} from {m.name})")
            merged.setdefault(key, value)
    return merged, conflicts


def merged_tolerations(members: Sequence[Member]) -> list[Toleration]:
    seen: list[Toleration] = []
    for m in ordered(members):
        for t in m.spec.tolerations:
            if t not in seen:
                seen.append(t)
    return seen


@dataclass(frozen=True)
class PodOverrides:
    """The members' spec.pod merged: the pod is one, its members many. Lists and maps are merged by name
    (the first member, by creation, wins a name both set); single values come from the first that sets them."""

    image: str | None
    image_pull_secrets: list[dict[str, Any]]
    priority_class_name: str | None
    affinity: dict[str, Any] | None
    env: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    volume_mounts: list[dict[str, Any]]
    annotations: dict[str, str]
    labels: dict[str, str]
    requests: dict[str, str]
    limits: dict[str, str]


def merged_pod_settings(members: Sequence[Member]) -> PodOverrides:
    def first(values: Iterable[Any]) -> Any:
        return next((v for v in values if v is not None), None)

    def by_name(lists: Iterable[Iterable[Any]], key: str = "name") -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for items in lists:
            for item in items:
                body = item.model_dump(mode="json", by_alias=True, exclude_none=True)
                out.setdefault(body[key], body)
        return list(out.values())

    def merged(maps: Iterable[Mapping[str, str]]) -> dict[str, str]:
        out: dict[str, str] = {}
        for m in maps:
            for k, v in m.items():
                out.setdefault(k, v)
        return out

    pods = [m.spec.pod for m in ordered(members)]
    return PodOverrides(
        image=first(p.image for p in pods),
        image_pull_secrets=by_name(p.image_pull_secrets for p in pods),
        priority_class_name=first(p.priority_class_name for p in pods),
        affinity=first(p.affinity for p in pods),
        env=by_name(p.env for p in pods),
        volumes=by_name(p.volumes for p in pods),
        volume_mounts=by_name((p.volume_mounts for p in pods), key="mountPath"),
        annotations=merged(p.annotations for p in pods),
        labels=merged(p.labels for p in pods),
        requests=merged(p.resources.requests for p in pods if p.resources),
        limits=merged(p.resources.limits for p in pods if p.resources),
    )  # fmt: skip


def tensor_parallel_size(members: Sequence[Member]) -> int:
    """The pool's ranks per replica: the largest any member asks for (members share the model)."""
    return max(m.spec.tensor_parallel_size for m in members)


def gpus_per_replica(members: Sequence[Member]) -> int:
    """One GPU per tensor-parallel rank at least."""
    return max(tensor_parallel_size(members), *(m.spec.resources.gpus for m in members))


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
    # The root filesystem is read-only; these are the only places the runtime writes.
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": "", "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # torch shares tensors through /dev/shm
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if uri.startswith("pvc://"):
        claim = uri.removeprefix("pvc://").split("/", 1)[0]
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    return volumes, mounts


# --- the Batch API (spec.batch of a BE member): its storage, a claim or a shared Postgres -----------------------
BATCH_DIR = "/var/lib/piggyback/batch"
BATCH_VOLUME = "batch"
BATCH_DATABASE_URL_ENV = "PIGGYBACK_BATCH_DATABASE_URL"


def batch_member(members: Sequence[Member]) -> Member | None:
    """The member whose spec.batch the pool serves (the first by name that enables it)."""
    return next((m for m in sorted(members, key=lambda m: m.name) if m.spec.batch and m.spec.batch.enabled), None)


def batch_claim_name(pool: str) -> str:
    return f"{pool}-batch"


def batch_section(members: Sequence[Member]) -> dict[str, Any]:
    """The runtime config's `batch` section: SQLite on the claim's mount, or the Postgres URL from the env."""
    member = batch_member(members)
    if member is None:
        return {}
    assert member.spec.batch is not None
    if member.spec.batch.storage.postgres_secret_ref is not None:
        return {"batch": {"enabled": True, "database_url_env": BATCH_DATABASE_URL_ENV}}
    return {"batch": {"enabled": True, "directory": BATCH_DIR}}


def batch_pod_parts(pool: str, members: Sequence[Member]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                    list[dict[str, Any]]]:  # fmt: skip
    """(volumes, mounts, env) the runtime container needs for the pool's batch storage."""
    member = batch_member(members)
    if member is None:
        return [], [], []
    assert member.spec.batch is not None
    ref = member.spec.batch.storage.postgres_secret_ref
    if ref is not None:  # read by the pod through secretKeyRef: the operator never sees the URL
        secret = {"name": ref.name, "key": ref.key, "optional": False}
        return [], [], [{"name": BATCH_DATABASE_URL_ENV, "valueFrom": {"secretKeyRef": secret}}]
    volume = {"name": BATCH_VOLUME, "persistentVolumeClaim": {"claimName": batch_claim_name(pool)}}
    return [volume], [{"name": BATCH_VOLUME, "mountPath": BATCH_DIR}], []


def render_batch_claim(pool: str, namespace: str, members: Sequence[Member]) -> dict[str, Any] | None:
    """The pool's batch PersistentVolumeClaim, or None (no member asks for one). Created once, never rewritten
    and owned by nobody: batches outlive the pool's Deployment."""
    member = batch_member(members)
    if member is None or member.spec.batch is None or member.spec.batch.storage.pvc is None:
        return None
    pvc = member.spec.batch.storage.pvc
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": pvc.size}}}
    if pvc.storage_class_name is not None:
        spec["storageClassName"] = pvc.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": batch_claim_name(pool), "namespace": namespace, "labels": labels(pool)},
            "spec": spec}  # fmt: skip


INTERNAL_TOKEN_KEY = "token"


def internal_token_secret_name(pool: str) -> str:
    return f"{pool}-internal-token"


def internal_token_env(pool: str) -> dict[str, Any]:
    """The pool's internal token (migration and profile endpoints) for its runtime and router containers."""
    ref = {"name": internal_token_secret_name(pool), "key": INTERNAL_TOKEN_KEY, "optional": False}
    return {"name": INTERNAL_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}}


def render_internal_token_secret(pool: str, namespace: str, deployment: Mapping[str, Any]) -> dict[str, Any]:
    """A random token, created once per pool and never rewritten. Without it the runtime's internal endpoints
    (export a request with its KV, import one) would be open to every pod that may reach the runtime port.
    Owned by the pool's runtime Deployment, which lives exactly as long as the pool."""
    meta = deployment["metadata"]
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"], "uid": meta["uid"],
             "controller": False, "blockOwnerDeletion": True}  # fmt: skip
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": internal_token_secret_name(pool), "namespace": namespace, "labels": labels(pool),
                     "ownerReferences": [owner]},
        "stringData": {INTERNAL_TOKEN_KEY: secrets.token_urlsafe(32)},
    }  # fmt: skip


def runtime_env(members: Sequence[Member]) -> list[dict[str, Any]]:
    """The runtime container's environment: writable cache paths, and each service's API key from its Secret."""
    env: list[dict[str, Any]] = [
        {"name": "PIGGYBACK_PVC_MOUNT_ROOT", "value": PVC_MOUNT_ROOT},
        # A read-only root: HOME and every cache the runtime fills point into emptyDirs. XDG_CACHE_HOME holds
        # the CPU-attention kernel build (cpu_attention._cache_root) and torch's caches.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "PIGGYBACK_PROFILE_DIR", "value": f"{CACHE_DIR}/profiles"},
    ]
    for m in sorted(members, key=lambda m: m.name):
        ref = m.spec.api_key_secret_ref
        if ref is not None:
            # Not optional: a missing Secret keeps the pod from starting (CreateContainerConfigError) rather
            # than serving an unauthenticated endpoint the owner meant to protect.
            env.append({"name": api_key_env(m.name),
                        "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": False}}})
    return env


def container_security_context() -> dict[str, Any]:
    """Pod Security Standards "restricted", repeated on the container so it holds whatever the pod says."""
    return {
        "runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip


def render_children(
    pool: str, namespace: str, members: Sequence[Member], replicas: int, scaled: int,
    remote: Mapping[str, Any] | None = None, ray_address: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ConfigMap, Deployment) of a pool serving the admitted `members`, owned by every one of them.
    `remote`/`ray_address`: the pool's CPU attention nodes (raycluster.py); the pods join that Ray cluster as
    drivers (RAY_ADDRESS)."""
    members = ordered(members)
    config = render_runtime_config(members, remote)
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
    batch_volumes, batch_mounts, batch_env = batch_pod_parts(pool, members)
    volumes, mounts = [*volumes, *batch_volumes], [*mounts, *batch_mounts]
    pod = merged_pod_settings(members)
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": pool, "namespace": namespace, "labels": pool_labels, "ownerReferences": owners},
        "data": {CONFIG_KEY: config_yaml},
    }  # fmt: skip
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "runtime",
        "image": pod.image or runtime_image(),
        "command": ["piggyback"],
        "args": ["serve", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        # The operator's own variables first; spec.pod.env cannot name them (api.RESERVED_ENV_*).
        "env": [*runtime_env(members), internal_token_env(pool), *batch_env,
                *([{"name": "RAY_ADDRESS", "value": ray_address}] if ray_address else []), *pod.env],
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": str(cpu_per_replica(members)), "memory": memory, **pod.requests, GPU_RESOURCE: gpus},
            "limits": {"memory": memory, **pod.limits, GPU_RESOURCE: gpus},
        },
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        # Loading weights takes minutes on large models; liveness starts counting after this succeeds.
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 90},
        "securityContext": container_security_context(),
        "volumeMounts": [*mounts, *pod.volume_mounts],
    }
    pod_spec: dict[str, Any] = {}
    if pod.priority_class_name:
        pod_spec["priorityClassName"] = pod.priority_class_name
    if pod.affinity:
        pod_spec["affinity"] = pod.affinity
    if pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = pod.image_pull_secrets
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
                # The members' labels and annotations cannot override the operator's (CEL refuses those keys).
                "metadata": {"labels": {**pod.labels, **pool_labels},
                             "annotations": {**pod.annotations, ANNOTATION_CONFIG_HASH: config_hash}},
                "spec": {
                    **pod_spec,
                    "securityContext": {
                        "runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID,
                        "fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # On SIGTERM the runtime drains for drain_timeout_s and exits within 5 s more; SIGKILL
                    # comes only after this. No preStop hook: see operator/README.md (Shutdown).
                    "terminationGracePeriodSeconds": termination_grace_period_s(members),
                    "automountServiceAccountToken": False,  # the runtime never talks to the API server
                    "nodeSelector": selector,
                    "tolerations": tolerations,
                    "containers": [container],
                    "volumes": [*volumes, *pod.volumes],
                    "enableServiceLinks": False,
                },
            },
        },
    }  # fmt: skip
    return configmap, deployment


def parse_selector(text: str) -> dict[str, str]:
    """`k=v,k2=v2` as matchLabels; an empty string is an empty selector (everything)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label selector {text!r}: {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class NetworkPolicySettings:
    """Who may reach runtime pods besides the pool's own namespace; the operator's environment sets it."""

    enabled: bool = True
    client_namespaces: Mapping[str, str] = field(default_factory=lambda: {"piggyback.dev/llm-clients": "true"})
    router_pods: Mapping[str, str] = field(default_factory=lambda: {LABEL_COMPONENT: "router"})
    operator_namespace: str = "piggyback-system"
    operator_pods: Mapping[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "piggyback-operator"})
    prometheus_namespaces: Mapping[str, str] = field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "monitoring"})
    prometheus_pods: Mapping[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "prometheus"})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NetworkPolicySettings:
        env = os.environ if env is None else env
        default = cls()

        def selector(name: str, fallback: Mapping[str, str]) -> Mapping[str, str]:
            return parse_selector(env[name]) if name in env else fallback

        return cls(
            enabled=env.get("PIGGYBACK_NETWORK_POLICY", "true").lower() not in ("false", "0", "no", "off"),
            client_namespaces=selector("PIGGYBACK_CLIENT_NAMESPACE_SELECTOR", default.client_namespaces),
            router_pods=selector("PIGGYBACK_ROUTER_POD_SELECTOR", default.router_pods),
            operator_namespace=env.get("PIGGYBACK_OPERATOR_NAMESPACE") or default.operator_namespace,
            operator_pods=selector("PIGGYBACK_OPERATOR_POD_SELECTOR", default.operator_pods),
            prometheus_namespaces=selector("PIGGYBACK_PROMETHEUS_NAMESPACE_SELECTOR", default.prometheus_namespaces),
            prometheus_pods=selector("PIGGYBACK_PROMETHEUS_POD_SELECTOR", default.prometheus_pods),
        )  # fmt: skip


def render_network_policy(
    pool: str, namespace: str, members: Sequence[Member], settings: NetworkPolicySettings
) -> dict[str, Any]:
    """Ingress to the pool's pods on the runtime port from clients, the router, the operator and Prometheus only.

    Rendered per pool (not shipped in manifests/) because runtime pods live in the LLMServices' namespaces,
    which the install does not know; owned like the pool's other children, it goes when the pool goes.
    """
    def peer(namespaces: Mapping[str, str] | None, pods: Mapping[str, str] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if namespaces is not None:
            out["namespaceSelector"] = {"matchLabels": dict(namespaces)}
        if pods is not None:
            out["podSelector"] = {"matchLabels": dict(pods)}
        return out

    # kubernetes.io/metadata.name is set by the API server on every namespace: it names one namespace.
    operator_namespace = {"kubernetes.io/metadata.name": settings.operator_namespace}
    peers = [
        peer({"kubernetes.io/metadata.name": namespace}, None),  # the LLMServices' own namespace (and its router)
        peer(settings.client_namespaces, None) if settings.client_namespaces else None,  # {} would mean all
        peer(operator_namespace, settings.router_pods),  # a router installed next to the operator
        peer(operator_namespace, settings.operator_pods),  # the operator scrapes /metrics for admission and status
        peer(settings.prometheus_namespaces, settings.prometheus_pods),
    ]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {
            "name": pool, "namespace": namespace, "labels": labels(pool),
            "ownerReferences": [owner_reference(m, controller=False) for m in ordered(members)],
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_POOL: pool}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [p for p in peers if p is not None],
                "ports": [{"protocol": "TCP", "port": RUNTIME_PORT}],
            }],
        },
    }  # fmt: skip


def render_service(member: Member, routed: bool = False) -> dict[str, Any]:
    """The Service of one LLMService: the pool's pods (or, `routed`, the pool's router), owned by that
    LLMService alone."""
    selector = {LABEL_ROUTER_FOR: member.pool} if routed else {LABEL_POOL: member.pool}
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": member.name, "namespace": member.namespace,
            "labels": {**BASE_LABELS, LABEL_COMPONENT: "endpoint", LABEL_SERVICE: member.name, LABEL_POOL: member.pool},
            "ownerReferences": [owner_reference(member, controller=True)],
        },
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": RUNTIME_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }  # fmt: skip


# --- the pool router (runtime/piggyback_runtime/router/app.py), deployed when the pool has several replicas ---
LABEL_ROUTER_FOR = "piggyback.dev/router-for"  # router pods: not LABEL_POOL, so pool selectors never match them
LABEL_EPP_FOR = "piggyback.dev/epp-for"  # the endpoint picker of a gateway-routed pool (gateway.py)
# lengthAware pools: on each runtime pod, the length range (tokens) of the stage its router puts it in, so a
# gateway's endpoint picker (or a person) can see and honour the stages. Max absent: the last stage.
LABEL_LENGTH_MIN = "piggyback.dev/length-min-tokens"
LABEL_LENGTH_MAX = "piggyback.dev/length-max-tokens"


def stage_labels(stage: tuple[int, int | None] | None) -> dict[str, str | None]:
    """The pod labels naming a stage's range; None values remove a label (a merge patch)."""
    if stage is None:
        return {LABEL_LENGTH_MIN: None, LABEL_LENGTH_MAX: None}
    lower, upper = stage
    return {LABEL_LENGTH_MIN: str(lower), LABEL_LENGTH_MAX: None if upper is None else str(upper)}
ROUTER_REPLICAS = 2  # two, so that a router restart (rollout, node loss) never leaves the pool unreachable
# lengthAware stage bounds (tokens) before any length distribution is known: exponential, as L4's buckets.
LENGTH_AWARE_STAGE_BOUNDARIES = (4096, 16384, 65536)


def router_name(pool: str) -> str:
    return f"{pool}-router"


def replicas_service_name(pool: str) -> str:
    return f"{pool}-replicas"


def pool_routing(members: Sequence[Member]) -> str:
    """The pool's routing policy: its first member's (by name), as for every other pool-wide choice."""
    return ordered(members)[0].spec.placement.routing


def uses_router(members: Sequence[Member], replicas: int) -> bool:
    """Clients go through the pool's router: several replicas, and routing is not left to a Gateway."""
    return replicas > 1 and pool_routing(members) != "gateway"


def render_router(pool: str, namespace: str, members: Sequence[Member], replicas: int) -> list[dict[str, Any]]:
    """Headless Service of the pool's runtime pods (the router resolves it to find the replicas), the router's
    ServiceAccount and its RoleBinding to the piggyback-router ClusterRole (the Lease its replicas elect a
    leader with), and the router Deployment (0 replicas while the pool has one runtime replica: clients then
    reach the runtime directly). Owned by every member, hardened like the runtime pods."""
    members = ordered(members)
    owners = [owner_reference(m, controller=False) for m in members]
    name = router_name(pool)
    router_labels = {**BASE_LABELS, LABEL_COMPONENT: "router", LABEL_ROUTER_FOR: pool}
    routing = pool_routing(members)
    if routing == "gateway":  # a pool that moved to gateway routing: its router stays, scaled to 0
        replicas = 1
    args = ["router", "--pool-dns", f"{replicas_service_name(pool)}.{namespace}.svc:{RUNTIME_PORT}",
            "--policy", routing, "--host", "0.0.0.0", "--port", str(RUNTIME_PORT)]  # fmt: skip
    if routing == "lengthAware" and replicas > 1:
        boundaries = LENGTH_AWARE_STAGE_BOUNDARIES[: replicas - 1]
        args += ["--stage-boundaries", ",".join(str(b) for b in boundaries)]
    headless = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": replicas_service_name(pool), "namespace": namespace, "labels": labels(pool),
                     "ownerReferences": owners},
        "spec": {"clusterIP": "None", "selector": {LABEL_POOL: pool},
                 "ports": [{"name": "http", "port": RUNTIME_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }  # fmt: skip
    container = {
        "name": "router", "image": router_image(), "command": ["piggyback"], "args": args,
        "env": [internal_token_env(pool)],
        "ports": [{"name": "http", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        "securityContext": container_security_context(),
    }  # fmt: skip
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": router_labels, "ownerReferences": owners},
        "spec": {
            "replicas": ROUTER_REPLICAS if replicas > 1 else 0,
            "selector": {"matchLabels": {LABEL_ROUTER_FOR: pool}},
            "template": {
                "metadata": {"labels": router_labels},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # The token is for the leader election's Lease, all the router may touch (router-rbac.yaml).
                    "serviceAccountName": name,
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "containers": [container],
                },
            },
        },
    }  # fmt: skip
    account = {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "labels": router_labels, "ownerReferences": owners},
        "automountServiceAccountToken": False,  # mounted only where a pod asks: the router's pods
    }  # fmt: skip
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace, "labels": router_labels, "ownerReferences": owners},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ROUTER_CLUSTER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }  # fmt: skip
    return [headless, account, binding, deployment]


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
