"""The LLMService API (`piggyback.dev/v1alpha1`): pydantic models, and the CRD generated from them.

One source of truth: the models below define the schema, defaults, bounds and CEL rules; `crd_manifest()`
turns them into the CustomResourceDefinition committed under crds/ (`piggyback-operator crd` writes it, a
test fails when the committed file differs). The operator parses every spec with the same models, so a
spec the API server accepted but the operator cannot use fails with the same message a person saw.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from piggyback_runtime.model.arch import SYNTHETIC_PRESETS as RUNTIME_SYNTHETIC_PRESETS

GROUP = "piggyback.dev"
VERSION = "v1alpha1"
KIND = "LLMService"
PLURAL = "llmservices"
SINGULAR = "llmservice"
SHORT_NAMES = ["llms"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

ServiceClass = Literal["LS", "BE"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

# Messages shared by the CEL rules (what `kubectl apply` prints) and the pydantic validators (what the
# operator reports if a spec slips past an API server without CEL, e.g. one older than 1.25).
MSG_LS_NEEDS_SLO = "spec.slo (ttftMs, tpotMs) is required when class is LS"
MSG_CLASS_IMMUTABLE = "class is immutable: delete and re-create the LLMService to change it"
MSG_URI_IMMUTABLE = "model.uri is immutable: create a new LLMService for another model"
MSG_MIN_LE_MAX = "scaling.minReplicas must be less than or equal to scaling.maxReplicas"
MSG_REPLICAS_IN_RANGE = "replicas must lie within scaling.minReplicas..scaling.maxReplicas"
MSG_DEFAULT_LE_MAX_TOKENS = "limits.defaultMaxTokens must be less than or equal to limits.maxTokens"
MSG_NAME_DNS_LABEL = (
    "metadata.name must be a DNS-1123 label of at most 63 characters (it is the model name clients send)"
)

MSG_FILE_URI_ABSOLUTE = "model.uri: file:// needs an absolute path, e.g. file:///models/llama (three slashes)"
MSG_PVC_URI = "model.uri: pvc:// needs a claim and a path inside it, e.g. pvc://weights/llama-3-8b"
MSG_ENV_RESERVED = "pod.env: names starting PIGGYBACK_ and HOME, XDG_CACHE_HOME are set by the operator"
MSG_VOLUME_RESERVED = "pod.volumes: config, tmp, cache, dshm and model are the runtime's own volume names"
MSG_MOUNT_PATH_RESERVED = (
    "pod.volumeMounts: /etc/piggyback, /tmp, /var/cache/piggyback, /dev/shm and /models are the runtime's mounts"
)
MSG_MOUNT_NEEDS_VOLUME = "pod.volumeMounts: every mount must name a volume listed in pod.volumes"
MSG_LABEL_RESERVED = "pod.labels: piggyback.dev/* and app.kubernetes.io/* keys are set by the operator"
MSG_ANNOTATION_RESERVED = "pod.annotations: piggyback.dev/* keys are set by the operator"
MSG_GPU_OVERRIDE = "pod.resources may not set nvidia.com/gpu: use spec.resources.gpus"
MSG_NODE_SELECTOR_CONFLICT = "pod.nodeSelector and placement.nodeSelector set one key to different values"
MSG_BATCH_BE_ONLY = "batch: the Batch API runs lines as best-effort work; only a BE LLMService may enable it"
MSG_BATCH_ONE_STORAGE = "batch.storage: set exactly one of pvc (SQLite on a volume) and postgresSecretRef"
MSG_KEDA_NEEDS_RANGE = "scaling.autoscaler keda needs scaling.maxReplicas above scaling.minReplicas"

_DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
_URI_RE = r"^(file|pvc|synthetic)://.+$"

# What the operator itself sets on runtime pods; spec.pod may not set these (CEL and the models refuse them).
RESERVED_ENV_PREFIX = "PIGGYBACK_"
RESERVED_ENV_NAMES = ("HOME", "XDG_CACHE_HOME")
RESERVED_VOLUME_NAMES = ("config", "tmp", "cache", "dshm", "model")
RESERVED_MOUNT_PATHS = ("/etc/piggyback", "/tmp", "/var/cache/piggyback", "/dev/shm", "/models")
RESERVED_LABEL_PREFIXES = ("piggyback.dev/", "app.kubernetes.io/")
RESERVED_ANNOTATION_PREFIXES = ("piggyback.dev/",)
GPU_RESOURCE_NAME = "nvidia.com/gpu"


# The runtime's one list of presets (model/arch.py imports only the standard library, the model package nothing).
SYNTHETIC_PRESETS = tuple(sorted(RUNTIME_SYNTHETIC_PRESETS))
MSG_SYNTHETIC_PRESET = (
    f"model.uri: synthetic://PRESET must name one of the runtime's presets: {', '.join(SYNTHETIC_PRESETS)}"
)
_CEL_SYNTHETIC_URIS = "[" + ", ".join(f"'synthetic://{p}'" for p in SYNTHETIC_PRESETS) + "]"


def _cel_str_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _cel_has_prefix(var: str, prefixes: tuple[str, ...]) -> str:
    return " || ".join(f"{var}.startsWith('{p}')" for p in prefixes)
_DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_SECRET_KEY_RE = r"^[-._a-zA-Z0-9]+$"


# A label value (at most 63 characters). Bounded, too, so that CEL rules comparing values stay within the API
# server's estimated-cost limit (an unbounded string is costed at the request size).
_LabelValue = Annotated[str, Field(max_length=63)]


def _cel(rule: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"rule": rule, "message": message, **extra}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, use_attribute_docstrings=True
    )


class ModelSpec(_Model):
    """The weights a service runs. Services with the same model (and pool) share runtime pods."""

    uri: Annotated[
        str,
        Field(
            max_length=2048,
            pattern=_URI_RE,
            json_schema_extra={"x-kubernetes-validations": [
                _cel("self == oldSelf", MSG_URI_IMMUTABLE),
                _cel("!self.startsWith('file://') || self.startsWith('file:///')", MSG_FILE_URI_ABSOLUTE),
                _cel("!self.startsWith('pvc://') || self.matches('^pvc://[^/]+/.+$')", MSG_PVC_URI),
                _cel(f"!self.startsWith('synthetic://') || self in {_CEL_SYNTHETIC_URIS}", MSG_SYNTHETIC_PRESET),
            ]},
        ),
    ]
    """Where the weights are: file:///path, pvc://claim/path, or synthetic://<architecture> (random weights)."""
    served_name: Annotated[str, Field(max_length=253)] | None = None
    """Name of the model reported by the runtime (defaults to the runtime's own choice)."""
    dtype: DType = "auto"
    """Weight and activation dtype."""
    max_context_length: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    """Longest prompt + output in tokens (defaults to the model's own maximum)."""

    @model_validator(mode="after")
    def _uri_rules(self) -> ModelSpec:
        uri = self.uri
        if uri.startswith("file://") and not uri.startswith("file:///"):
            raise ValueError(MSG_FILE_URI_ABSOLUTE)
        if uri.startswith("pvc://") and not re.match(r"^pvc://[^/]+/.+$", uri):
            raise ValueError(MSG_PVC_URI)
        if uri.startswith("synthetic://") and uri.removeprefix("synthetic://") not in SYNTHETIC_PRESETS:
            raise ValueError(MSG_SYNTHETIC_PRESET)
        return self


