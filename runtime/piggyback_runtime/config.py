"""RuntimeConfig: the one contract between the operator (which renders it into a ConfigMap) and the runtime.

Every config field lives here. YAML keys are the field names (snake_case, units in the name); the only
alias is `class` (a Python keyword) for `ServiceConfig.service_class`. Unknown keys are rejected so that a
typo in a ConfigMap fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from piggyback_runtime.scheduler.policies import make_policy, policy_class, policy_names

ServiceClass = Literal["LS", "BE"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MODEL_URI_SCHEMES = ("file://", "pvc://", "synthetic://")
# pvc://CLAIM/PATH is read from PVC_MOUNT_ROOT/CLAIM/PATH: the operator mounts each claim there.
PVC_MOUNT_ROOT_ENV = "PIGGYBACK_PVC_MOUNT_ROOT"
DEFAULT_PVC_MOUNT_ROOT = "/models"
# Names the runtime, the router and the operator share live here, the bottom of the import graph, so that any of
# them can use one without importing another's internals (router/__init__.py re-exports them).
# The environment variable holding a pool's internal token: the runtimes' /internal/ endpoints require it as
# `Authorization: Bearer`, the router sends it, the operator sets it from a Secret.
INTERNAL_TOKEN_ENV = "PIGGYBACK_INTERNAL_TOKEN"
# The header carrying the client's own Authorization from the router to a runtime (service API keys).
CLIENT_AUTHORIZATION_HEADER = "x-client-authorization"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field and what to change."""


