"""Scenario and sweep files for `piggyback sim`: validated like RuntimeConfig, run, and reported.

A scenario is one runtime (the same RuntimeConfig YAML a real runtime reads), one device profile and one
workload:

```yaml
runtime: {model: {uri: synthetic://llama-2-70b}, services: [...], engine: {...}, piggyback: {...}}
device:
  gpu: h100                 # a100-80gb | h100: timings from ../shared/data/vidur (per-layer Dense, all-reduce)
  model: llama-2-70b        # llama-2-7b | llama-2-70b | codellama-34b (yi-34b) | llama-3-8b, a Vidur model name
                            # (meta-llama/Meta-Llama-3-8B) or a folder with a Hugging Face config.json
  # vidur_model: ORG/NAME   # the folder under profiling/compute/<gpu>/ (default: config.json's _name_or_path)
  tp: 4
  host: {preset: dgx-h100}  # or cores, sockets, dram_bandwidth_gb_s_per_socket, dram_gib, ...
  remote: {preset: 1g4c}    # optional CPU-only nodes; or count, cores_per_node, ... fields
  # instead of gpu: runtime_profile: PATH (the file `piggyback profile --out PATH` wrote) and model:
  # synthetic://PRESET or a folder with config.json
workload: {seed: 0, duration_s: 600, sources: [...]}   # sim/workload/
drain_s: 300                # after the horizon, LS requests still held get this long to finish (then: misses)
policies: [piggyback, headroom]   # optional: run the scenario once per policy (`all`: every registered one)
```

A sweep is a base scenario and the fields to vary (dotted paths into it), run as their cartesian product.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from piggyback_runtime.config import ConfigError, RuntimeConfig, format_validation_error
from piggyback_runtime.scheduler.policies import policy_names
from piggyback_runtime.sim import devices
from piggyback_runtime.sim.simulator import SimResult, Simulator, percentile, uses_remote_tier
from piggyback_runtime.sim.workload import WorkloadSpec, generate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostConfig(_Strict):
    preset: str | None = None  # a devices.HOSTS name; the fields below override it
    cores: Annotated[int, Field(ge=1)] | None = None
    sockets: Annotated[int, Field(ge=1)] | None = None
    dram_bandwidth_gb_s_per_socket: Annotated[float, Field(gt=0)] | None = None
    dram_gib: Annotated[float, Field(gt=0)] | None = None
    cpu_attention_efficiency: Annotated[float, Field(gt=0, le=1)] | None = None
    per_task_overhead_s: Annotated[float, Field(ge=0)] | None = None


class RemoteConfig(_Strict):
    preset: Literal["1g4c"] | None = None
    count: Annotated[int, Field(ge=1)] | None = None
    cores_per_node: Annotated[int, Field(ge=1)] | None = None
    dram_bandwidth_gb_s_per_node: Annotated[float, Field(gt=0)] | None = None
    dram_gib_per_node: Annotated[float, Field(gt=0)] | None = None
    network_gb_s: Annotated[float, Field(gt=0)] | None = None
    network_latency_s: Annotated[float, Field(ge=0)] | None = None


class DeviceConfig(_Strict):
    gpu: str | None = None
    runtime_profile: str | None = None
    model: str
    tp: Annotated[int, Field(ge=1, le=8)] = 1
    topology: Literal["dgx", "pairwise_nvlink"] = "dgx"
    host: HostConfig = HostConfig()
    remote: RemoteConfig | None = None
    mixing_penalty: Annotated[float, Field(ge=0)] | None = None
    overhead_s: Annotated[float, Field(ge=0)] | None = None
    data_dir: str | None = None  # the vidur data folder (default ../shared/data/vidur or $PIGGYBACK_VIDUR_DIR)
    # With gpu: the folder under profiling/compute/<gpu>/ holding the model's timings (devices.resolve_vidur_model)
    vidur_model: str | None = None


class ScenarioSpec(_Strict):
    name: str = "scenario"
    runtime: dict[str, Any]
    device: DeviceConfig
    workload: WorkloadSpec
    # Long enough for a 2K-token answer at 0.13 s TPOT: a request cut off by the drain counts as a miss.
    drain_s: Annotated[float, Field(ge=0)] = 300.0
    policies: list[str] | None = None

    @field_validator("policies", mode="before")
    @classmethod
    def _every_policy(cls, value: Any) -> Any:
        return policy_names() if value == "all" else value  # the registry: scheduler/policies/


class SweepSpec(_Strict):
    base: dict[str, Any]
    vary: Annotated[dict[str, list[Any]], Field(min_length=1)]


def _validate(model: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, model.__name__, f"{model.__name__} in sim/scenario.py",
                                                  data)) from None  # fmt: skip


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_scenario(data: Any, source: str = "scenario") -> ScenarioSpec:
    spec: ScenarioSpec = _validate(ScenarioSpec, data, source)
    runtime = RuntimeConfig.from_dict(spec.runtime, source=f"{source}: runtime")
    for policy in spec.policies or ():
        RuntimeConfig.from_dict(_with_policy(spec.runtime, policy), source=f"{source}: policies")
    device = spec.device
    if (device.gpu is None) == (device.runtime_profile is None):
        raise ConfigError(f"{source}: device: set exactly one of `gpu` (a vidur-measured GPU) or `runtime_profile`")
    if device.vidur_model is not None and device.gpu is None:
        raise ConfigError(f"{source}: device.vidur_model names Vidur timings, which only a `gpu` device reads")
    workload_services = {s.service for s in spec.workload.sources if s.service is not None}
    unknown = sorted(workload_services - {s.name for s in runtime.services})
    if unknown:
        raise ConfigError(f"{source}: workload.sources name services that runtime.services lacks: {', '.join(unknown)}")
    return spec


def _with_policy(runtime: dict[str, Any], policy: str) -> dict[str, Any]:
    return {**runtime, "engine": {**runtime.get("engine", {}), "policy": policy}}


def _host(config: HostConfig) -> devices.HostSpec:
    base = devices.HOSTS.get(config.preset or "", None)
    if config.preset is not None and base is None:
        raise ConfigError(f"device.host.preset: unknown {config.preset!r}; known: {', '.join(devices.HOSTS)}")
    fields = {k: v for k, v in config.model_dump(exclude={"preset"}).items() if v is not None}
    if base is None:
        missing = [f for f in ("cores", "sockets", "dram_bandwidth_gb_s_per_socket", "dram_gib") if f not in fields]
        if missing:
            raise ConfigError(f"device.host: without a preset, set {', '.join(missing)}")
        return devices.HostSpec(**fields)
    return devices.HostSpec(**{**base.__dict__, **fields})


def _remote(config: RemoteConfig | None) -> devices.RemoteCPUNodes | None:
    if config is None:
        return None
    fields = {k: v for k, v in config.model_dump(exclude={"preset"}).items() if v is not None}
    if config.preset is None:
        try:
            return devices.RemoteCPUNodes(**fields)
        except TypeError as exc:
            raise ConfigError(f"device.remote: without a preset, set every field ({exc})") from None
    return devices.RemoteCPUNodes(**{**devices.REMOTE_1G4C.__dict__, **fields})


def shape_for(model: str) -> devices.ModelShape:
    """A simulator model shape: a devices.MODELS name, synthetic://PRESET, or a folder with config.json."""
    from piggyback_runtime.model.arch import ModelArch, synthetic_arch

    if model.startswith("synthetic://"):
        arch = synthetic_arch(model.removeprefix("synthetic://"))
    elif model.startswith("file://") or Path(model).is_dir():
        import json

        folder = Path(model.removeprefix("file://"))
        arch = ModelArch.from_hf_config(json.loads((folder / "config.json").read_text()), str(folder))
    else:
        return devices.resolve_model(model)
    return devices.ModelShape.from_arch(model, arch)