class SLOSpec(_Model):
    """Latency SLO of an LS service (DESIGN.md: TTFT and TPOT per request)."""

    ttft_ms: Annotated[float, Field(gt=0, le=3_600_000)]
    """Time to first token, milliseconds."""
    tpot_ms: Annotated[float, Field(gt=0, le=600_000)]
    """Time per output token after the first, milliseconds."""
    attainment_target: Annotated[float, Field(gt=0, le=1)] = 0.99
    """Share of requests that must meet both TTFT and TPOT."""


class ExpectedLoad(_Model):
    """What the service is expected to bring; admission checks it against the pool's predicted headroom."""

    requests_per_second: Annotated[float, Field(ge=0, le=1_000_000)] = 0
    """LS: expected request rate."""
    concurrency: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """BE: expected number of requests in flight."""


class Scaling(_Model):
    """Bounds within which the operator may scale the service's pool to make room for admissions."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.minReplicas <= self.maxReplicas", MSG_MIN_LE_MAX),
                _cel("self.autoscaler != 'keda' || self.minReplicas < self.maxReplicas", MSG_KEDA_NEEDS_RANGE),
            ]
        }
    )
    min_replicas: Annotated[int, Field(ge=1, le=64)] = 1
    """Fewest runtime replicas (the autoscaler's floor)."""
    max_replicas: Annotated[int, Field(ge=1, le=64)] = 1
    """Most runtime replicas (admission scale-ups and the autoscaler stop here)."""
    autoscaler: Literal["none", "keda"] = "none"
    """none: replicas change through spec.replicas (or the /scale subresource) and admission scale-ups.
    keda: the operator renders a KEDA ScaledObject that scales this LLMService through /scale on the queue
    and the predicted SLO headroom the runtimes export (Prometheus)."""
    scale_down_stabilization_seconds: Annotated[int, Field(ge=0, le=3600)] = 300
    """keda: a scale-down happens only if every recommendation over this window allows it."""
    target_waiting_requests_per_replica: Annotated[float, Field(gt=0, le=100_000)] = 4
    """keda: queued requests (vllm:num_requests_waiting) of this service per replica to aim for; BE services
    scale on this backlog alone."""
    target_capacity_utilization: Annotated[float, Field(gt=0, le=1)] = 0.8
    """keda, LS: share of the pool's predicted SLO capacity (request rate over rate plus headroom) to aim for."""
    polling_interval_seconds: Annotated[int, Field(ge=5, le=600)] = 15
    """keda: how often the triggers are evaluated."""

    @model_validator(mode="after")
    def _min_le_max(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(MSG_MIN_LE_MAX)
        if self.autoscaler == "keda" and self.min_replicas == self.max_replicas:
            raise ValueError(MSG_KEDA_NEEDS_RANGE)
        return self


class Resources(_Model):
    """Per runtime replica. GPUs run the model; host CPU cores and memory hold and compute BE attention."""

    gpus: Annotated[int, Field(ge=1, le=16)] = 1
    """nvidia.com/gpu per replica."""
    cpu_cores: Annotated[int, Field(ge=0, le=1024)] = 0
    """Host CPU cores this service adds to each replica (BE attention runs on them)."""
    host_memory: Annotated[str, Field(pattern=_QUANTITY_RE, max_length=32)] = "0"
    """Host memory this service adds to each replica (BE KV cache lives there), e.g. 64Gi."""


class Limits(_Model):
    """Output length per request: what a request that sends no `max_tokens` gets, and the most it may ask for."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.defaultMaxTokens) || !has(self.maxTokens) || self.defaultMaxTokens <= self.maxTokens",
                    MSG_DEFAULT_LE_MAX_TOKENS,
                )
            ]
        }
    )
    default_max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    """max_tokens of a request that sends none (default: what the context leaves, capped at maxTokens). A BE
    request reserves host KV for prompt + max_tokens, so a modest default keeps BE requests from reserving the
    whole context."""
    max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    """The most max_tokens a request may ask for; above it the runtime answers 400 naming max_tokens."""

    @model_validator(mode="after")
    def _default_le_max(self) -> Limits:
        if self.default_max_tokens and self.max_tokens and self.default_max_tokens > self.max_tokens:
            raise ValueError(MSG_DEFAULT_LE_MAX_TOKENS)
        return self


class SecretKeyRef(_Model):
    """A key of a Secret in the LLMService's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN_RE)]
    """Secret name."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=_SECRET_KEY_RE)] = "api-key"
    """Key within the Secret whose value is the API key."""


class Toleration(_Model):
    """A Kubernetes toleration (core/v1 Toleration) for the runtime pods."""

    key: Annotated[str, Field(max_length=253)] | None = None
    """Taint key the toleration matches; empty with operator Exists matches every taint."""
    operator: Literal["Equal", "Exists"] = "Equal"
    """Equal: the taint's value must equal `value`; Exists: any value."""
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value to match (operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches every effect."""
    toleration_seconds: int | None = None
    """NoExecute only: how long the pod stays bound after the taint appears (default: forever)."""


class Placement(_Model):
    """Which GPU nodes may serve the service, and which pool (group of shared runtime pods) it joins."""

    pool: Annotated[str, Field(max_length=40, pattern=_DNS_LABEL_RE)] = "default"
    """Pool name. LS and BE services of one model in one pool share runtime pods (and so the weights)."""
    node_selector: dict[str, _LabelValue] = Field(default_factory=dict, max_length=32)
    """Node labels a GPU node must carry to serve the service (merged over the pool's members)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints of GPU nodes the runtime pods tolerate (merged over the pool's members)."""
    routing: Literal["roundRobin", "leastLoaded", "lengthAware", "gateway"] = "roundRobin"
    """How requests are spread over the pool's replicas. roundRobin, leastLoaded (shortest queue, Llumnix-style
    rebalancing), lengthAware (L4: length-specialised stages, requests live-migrated with their KV as they
    grow): Piggyback's router, deployed when the pool has more than one replica. gateway: no Piggyback router;
    an InferencePool (Gateway API Inference Extension) and its endpoint picker, for a Gateway to route to.
    A pool follows its first member (by name)."""


class CPUAttentionResources(_Model):
    """What each CPU-only node's Ray worker pod requests (and is limited to)."""

    cpu: Annotated[str, Field(pattern=_QUANTITY_RE, max_length=32)] = "16"
    """CPU cores of the worker pod: BE decode attention runs on them."""
    memory: Annotated[str, Field(pattern=_QUANTITY_RE, max_length=32)] = "64Gi"
    """Memory of the worker pod: BE KV of the requests it serves lives in it."""


class CPUAttentionNodes(_Model):
    """CPU-only machines that hold BE KV in their DRAM and compute its attention (remote CPU attention nodes):
    a KubeRay RayCluster whose workers the runtime pods drive. Needs the KubeRay operator in the cluster."""

    replicas: Annotated[int, Field(ge=0, le=256)] = 1
    """CPU-only worker pods (one attention worker each)."""
    resources: CPUAttentionResources = CPUAttentionResources()
    """Per worker pod."""
    node_selector: dict[str, _LabelValue] = Field(default_factory=dict, max_length=32)
    """Node labels of the CPU-only nodes the workers may run on."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints of those nodes the workers tolerate."""


class EnvVar(_Model):
    """An extra environment variable of the runtime container (core/v1 EnvVar)."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")]
    """Variable name; PIGGYBACK_*, HOME and XDG_CACHE_HOME are the operator's."""
    value: Annotated[str, Field(max_length=32768)] | None = None
    """Literal value."""
    value_from: dict[str, Any] | None = None
    """A core/v1 EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef), passed through."""


class Volume(_Model):
    """An extra volume of the runtime pods (core/v1 Volume: `name` plus one volume source, passed through)."""

    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=_DNS_LABEL_RE)]
    """Volume name, referenced by pod.volumeMounts; config, tmp, cache, dshm and model are the runtime's."""