def check_hbm_reserve(engine: EngineConfig, num_kv_blocks: int) -> None:
    """Policy `hybrid` keeps engine.hbm_reserve_min_tokens of the accelerator KV cache free for LS: a reserve the
    cache cannot exceed leaves no HBM ever spare for BE. Checked at load when engine.num_kv_blocks fixes the
    cache, else where the engine has sized it (the planner), before any request is accepted."""
    if not (engine.hybrid_placement and policy_class(engine.policy).hybrid_placement):
        return
    capacity_tokens = num_kv_blocks * engine.block_size
    if engine.hbm_reserve_min_tokens >= capacity_tokens:
        raise ConfigError(
            f"engine.hbm_reserve_min_tokens ({engine.hbm_reserve_min_tokens}) is not below the accelerator KV "
            f"cache ({num_kv_blocks} blocks of {engine.block_size} = {capacity_tokens} tokens): no HBM would ever "
            f"be spare for BE; set engine.hbm_reserve_min_tokens below {capacity_tokens} or enlarge the KV cache "
            "(engine.num_kv_blocks, engine.kv_cache_memory_gib or engine.gpu_memory_utilization)"
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SLOConfig(_Strict):
    """Latency SLO of an LS service (definitions in DESIGN.md: TTFT, TPOT per request)."""

    ttft_ms: Annotated[float, Field(gt=0, le=3_600_000)]
    tpot_ms: Annotated[float, Field(gt=0, le=600_000)]
    attainment_target: Annotated[float, Field(gt=0, le=1)] = 0.99

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1000.0

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1000.0


class ServiceConfig(_Strict):
    """One hosted service (one LLMService): the name clients put in the OpenAI `model` field."""

    name: Annotated[str, Field(min_length=1, max_length=63)]
    service_class: ServiceClass = Field(alias="class")
    slo: SLOConfig | None = None
    # max_tokens of a request that sends none. None: 16 on /v1/completions (OpenAI's default); for chat, what the
    # context leaves after the prompt (LS) or at most 1024 (BE: it reserves host KV for prompt + max_tokens).
    # Any default is clamped to what the context leaves and to max_tokens_limit.
    default_max_tokens: Annotated[int, Field(ge=1)] | None = None
    # The most max_tokens a request may ask for (HTTP 400 names this field above it); None: the model's context.
    max_tokens_limit: Annotated[int, Field(ge=1)] | None = None
    # Name of the environment variable holding this service's API key: when set (and the variable is not
    # empty) requests for this service need `Authorization: Bearer <key>`. The operator fills it from the
    # Secret the LLMService names.
    api_key_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = None

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        if not _DNS1123_LABEL.match(name):
            raise ValueError(
                f"{name!r} is not a DNS-1123 label: use lowercase letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        return name

    @model_validator(mode="after")
    def _ls_needs_slo(self) -> ServiceConfig:
        if self.service_class == "LS" and self.slo is None:
            raise ValueError(f"service {self.name!r} is class LS and needs an `slo` (ttft_ms, tpot_ms)")
        if self.default_max_tokens and self.max_tokens_limit and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"service {self.name!r}: default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"max_tokens_limit ({self.max_tokens_limit})")
        return self


class ModelConfig(_Strict):
    uri: str
    served_model_name: str | None = None
    dtype: DType = "auto"
    # None: the model's own max_position_embeddings. Larger than that is an error at load time.
    max_model_len: Annotated[int, Field(gt=0)] | None = None
    # Seed for synthetic:// weights; the same seed gives the same weights on every machine.
    seed: int = 0

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if not uri.startswith(MODEL_URI_SCHEMES):
            raise ValueError(f"{uri!r} has no supported scheme; use one of {', '.join(MODEL_URI_SCHEMES)}")
        return uri


class EngineConfig(_Strict):
    block_size: Annotated[int, Field(ge=1, le=1024)] = 16
    # Accelerator KV cache size. num_kv_blocks wins when set; else kv_cache_memory_gib; else device memory:
    # gpu_memory_utilization x the device's memory, less what is in use once the weights are loaded and the
    # activation peak of the largest iteration (kv/sizing.py says how each figure is read).
    num_kv_blocks: Annotated[int, Field(ge=1)] | None = None
    kv_cache_memory_gib: Annotated[float, Field(gt=0)] | None = None
    # The share of a GPU's memory this runtime may fill (weights, activations and KV together). A CPU device's
    # cache is host memory and takes piggyback.host_memory_utilization of what is available instead.
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    # Treat the device as having at most this much memory (the operator sets it from the GPU product the pool
    # is pinned to; on a CPU device, where the host's memory is the device's, it fixes the figure). None: all.
    accelerator_memory_gib: Annotated[float, Field(gt=0)] | None = None
    max_num_seqs: Annotated[int, Field(ge=1, le=65536)] = 256
    # Token budget of one iteration (Sarathi-Serve chunk size): decodes + prefill chunks together.
    max_num_batched_tokens: Annotated[int, Field(ge=1)] = 512
    enable_chunked_prefill: bool = True
    # How BE work shares the accelerator with LS work: the name of a policy in scheduler/policies/ (one module
    # each, where it is described; `piggyback serve --help` lists them).
    policy: str = "hybrid"
    # Policies `headroom`, `headroom-admit`: the share of accelerator KV blocks BE requests may hold.
    headroom_be_kv_share: Annotated[float, Field(ge=0, le=1)] = 0.3
    # CUDA graphs for the dense part of decode iterations, BE merge layers eager (cuda_graphs.py): auto = on for a
    # CUDA device, off elsewhere; off = every step eager.
    cuda_graphs: Literal["auto", "off"] = "auto"
    # Element type of the accelerator (LS) KV cache. auto: the model's dtype. fp8_e4m3: one byte per element
    # (twice the tokens in the same memory) on GPUs with fp8 (compute capability 8.9+); refused elsewhere.
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = "auto"
    # Policy `hybrid`: BE KV stays in HBM only while HBM is spare: the planner keeps free the LS KV it forecasts
    # for this horizon, long enough to move BE KV out over PCIe (a few ms a request): measured LS arrival rate
    # × horizon × mean LS prompt + output tokens, plus the growth of held LS requests; never less than
    # hbm_reserve_min_tokens.
    hbm_reserve_horizon_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    hbm_reserve_min_tokens: Annotated[int, Field(ge=0)] = 0
    # Policy `hybrid`: false puts every BE request on the host path (as `piggyback`), for ablation.
    hybrid_placement: bool = True
    # SLO-controlled policies: the token budget of each iteration is the largest whose predicted latency keeps
    # every running LS request's TPOT SLO (less slo_control.safety_margin), at most max_num_batched_tokens and
    # never below min_num_batched_tokens nor the iteration's LS decode rows. False: max_num_batched_tokens.
    slo_token_budget: bool = True
    min_num_batched_tokens: Annotated[int, Field(ge=1)] | None = None

    # Tensor parallelism: one process per rank, each with one GPU (cuda:RANK) or a share of the CPU, holding
    # 1/tp of every layer's heads, KV heads and MLP (runtime/piggyback_runtime/distributed.py). The model's
    # attention heads, KV heads and intermediate size must be multiples of it (checked when the model loads).
    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1

    @model_validator(mode="after")
    def _budget_bounds(self) -> EngineConfig:
        # Every running sequence decodes one token an iteration: a budget below max_num_seqs could not hold one
        # decode batch, and the decodes left out would miss their TPOT (vLLM refuses the same).
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"engine.max_num_batched_tokens ({self.max_num_batched_tokens}) is below "
                             f"engine.max_num_seqs ({self.max_num_seqs}): the token budget cannot hold one decode "
                             f"token of every running sequence; raise engine.max_num_batched_tokens to at least "
                             f"{self.max_num_seqs} or set engine.max_num_seqs to at most "
                             f"{self.max_num_batched_tokens}")  # fmt: skip
        if self.min_num_batched_tokens is not None and self.min_num_batched_tokens > self.max_num_batched_tokens:
            raise ValueError(f"engine.min_num_batched_tokens ({self.min_num_batched_tokens}) exceeds "
                             f"engine.max_num_batched_tokens ({self.max_num_batched_tokens}): the budget cannot "
                             "hold; lower the first or raise the second")  # fmt: skip
        if self.num_kv_blocks is not None:
            check_hbm_reserve(self, self.num_kv_blocks)
        return self


    @field_validator("policy")
    @classmethod
    def _known_policy(cls, policy: str) -> str:
        names = policy_names()  # the registry: no torch, no planner
        if policy not in names:
            raise ValueError(f"{policy!r} is not a policy; use one of {', '.join(names)}")
        return policy


_RAY_ADDRESS = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5})$")
_RAY_RESOURCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,62}$")


