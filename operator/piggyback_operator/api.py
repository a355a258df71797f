"""The LLMService API (`piggyback.dev/v1alpha1`): pydantic models, and the CRD generated from them.

One source of truth: the models below define the schema, defaults, bounds and CEL rules; `crd_manifest()`
turns them into the CustomResourceDefinition committed under crds/ (`piggyback-operator crd` writes it, a
test fails when the committed file differs). The operator parses every spec with the same models, so a
spec the API server accepted but the operator cannot use fails with the same message a person saw.
"""

from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

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

_DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
_URI_RE = r"^(file|pvc|synthetic)://.+$"
_DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_SECRET_KEY_RE = r"^[-._a-zA-Z0-9]+$"


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
            json_schema_extra={"x-kubernetes-validations": [_cel("self == oldSelf", MSG_URI_IMMUTABLE)]},
        ),
    ]
    """Where the weights are: file:///path, pvc://claim/path, or synthetic://<architecture> (random weights)."""
    served_name: Annotated[str, Field(max_length=253)] | None = None
    """Name of the model reported by the runtime (defaults to the runtime's own choice)."""
    dtype: DType = "auto"
    """Weight and activation dtype."""
    max_context_length: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    """Longest prompt + output in tokens (defaults to the model's own maximum)."""


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
            "x-kubernetes-validations": [_cel("self.minReplicas <= self.maxReplicas", MSG_MIN_LE_MAX)]
        }
    )
    min_replicas: Annotated[int, Field(ge=1, le=64)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=64)] = 1

    @model_validator(mode="after")
    def _min_le_max(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(MSG_MIN_LE_MAX)
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
    key: Annotated[str, Field(max_length=253)] | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: Annotated[str, Field(max_length=63)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Placement(_Model):
    """Which GPU nodes may serve the service, and which pool (group of shared runtime pods) it joins."""

    pool: Annotated[str, Field(max_length=40, pattern=_DNS_LABEL_RE)] = "default"
    """Pool name. LS and BE services of one model in one pool share runtime pods (and so the weights)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    routing: Literal["roundRobin", "leastLoaded", "lengthAware"] = "roundRobin"
    """How the pool's router spreads requests over its replicas (deployed when the pool has more than one):
    roundRobin, leastLoaded (shortest queue, Llumnix-style rebalancing), lengthAware (L4: length-specialised
    stages, requests live-migrated with their KV as they grow). A pool follows its first member (by name)."""


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
            ]
        }
    )
    model: ModelSpec
    service_class: ServiceClass = Field(
        alias="class",
        json_schema_extra={"x-kubernetes-validations": [_cel("self == oldSelf", MSG_CLASS_IMMUTABLE)]},
    )
    """LS: latency-sensitive, with an SLO. BE: best-effort throughput, attention on host CPUs."""
    slo: SLOSpec | None = None
    expected_load: ExpectedLoad = ExpectedLoad()
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    """Runtime replicas the pool keeps at least while this service is in it."""
    scaling: Scaling | None = None
    resources: Resources = Resources()
    placement: Placement = Placement()
    limits: Limits | None = None
    api_key_secret_ref: SecretKeyRef | None = None
    """When set, requests for this service need `Authorization: Bearer <the Secret's key>` (OpenAI clients send
    their api_key so). The operator never reads the Secret: the runtime pod gets it as an environment variable."""
    drain_timeout_seconds: Annotated[int, Field(ge=0, le=3600)] | None = None
    """On shutdown, how long in-flight requests get to finish (default 20). The pool drains for the longest of
    its members' values; the pod's terminationGracePeriodSeconds is set above it."""

    @model_validator(mode="after")
    def _rules(self) -> LLMServiceSpec:
        if self.service_class == "LS" and self.slo is None:
            raise ValueError(MSG_LS_NEEDS_SLO)
        if self.scaling and not self.scaling.min_replicas <= self.replicas <= self.scaling.max_replicas:
            raise ValueError(MSG_REPLICAS_IN_RANGE)
        return self

    @property
    def min_replicas(self) -> int:
        return self.scaling.min_replicas if self.scaling else self.replicas

    @property
    def max_replicas(self) -> int:
        return self.scaling.max_replicas if self.scaling else self.replicas


# --- status ------------------------------------------------------------------------------------------

ConditionType = Literal["Admitted", "Placed", "RuntimeReady", "SLOMet", "Ready"]
CONDITION_TYPES: tuple[ConditionType, ...] = ("Admitted", "Placed", "RuntimeReady", "SLOMet", "Ready")


class Condition(_Model):
    """A Kubernetes API condition (metav1.Condition)."""

    type: Annotated[str, Field(max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")]
    """CamelCase, machine-readable."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """What happened and what a person can do about it."""
    last_transition_time: Annotated[str, Field(json_schema_extra={"format": "date-time"})]
    observed_generation: Annotated[int, Field(ge=0)] | None = None


class Measured(_Model):
    """Figures scraped from the runtime pods serving this service (aggregated over replicas)."""

    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None
    attainment: float | None = None
    """LS SLO attainment over the runtime's sliding window (0-1)."""
    window_requests: int | None = None
    be_tokens_per_second: float | None = None
    """BE output tokens per second between the last two scrapes."""
    pool_headroom_requests_per_second: float | None = None
    """Extra LS request rate the pool's runtimes predict fits under all SLOs; absent when not exported."""
    scraped_at: Annotated[str, Field(json_schema_extra={"format": "date-time"})] | None = None


class LLMServiceStatus(_Model):
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    endpoint: str | None = None
    """OpenAI-compatible base URL inside the cluster; send `model: <this LLMService's name>`."""
    pool: str | None = None
    """The runtime Deployment serving this service."""
    nodes: list[str] = Field(default_factory=list)
    runtime_endpoints: list[str] = Field(default_factory=list)
    """host:port of every runtime pod of the pool (each addressable on its own)."""
    replicas: int | None = None
    ready_replicas: int | None = None
    measured: Measured | None = None


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
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


CRD_HEADER = "# Generated by `piggyback-operator crd` from operator/piggyback_operator/api.py. Do not edit.\n"


def crd_yaml() -> str:
    return CRD_HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)