class VolumeMount(_Model):
    """Where an extra volume appears in the runtime container (core/v1 VolumeMount)."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=_DNS_LABEL_RE)]
    """Name of a volume in pod.volumes."""
    mount_path: Annotated[str, Field(min_length=2, max_length=4096, pattern=r"^/.+")]
    """Absolute path in the container; the runtime's own mount paths are refused."""
    read_only: bool = False
    """Mount read-only."""
    sub_path: Annotated[str, Field(max_length=4096)] | None = None
    """A path inside the volume to mount instead of its root."""


class LocalObjectReference(_Model):
    """A reference to an object in the LLMService's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN_RE)]
    """The object's name."""


_QuantityMap = dict[str, Annotated[str, Field(pattern=_QUANTITY_RE, max_length=32)]]


class ResourceOverrides(_Model):
    """Requests and limits that replace what the operator derives for the runtime container (per resource name)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(f"!has(self.requests) || !('{GPU_RESOURCE_NAME}' in self.requests)", MSG_GPU_OVERRIDE),
                _cel(f"!has(self.limits) || !('{GPU_RESOURCE_NAME}' in self.limits)", MSG_GPU_OVERRIDE),
            ]
        }
    )
    requests: _QuantityMap = Field(default_factory=dict, max_length=16)
    """Requests by resource name, e.g. cpu: "4", memory: 96Gi (nvidia.com/gpu comes from spec.resources.gpus)."""
    limits: _QuantityMap = Field(default_factory=dict, max_length=16)
    """Limits by resource name, e.g. memory: 128Gi."""

    @model_validator(mode="after")
    def _no_gpu(self) -> ResourceOverrides:
        if GPU_RESOURCE_NAME in self.requests or GPU_RESOURCE_NAME in self.limits:
            raise ValueError(MSG_GPU_OVERRIDE)
        return self


class PodSettings(_Model):
    """Settings of the runtime pods a cluster's conventions require. The pod is shared by the pool's members:
    lists (env, volumes, tolerations, pull secrets) and maps (labels, annotations, nodeSelector) are merged,
    the first member (by creation) winning a name both set; single values (image, priorityClassName,
    affinity) come from the first member that sets them."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes)"
                     " && self.volumes.exists(v, v.name == m.name))", MSG_MOUNT_NEEDS_VOLUME),
            ]
        }
    )
    image: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """Runtime image (default: the operator's PIGGYBACK_RUNTIME_IMAGE)."""
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, json_schema_extra={"x-kubernetes-list-type": "atomic"}
    )
    """Secrets holding registry credentials for the image."""
    priority_class_name: Annotated[str, Field(max_length=253, pattern=_DNS_SUBDOMAIN_RE)] | None = None
    """PriorityClass of the runtime pods."""
    affinity: dict[str, Any] | None = None
    """A core/v1 Affinity (nodeAffinity, podAffinity, podAntiAffinity), passed through."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Added to placement.tolerations."""
    node_selector: dict[str, _LabelValue] = Field(default_factory=dict, max_length=32)
    """Added to placement.nodeSelector (and used like it for GPU node matching)."""
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64,
        json_schema_extra={
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
            "x-kubernetes-validations": [_cel(
                f"self.all(e, !e.name.startsWith('{RESERVED_ENV_PREFIX}')"
                f" && !(e.name in {_cel_str_list(RESERVED_ENV_NAMES)}))", MSG_ENV_RESERVED)],
        },
    )  # fmt: skip
    """Extra environment variables of the runtime container."""
    volumes: list[Volume] = Field(
        default_factory=list, max_length=32,
        json_schema_extra={
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
            "x-kubernetes-validations": [_cel(
                f"self.all(v, !(v.name in {_cel_str_list(RESERVED_VOLUME_NAMES)}))", MSG_VOLUME_RESERVED)],
        },
    )  # fmt: skip
    """Extra volumes of the runtime pods."""
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=32,
        json_schema_extra={
            "x-kubernetes-list-type": "atomic",
            "x-kubernetes-validations": [_cel(
                f"self.all(m, !(m.mountPath in {_cel_str_list(RESERVED_MOUNT_PATHS)}))", MSG_MOUNT_PATH_RESERVED)],
        },
    )  # fmt: skip
    """Where the extra volumes appear in the runtime container."""
    annotations: dict[str, Annotated[str, Field(max_length=65536)]] = Field(
        default_factory=dict, max_length=64,
        json_schema_extra={"x-kubernetes-validations": [
            _cel(f"self.all(k, !({_cel_has_prefix('k', RESERVED_ANNOTATION_PREFIXES)}))", MSG_ANNOTATION_RESERVED)]},
    )  # fmt: skip
    """Extra annotations of the runtime pods."""
    labels: dict[str, _LabelValue] = Field(
        default_factory=dict, max_length=64,
        json_schema_extra={"x-kubernetes-validations": [
            _cel(f"self.all(k, !({_cel_has_prefix('k', RESERVED_LABEL_PREFIXES)}))", MSG_LABEL_RESERVED)]},
    )  # fmt: skip
    """Extra labels of the runtime pods."""
    resources: ResourceOverrides | None = None
    """Requests and limits replacing the derived ones (per resource name)."""

    @model_validator(mode="after")
    def _rules(self) -> PodSettings:
        for e in self.env:
            if e.name.startswith(RESERVED_ENV_PREFIX) or e.name in RESERVED_ENV_NAMES:
                raise ValueError(f"{MSG_ENV_RESERVED} (got {e.name})")
        names = [v.name for v in self.volumes]
        if any(n in RESERVED_VOLUME_NAMES for n in names):
            raise ValueError(MSG_VOLUME_RESERVED)
        if len(set(names)) != len(names) or len({e.name for e in self.env}) != len(self.env):
            raise ValueError("pod.env and pod.volumes: each name may appear once")
        for m in self.volume_mounts:
            if m.mount_path in RESERVED_MOUNT_PATHS:
                raise ValueError(MSG_MOUNT_PATH_RESERVED)
            if m.name not in names:
                raise ValueError(f"{MSG_MOUNT_NEEDS_VOLUME} (got {m.name})")
        if any(k.startswith(RESERVED_LABEL_PREFIXES) for k in self.labels):
            raise ValueError(MSG_LABEL_RESERVED)
        if any(k.startswith(RESERVED_ANNOTATION_PREFIXES) for k in self.annotations):
            raise ValueError(MSG_ANNOTATION_RESERVED)
        return self