class RemoteNodesConfig(_Strict):
    """CPU-only machines that hold BE KV in their DRAM and run its attention: Ray actors (piggyback/remote/)."""

    # The Ray cluster: `auto` (the pod is a KubeRay driver: RAY_ADDRESS or the local raylet), `local` (start
    # one in-process: tests, a laptop), or host:port / ray://host:port.
    address: str = "auto"
    # Ray namespace of the actors (one per runtime replica keeps replicas apart).
    namespace: Annotated[str, Field(min_length=1, max_length=63)] = "piggyback"
    num_nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    workers_per_node: Annotated[int, Field(ge=1, le=64)] = 1
    cpus_per_worker: Annotated[float, Field(gt=0, le=1024)] = 4
    # DRAM each worker reserves from Ray; 80 % of it holds BE KV, the rest is the process and its buffers.
    memory_per_worker_gib: Annotated[float, Field(gt=0, le=65536)] = 8
    # The custom Ray resource the operator puts on CPU-only nodes (and nowhere else): workers never land on a
    # GPU node. Each worker asks for one unit.
    node_resource: str = "piggyback_cpu_attention"
    # A layer's batch not back from a node within this is declared lost: the node is dropped and replaced,
    # its BE requests re-prefilled or failed. The GPU never waits on it either way (a row not back is merged
    # in a later iteration).
    layer_deadline_ms: Annotated[float, Field(gt=0, le=600_000)] = 2_000
    # A BE request whose node died is prefilled again elsewhere (True) or ends with an error event (False).
    retry_on_worker_loss: bool = True
    # Link to each node, for the planner's remote capacity (RemoteCapacity) and the simulator: Gbit/s.
    network_gbps: Annotated[float, Field(gt=0, le=10_000)] = 25
    # How long start-up waits for the first actors to answer (the engine starts with those that did), and at
    # least how long it waits for the local CPU workers.
    ready_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120

    @field_validator("address")
    @classmethod
    def _ray_address(cls, address: str) -> str:
        if not _RAY_ADDRESS.match(address):
            raise ValueError(f"{address!r} is not a Ray address: use auto, local, host:port or ray://host:port")
        return address

    @field_validator("node_resource")
    @classmethod
    def _resource_name(cls, name: str) -> str:
        if not _RAY_RESOURCE.match(name) or name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is not a custom Ray resource name: letters, digits, '_' and '-', "
                             "and not one of Ray's own (CPU, GPU, memory)")
        return name