def build_device(config: DeviceConfig, base_dir: Path | None = None) -> devices.DeviceProfile:
    host = _host(config.host)
    remote = _remote(config.remote)
    try:
        if config.runtime_profile is not None:
            path = Path(config.runtime_profile)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            profile = devices.load_runtime_profile(path, shape_for(config.model), host, remote=remote)
        else:
            assert config.gpu is not None
            model = config.model
            if not model.startswith("file://") and base_dir is not None and (base_dir / model).is_dir():
                model = str(base_dir / model)  # a folder relative to the scenario file, as runtime_profile is
            profile = devices.build_gpu_profile(config.gpu, model, config.tp, host, remote, config.data_dir,
                                                config.topology, config.overhead_s,
                                                vidur_model=config.vidur_model)  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"device: {exc}") from None
    if config.mixing_penalty is not None:
        profile = devices.with_mixing_penalty(profile, config.mixing_penalty)
    return profile


def run_scenario(
    spec: ScenarioSpec, base_dir: Path | None = None, policy: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> SimResult:  # fmt: skip
    started = time.perf_counter()
    simulator = build_simulator(spec, base_dir, policy, progress)
    result = simulator.run()
    result.notes.append(f"simulated {result.end_s:.0f} s, {len(simulator.requests)} requests, {result.iterations} "
                        f"iterations in {time.perf_counter() - started:.1f} s")  # fmt: skip
    return result


def build_simulator(
    spec: ScenarioSpec, base_dir: Path | None = None, policy: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> Simulator:  # fmt: skip
    """The scenario's simulator, ready to run: its runtime config (under `policy` if given), device, requests,
    and caches sized from the device where the config does not fix them."""
    runtime_data = _with_policy(spec.runtime, policy) if policy else spec.runtime
    config = RuntimeConfig.from_dict(runtime_data, source="runtime")
    device = build_device(spec.device, base_dir)
    requests = generate(spec.workload, base_dir)
    num_blocks = host_blocks = None
    if spec.device.gpu is not None:  # size the caches from the device unless the config says otherwise
        if config.engine.num_kv_blocks is None:
            num_blocks = max(1, device.gpu_kv_capacity_tokens() // config.engine.block_size)
        if config.piggyback.num_host_kv_blocks is None:
            by_device = device.host_kv_capacity_tokens(include_remote=not uses_remote_tier(config, device))
            gib = config.piggyback.host_kv_memory_gib  # None: as much as the simulated host holds
            by_config = by_device if gib is None else int(gib * 2**30) // device.shape.kv_bytes_per_token()
            host_blocks = max(1, min(by_config, by_device) // config.piggyback.host_block_size)
    return Simulator(config, device, requests, spec.workload.duration_s, spec.drain_s, num_blocks, host_blocks,
                     progress)  # fmt: skip


# --- reports -----------------------------------------------------------------------------------------------------
def summary(result: SimResult) -> dict[str, float | str]:
    """The figures a run is judged by, flat (one CSV row)."""
    ls, be = result.of("LS"), result.of("BE")
    out: dict[str, float | str] = {"policy": result.policy}
    for name, records in (("ls", ls), ("be", be)):
        ttft = [r.ttft_s for r in records if r.ttft_s is not None]
        tpot = [r.tpot_s for r in records if r.tpot_s is not None]
        out[f"{name}_requests"] = len(records)
        out[f"{name}_rejected"] = sum(1 for r in records if r.rejected)
        out[f"{name}_ttft_p50_s"] = percentile(ttft, 50)
        out[f"{name}_ttft_p99_s"] = percentile(ttft, 99)
        out[f"{name}_tpot_p50_s"] = percentile(tpot, 50)
        out[f"{name}_tpot_p99_s"] = percentile(tpot, 99)
    out["ls_attainment"] = result.ls_attainment
    out["be_tokens_per_s"] = result.be_tokens_per_s
    out["gpu_busy_share"] = result.gpu_busy_share
    out["host_bandwidth_gb_s"] = result.host_bandwidth_b_s / 1e9
    out["host_kv_usage_mean"] = result.host_kv_usage_mean
    out["host_kv_usage_peak"] = result.host_kv_usage_peak
    return out


def format_table(rows: list[dict[str, float | str]], columns: list[str] | None = None) -> str:
    columns = columns or ["policy", "ls_attainment", "ls_rejected", "ls_ttft_p50_s", "ls_ttft_p99_s",
                          "ls_tpot_p50_s", "ls_tpot_p99_s", "be_tokens_per_s", "be_ttft_p50_s", "gpu_busy_share",
                          "host_bandwidth_gb_s", "host_kv_usage_peak"]  # fmt: skip
    def cell(value: float | str) -> str:
        if isinstance(value, str):
            return value
        return f"{value:.4g}" if value == value else "-"

    table = [[c for c in columns]] + [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in table)


# --- sweeps ------------------------------------------------------------------------------------------------------
def _set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with the field at `dotted` (keys, or list indices as numbers) replaced."""
    head, _, rest = dotted.partition(".")
    if isinstance(data, list):
        index = int(head)
        copy = list(data)
        copy[index] = _set_path(copy[index], rest, value) if rest else value
        return copy  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise ConfigError(f"vary: {dotted!r} goes through a value that is not a mapping or list")
    copy = dict(data)
    copy[head] = _set_path(copy.get(head, {}), rest, value) if rest else value
    return copy


def sweep_points(spec: SweepSpec) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(the varied values, the scenario data) for every combination."""
    keys = list(spec.vary)
    points = []
    for values in itertools.product(*(spec.vary[k] for k in keys)):
        data = spec.base
        for key, value in zip(keys, values, strict=True):
            data = _set_path(data, key, value)
        points.append((dict(zip(keys, values, strict=True)), data))
    return points


def load_sweep(data: Any, source: str = "sweep") -> SweepSpec:
    spec: SweepSpec = _validate(SweepSpec, data, source)
    for varied, scenario in sweep_points(spec):
        load_scenario(scenario, f"{source} at {varied}")
    return spec