class BatchPVC(_Model):
    """A PersistentVolumeClaim the operator creates for the pool (`<pool>-batch`); it holds the batch database
    (SQLite) and files. One replica: a pool with several replicas shares a Postgres instead. The claim outlives
    the pool (batches survive it being re-created); delete it by hand when the data is no longer wanted."""

    size: Annotated[str, Field(pattern=_QUANTITY_RE, max_length=32)] = "10Gi"
    """Requested storage, e.g. 10Gi."""
    storage_class_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """StorageClass of the claim; unset: the cluster's default."""


class PostgresSecretRef(_Model):
    """A key of a Secret whose value is the shared database's URL (postgresql+asyncpg://user:pass@host/db)."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN_RE)]
    """Secret name."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=_SECRET_KEY_RE)] = "database-url"
    """Key within the Secret."""


class BatchStorage(_Model):
    """Where batch state lives: exactly one of the two."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("has(self.pvc) != has(self.postgresSecretRef)", MSG_BATCH_ONE_STORAGE)]})  # fmt: skip
    pvc: BatchPVC | None = None
    """SQLite and files on a claim the operator creates (one replica)."""
    postgres_secret_ref: PostgresSecretRef | None = None
    """A shared Postgres: replicas lease lines from one queue (several replicas)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> BatchStorage:
        if (self.pvc is None) == (self.postgres_secret_ref is None):
            raise ValueError(MSG_BATCH_ONE_STORAGE)
        return self