class PiggybackConfig(_Strict):
    """The BE path: KV in host DRAM, attention on CPU worker processes (used by policy `piggyback`)."""

    # Tokens per host KV block, independent of the accelerator's block_size. One kv head's slice of a block
    # is one contiguous run in the host cache; 16-token runs (4 KiB at 16-bit) end at every page, where the
    # hardware prefetchers stop and retrain, so the CPU attention kernel reads 64-token blocks 5-15 % faster
    # (benchmarks/cpu_attention.py). Host DRAM is plentiful: the half-block lost per request is negligible.
    host_block_size: Annotated[int, Field(ge=1, le=1024)] = 64
    # Host KV cache size. num_host_kv_blocks wins when set; else host_kv_memory_gib; else host memory:
    # host_memory_utilization x what the pod's memory limit (or, without one, the machine) still has available
    # at start-up; the rest stays for the CPU workers, pinned buffers and the process itself.
    num_host_kv_blocks: Annotated[int, Field(ge=1)] | None = None
    host_kv_memory_gib: Annotated[float, Field(gt=0)] | None = None
    host_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.5
    # BE requests that can hold host KV at once (each owns one row of the shared q/k/v/out buffers).
    max_be_requests: Annotated[int, Field(ge=1, le=65536)] = 256
    num_cpu_workers: Annotated[int, Field(ge=1, le=256)] = 1
    # None: the machine's cores divided among the workers.
    cpu_threads_per_worker: Annotated[int, Field(ge=1)] | None = None
    # Most BE rows merged into one layer's Dense batch per iteration (the SLO controller lowers it).
    max_be_rows_per_layer: Annotated[int, Field(ge=0)] = 64
    # CPU attention tasks go to whichever worker frees first, ordered by the layer the accelerator reaches
    # first, so BE rows keep pace with the GPU (the simulator models it; false: one FIFO worker per row, the
    # earlier behaviour, for ablation).
    paced_cpu_attention: bool = True
    # 2: under a policy whose BE decodes all run on the CPU path (`piggyback`), an iteration that prefills while
    # the CPU path is behind runs as two sub-batches half a layer apart (NEO's pipelining), so a CPU row's
    # attention overlaps the other sub-batch's Dense work and the CPU workers have in-window work in both halves
    # of a layer; the planner decides per iteration (IterationPlan.split_at, `Planner._cpu_rows_ride`, which says
    # why `hybrid` never splits) and its latency model counts the second pass over the weights. 1: one batch, one
    # merge point per layer (ablation).
    sub_batches: Literal[1, 2] = 2
    # Remote CPU attention nodes on Ray (None: host CPU workers only).
    remote: RemoteNodesConfig | None = None


class SLOControlConfig(_Strict):
    """Dynamic BE batching and LS admission from a profiled latency model (policy `piggyback`)."""

    enabled: bool = True
    # The planner keeps predicted iteration latency this share below the tightest LS budget, and LS admission
    # keeps predicted TTFT and TPOT this share below the request's SLO.
    safety_margin: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Reject (HTTP 429) an LS request the model predicts would miss its SLO or make running ones miss theirs.
    admission: bool = True
    # BE requests waiting for host KV memory; one more is rejected with HTTP 429.
    max_be_queue: Annotated[int, Field(ge=0)] = 1024
    # Where the latency profile is cached (default ~/.cache/piggyback/profiles, or $PIGGYBACK_PROFILE_DIR).
    profile_cache_dir: str | None = None
    # At start a cached profile is checked by timing a few forward steps; it is profiled again when any of them
    # is off from its prediction by more than this factor (either way: 1.5 = 50 % slower or 1/1.5 as fast).
    profile_trust_factor: Annotated[float, Field(gt=1, le=100)] = 1.5
    # How often the LS headroom figure for the operator is recomputed.
    headroom_interval_s: Annotated[float, Field(gt=0)] = 1.0


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    # On SIGTERM: readiness fails at once, new requests get 503, in-flight requests get this long to finish;
    # BE requests still running then fail with a retryable error and the process exits. The operator sets
    # the pod's terminationGracePeriodSeconds above it.
    drain_timeout_s: Annotated[float, Field(ge=0, le=3600)] = 20.0
    # How long a Python thread may hold the GIL while another waits for it (sys.setswitchinterval; Python's
    # default is 5 ms). The HTTP thread and the engine thread share one interpreter: each time a torch op returns,
    # the engine thread waits for the GIL, up to this long while the HTTP thread answers requests. Under 5x
    # overload that wait was 14-20 % of the engine's iteration time at 5 ms and 9-11 % at 0.5 ms
    # (benchmarks/results/overload.md, fifth session).
    gil_switch_interval_s: Annotated[float, Field(ge=0.0001, le=0.1)] = 0.0005


class MetricsConfig(_Strict):
    # LS SLO attainment is reported over this sliding window of finished (or rejected) requests.
    attainment_window_s: Annotated[float, Field(gt=0)] = 60.0


BATCH_DATABASE_SCHEMES = ("sqlite+aiosqlite://", "postgresql+asyncpg://")


class BatchConfig(_Strict):
    """The OpenAI Batch API (/v1/files, /v1/batches; the batch/ package): durable BE jobs."""

    enabled: bool = False
    # The SQLite database and the files on disk: one directory (the operator mounts a PVC there). Not needed
    # with a shared database, which then holds the files too (any replica serves any file).
    directory: str | None = None
    # A shared database for a pool of replicas that lease lines from one queue, e.g.
    # postgresql+asyncpg://user:pass@host/db; None: SQLite in `directory` (one replica).
    database_url: str | None = None
    # The name of an environment variable holding database_url (the operator fills it from a Secret); wins
    # over database_url when set and non-empty.
    database_url_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = None
    # Uploads above this size are refused (HTTP 413); OpenAI's own limit is 200 MB.
    max_file_bytes: Annotated[int, Field(ge=1)] = 200 * 1024 * 1024
    max_lines_per_file: Annotated[int, Field(ge=1)] = 50_000
    # The share of BE capacity a runner takes: at most this many lines in flight per replica, and new lines
    # only while live BE requests plus lines in flight stay below piggyback.max_be_requests.
    max_inflight_lines: Annotated[int, Field(ge=1, le=65536)] = 64
    # A replica that stops renewing its leases (it died) loses its lines after this long; another runs them.
    lease_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # How often a runner looks for new work when it has none.
    poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(BATCH_DATABASE_SCHEMES):
            raise ValueError(f"use a URL starting with one of {', '.join(BATCH_DATABASE_SCHEMES)}")
        return url

    @model_validator(mode="after")
    def _needs_directory(self) -> BatchConfig:
        if self.enabled and not self.directory and not (self.database_url or self.database_url_env):
            raise ValueError("batch.enabled needs batch.directory (where the SQLite database and the batch files "
                             "are kept) or a shared database (batch.database_url or batch.database_url_env)")
        return self


class RuntimeConfig(_Strict):
    model: ModelConfig
    # "auto": cuda if available, else cpu.
    device: str = "auto"
    services: Annotated[list[ServiceConfig], Field(min_length=1)]
    engine: EngineConfig = EngineConfig()
    piggyback: PiggybackConfig = PiggybackConfig()
    slo_control: SLOControlConfig = SLOControlConfig()
    server: ServerConfig = ServerConfig()
    metrics: MetricsConfig = MetricsConfig()
    batch: BatchConfig = BatchConfig()

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", device):
            raise ValueError(f"{device!r} is not a device; use auto, cpu, cuda or cuda:N")
        return device

    @model_validator(mode="after")
    def _unique_service_names(self) -> RuntimeConfig:
        names = [s.name for s in self.services]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"service names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _be_work_can_run(self) -> RuntimeConfig:
        policy = make_policy(self.engine.policy, self.engine.headroom_be_kv_share, self.piggyback.max_be_requests)
        # A BE request on the host path decodes only as a row of some layer's batch: with no row allowed, it
        # would hold host KV and never produce a token.
        host_path = [s.name for s in self.services if policy.on_host_path(s.service_class)]
        if host_path and policy.rows_per_layer(self.piggyback.max_be_rows_per_layer) < 1:
            raise ValueError(f"piggyback.max_be_rows_per_layer is 0 but policy {policy.name!r} decodes service "
                             f"{host_path[0]!r} on the host path, whose requests would never decode; set "
                             "piggyback.max_be_rows_per_layer to at least 1")  # fmt: skip
        # A BE request on the accelerator under a KV share of none (headroom policies) would wait forever.
        on_accelerator = [s.name for s in self.services if s.service_class == "BE" and not policy.on_host_path("BE")]
        if on_accelerator and policy.be_kv_block_limit(2**40) == 0:
            raise ValueError(f"engine.headroom_be_kv_share is 0 but policy {policy.name!r} runs service "
                             f"{on_accelerator[0]!r} (BE) within that share of the accelerator KV cache, so its "
                             "requests would never run; set engine.headroom_be_kv_share above 0")  # fmt: skip
        return self

    def service(self, name: str) -> ServiceConfig | None:
        return next((s for s in self.services if s.name == name), None)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> RuntimeConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> RuntimeConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


def format_validation_error(
    exc: ValidationError, source: str, what: str = "runtime config", schema: str = "RuntimeConfig in config.py",
    data: Any = None,
) -> str:  # fmt: skip
    """One line per problem, each naming the field by its dotted YAML path.

    `what` and `schema` name the document and where its fields are described; with the validated `data`,
    the discriminator tags pydantic puts in locations of tagged unions are dropped (`sources.0.poisson.x`
    reads `sources.0.x`, the path as written in the file)."""
    lines = [f"{source}: invalid {what}:"]
    for err in exc.errors():
        field = ".".join(str(part) for part in _yaml_path(err["loc"], data)) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"unknown field (check the spelling; see {schema})"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def _yaml_path(loc: tuple[str | int, ...], data: Any) -> list[str | int]:
    """`loc` without union tags: a step equal to the node's `kind` that is not one of the node's keys."""
    if data is None:
        return list(loc)
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part not in node and node.get("kind") == part:
            continue
        path.append(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return path