class BatchSpec(_Model):
    """The OpenAI Batch API (/v1/files, /v1/batches) on this BE service's runtime pods."""

    enabled: bool = True
    """Serve the Batch API."""
    storage: BatchStorage = BatchStorage(pvc=BatchPVC())
    """Where batches are kept (default: a 10Gi claim)."""


class LLMServiceSpec(_Model):
    """Desired state of an LLMService."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self.class != 'LS' || has(self.slo)", MSG_LS_NEEDS_SLO),
                _cel(
                    # Checked only for consistent bounds, so that min > max reports one problem, not two.
                    "!has(self.scaling) || self.scaling.minReplicas > self.scaling.maxReplicas"
                    " || (self.replicas >= self.scaling.minReplicas && self.replicas <= self.scaling.maxReplicas)",
                    MSG_REPLICAS_IN_RANGE,
                ),
                _cel(
                    "!has(self.pod) || !has(self.pod.nodeSelector) || !has(self.placement)"
                    " || !has(self.placement.nodeSelector) || self.pod.nodeSelector.all(k,"
                    " !(k in self.placement.nodeSelector)"
                    " || self.placement.nodeSelector[k] == self.pod.nodeSelector[k])",
                    MSG_NODE_SELECTOR_CONFLICT,
                ),
                _cel("self.class == 'BE' || !has(self.batch) || !self.batch.enabled", MSG_BATCH_BE_ONLY),
            ]
        }
    )
    model: ModelSpec
    """The model the service runs."""
    service_class: ServiceClass = Field(
        alias="class",
        json_schema_extra={"x-kubernetes-validations": [_cel("self == oldSelf", MSG_CLASS_IMMUTABLE)]},
    )
    """LS: latency-sensitive, with an SLO. BE: best-effort throughput, attention on host CPUs."""
    slo: SLOSpec | None = None
    """LS: the latency SLO (required); BE: ignored."""
    expected_load: ExpectedLoad = ExpectedLoad()
    """The load admission checks against the pool's predicted headroom."""
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    """Runtime replicas the pool keeps at least while this service is in it (the /scale subresource's
    spec.replicas: kubectl scale, HPA and KEDA write it)."""
    scaling: Scaling | None = None
    """Bounds for admission scale-ups and autoscaling."""
    resources: Resources = Resources()
    """What each runtime replica needs for this service."""
    placement: Placement = Placement()
    """Nodes, pool and routing."""
    limits: Limits | None = None
    """Per-request output length defaults and limits."""
    pod: PodSettings = PodSettings()
    """Runtime pod settings: image, pull secrets, priority, affinity, env, volumes, labels, resources."""
    api_key_secret_ref: SecretKeyRef | None = None
    """When set, requests for this service need `Authorization: Bearer <the Secret's key>` (OpenAI clients send
    their api_key so). The operator never reads the Secret: the runtime pod gets it as an environment variable."""
    cpu_attention_nodes: CPUAttentionNodes | None = None
    """BE: remote CPU attention nodes for the pool (a RayCluster of CPU-only workers; the pool follows its first
    member that asks for them)."""
    drain_timeout_seconds: Annotated[int, Field(ge=0, le=3600)] | None = None
    """On shutdown, how long in-flight requests get to finish (default 20). The pool drains for the longest of
    its members' values; the pod's terminationGracePeriodSeconds is set above it."""
    batch: BatchSpec | None = None
    """BE only: serve the OpenAI Batch API, with durable storage (a PVC, or a shared Postgres)."""
    tensor_parallel_size: Annotated[int, Field(ge=1, le=16)] = 1
    """GPUs one replica splits the model over (tensor parallelism, the runtime's engine.tensor_parallel_size):
    each pod requests at least this many nvidia.com/gpu. The model's attention heads, KV heads and MLP width
    must be multiples of it: the operator checks that for synthetic:// presets (it knows their shapes); for a
    file:// or pvc:// model it cannot read config.json, and the runtime refuses a bad value when it loads (the
    pod then reports not ready with the reason)."""

    @model_validator(mode="after")
    def _rules(self) -> LLMServiceSpec:
        if self.service_class == "LS" and self.slo is None:
            raise ValueError(MSG_LS_NEEDS_SLO)
        if self.service_class != "BE" and self.batch is not None and self.batch.enabled:
            raise ValueError(MSG_BATCH_BE_ONLY)
        if self.tensor_parallel_size > 1 and self.model.uri.startswith("synthetic://"):
            preset = RUNTIME_SYNTHETIC_PRESETS.get(self.model.uri.removeprefix("synthetic://"))
            if preset is not None:
                preset.check_tensor_parallel(self.tensor_parallel_size, "spec.tensorParallelSize")
        if self.scaling and not self.scaling.min_replicas <= self.replicas <= self.scaling.max_replicas:
            raise ValueError(MSG_REPLICAS_IN_RANGE)
        placed = self.placement.node_selector
        if any(k in placed and placed[k] != v for k, v in self.pod.node_selector.items()):
            raise ValueError(MSG_NODE_SELECTOR_CONFLICT)
        return self

    @property
    def node_selector(self) -> dict[str, str]:
        """placement.nodeSelector and pod.nodeSelector together (CEL refuses a key they disagree on)."""
        return {**self.pod.node_selector, **self.placement.node_selector}

    @property
    def tolerations(self) -> list[Toleration]:
        return [*self.placement.tolerations, *(t for t in self.pod.tolerations if t not in self.placement.tolerations)]

    @property
    def min_replicas(self) -> int:
        return self.scaling.min_replicas if self.scaling else self.replicas

    @property
    def max_replicas(self) -> int:
        return self.scaling.max_replicas if self.scaling else self.replicas


# --- status ------------------------------------------------------------------------------------------

ConditionType = Literal["Admitted", "Placed", "RuntimeReady", "SLOMet", "Ready", "CPUAttentionNodes"]
CONDITION_TYPES: tuple[ConditionType, ...] = ("Admitted", "Placed", "RuntimeReady", "SLOMet", "Ready")


class Condition(_Model):
    """A Kubernetes API condition (metav1.Condition)."""

    type: Annotated[str, Field(max_length=316)]
    """Admitted, Placed, RuntimeReady, SLOMet or Ready."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")]
    """CamelCase, machine-readable."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """What happened and what a person can do about it."""
    last_transition_time: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    """When the status last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation the condition was computed from."""


class Measured(_Model):
    """Figures scraped from the runtime pods serving this service (aggregated over replicas)."""

    ttft_p99_ms: float | None = None
    """LS: 99th percentile time to first token over the last scrape interval, milliseconds."""
    tpot_p99_ms: float | None = None
    """LS: 99th percentile time per output token over the last scrape interval, milliseconds."""
    attainment: float | None = None
    """LS SLO attainment over the runtime's sliding window (0-1)."""
    window_requests: int | None = None
    """LS requests within the runtime's attainment window."""
    be_tokens_per_second: float | None = None
    """BE output tokens per second between the last two scrapes."""
    pool_headroom_requests_per_second: float | None = None
    """Extra LS request rate the pool's runtimes predict fits under all SLOs; absent when not exported."""
    scraped_at: Annotated[str, Field(json_schema_extra={"format": "date-time"})] | None = None
    """When the runtimes were last scraped."""


class LLMServiceStatus(_Model):
    """Observed state of an LLMService."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation this status describes."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Admitted, Placed, RuntimeReady, SLOMet and Ready."""
    endpoint: str | None = None
    """OpenAI-compatible base URL inside the cluster; send `model: <this LLMService's name>`."""
    pool: str | None = None
    """The runtime Deployment serving this service."""
    nodes: list[str] = Field(default_factory=list)
    """Nodes the pool's replicas run on."""
    runtime_endpoints: list[str] = Field(default_factory=list)
    """host:port of every runtime pod of the pool (each addressable on its own)."""
    replicas: int | None = None
    """Runtime replicas of the pool (the /scale subresource's status.replicas)."""
    ready_replicas: int | None = None
    """Runtime replicas ready."""
    selector: str | None = None
    """Label selector of the pool's runtime pods (the /scale subresource's status.selector, for HPA)."""
    measured: Measured | None = None
    """Figures scraped from the runtimes."""


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Class", "type": "string", "jsonPath": ".spec.class"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
    {"name": "TTFT-p99-ms", "type": "number", "jsonPath": ".status.measured.ttftP99Ms"},
    {"name": "TPOT-p99-ms", "type": "number", "jsonPath": ".status.measured.tpotP99Ms"},
    {"name": "Attainment", "type": "number", "jsonPath": ".status.measured.attainment"},
    {"name": "BE-tok/s", "type": "number", "jsonPath": ".status.measured.beTokensPerSecond"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


# --- CRD generation ----------------------------------------------------------------------------------


def _structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn pydantic's JSON Schema into a Kubernetes structural OpenAPI v3 schema (no refs, no anyOf)."""
    schema = copy.deepcopy(schema)
    if "$ref" in schema:
        ref = defs[schema.pop("$ref").split("/")[-1]]
        merged = {**copy.deepcopy(ref), **schema}  # keep field-level description/default/extensions
        return _structural(merged, defs)
    if "anyOf" in schema:  # Optional[X]: absent means null in Kubernetes
        options = [s for s in schema.pop("anyOf") if s.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express union {options} in a structural schema")
        inner = _structural(options[0], defs)
        extensions = inner.pop("x-kubernetes-validations", []) + schema.pop("x-kubernetes-validations", [])
        schema = {**inner, **schema}
        if extensions:
            schema["x-kubernetes-validations"] = extensions
    schema.pop("title", None)
    if schema.get("default", "") is None:
        del schema["default"]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(schema.get(bound), int | float) and not isinstance(schema.get(bound), bool):
            schema[plain] = schema[bound]
            schema[bound] = True
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    if schema.get("type") == "object":
        if schema.get("additionalProperties") is False:
            del schema["additionalProperties"]  # structural schemas prune unknown fields instead
        elif schema.get("additionalProperties") is True or (
            "additionalProperties" not in schema and "properties" not in schema
        ):  # a pass-through core/v1 object (affinity, a volume source): kept as written
            schema.pop("additionalProperties", None)
            schema["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(schema.get("additionalProperties"), dict):
            schema["additionalProperties"] = _structural(schema["additionalProperties"], defs)
        if "properties" in schema:
            schema["properties"] = {k: _structural(v, defs) for k, v in schema["properties"].items()}
        if isinstance(schema.get("default"), dict) and "properties" in schema:
            schema["default"] = {}  # let the API server fill nested defaults itself
    if schema.get("type") == "array" and "items" in schema:
        schema["items"] = _structural(schema["items"], defs)
    if "description" in schema:
        schema["description"] = re.sub(r"\s+", " ", schema["description"]).strip()
    return schema


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def crd_manifest() -> dict[str, Any]:
    spec_schema = openapi_schema(LLMServiceSpec)
    status_schema = openapi_schema(LLMServiceStatus)
    root: dict[str, Any] = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            _cel(
                f"self.metadata.name.matches('{_DNS_LABEL_RE}') && size(self.metadata.name) <= 63",
                MSG_NAME_DNS_LABEL,
            )
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["piggyback"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        # kubectl scale, HPA and KEDA: spec.replicas; the pool's replicas and pods' selector.
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


CRD_HEADER = "# Generated by `piggyback-operator crd` from operator/piggyback_operator/api.py. Do not edit.\n"


def crd_yaml() -> str:
    return CRD_HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)


# --- unknown fields ----------------------------------------------------------------------------------------

LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


@functools.cache
def _spec_schema() -> dict[str, Any]:
    return openapi_schema(LLMServiceSpec)


def unknown_fields(value: Any, schema: Mapping[str, Any] | None = None, path: str = "spec") -> list[str]:
    """Paths in `value` (a spec) that the CRD's schema does not know: what a structural schema prunes.

    Pass-through objects (x-kubernetes-preserve-unknown-fields: affinity, volume sources) keep whatever they get.
    """
    if schema is None:
        schema = _spec_schema()
    found: list[str] = []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return found
    if isinstance(value, Mapping) and schema.get("type") == "object":
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if properties is not None and key in properties:
                found += unknown_fields(sub, properties[key], f"{path}.{key}")
            elif isinstance(extra, Mapping):
                found += unknown_fields(sub, extra, f"{path}.{key}")
            elif properties is not None:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def unknown_spec_fields(body: Mapping[str, Any]) -> list[str]:
    """Unknown fields of an LLMService as written: in its spec (an API server that does not prune, or the
    emulated one) and in kubectl's last-applied-configuration annotation, which keeps the manifest as the
    person wrote it after the API server pruned the typo from the object itself."""
    found = unknown_fields(body.get("spec") or {})
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    try:
        applied = json.loads(annotations.get(LAST_APPLIED_ANNOTATION) or "null")
    except ValueError:
        applied = None
    if isinstance(applied, Mapping) and isinstance(applied.get("spec"), Mapping):
        found += [f for f in unknown_fields(applied["spec"]) if f not in found]
    return found
