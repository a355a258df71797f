"""How many KV blocks fit: the accelerator's cache from device memory, the host cache from the pod's memory.

Accelerator KV (LS requests, and BE requests while they prefill), as vLLM sizes it:
    budget = gpu_memory_utilization x device total - in use after loading - activation peak
in this order: the weights are loaded, a profile forward runs the largest iteration the config allows
(max_num_batched_tokens tokens through every layer, then logits for max_num_seqs rows;
model/activation_peak.py) and records the allocator's peak, the allocator's cache is emptied, and only then is
the device's free memory read, so that "in use after loading" (total minus free: the weights, the CUDA context,
anything another process holds) counts no block the profile left cached. `engine.kv_cache_memory_gib` and
`engine.num_kv_blocks` override the measurement.

Device memory: on CUDA, torch.cuda.mem_get_info, capped by `engine.accelerator_memory_gib` when set (the
operator sets it from the GPU product a pool is pinned to). On a CPU device the host is the accelerator: its
cache is host memory, shared with the host cache, the CPU workers and the process, so it is sized like the host
cache: budget = host_memory_utilization x (available - a host cache of fixed size) - activation peak, from the
host memory reading below (or `engine.accelerator_memory_gib`, which makes the figure deterministic); the peak is
estimated from the shapes there (the CPU allocator keeps no peak).

Host KV (BE requests on the CPU path): `piggyback.host_memory_utilization` x host memory still available, where
available is the pod's memory limit (cgroup v2 memory.max, or v1 memory.limit_in_bytes) minus its working set,
or /proc/meminfo's MemAvailable where no limit is set; on a CPU device, minus what the accelerator cache took.
`piggyback.host_kv_memory_gib` and `piggyback.num_host_kv_blocks` override it.

On a CPU device, where both caches take host memory a small model does not need, a cache sized from memory is
capped at what the configured limits can ever use: the accelerator cache at `engine.max_num_seqs` requests and
the host cache at `piggyback.max_be_requests` requests, each of `max_model_len` tokens (a 13M-parameter model
otherwise took 12 GB of KV). Each cache's explanation says which bound won; the engine logs both at start.

A cache sized from memory that cannot hold one max_model_len request is an error at start-up naming the numbers.
Explicit block counts are taken as given: requests that do not fit are refused one by one (HTTP 400). A cache
whose size the config fixes (blocks or GiB) that is larger than the memory it lives in cannot be held and is an
error at start-up naming the field (`require_fixed_caches_fit`, called by the engine after sizing).

This module takes figures, not the model or the policy: the engine passes the bytes per token, the weights'
bytes, whether any service takes the host path, and readers for the memory and the activation peak (called
only when a cache is sized from memory), so that the KV layer imports nothing above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from piggyback_runtime.config import ConfigError, RuntimeConfig

GIB = 2**30
CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")
# cgroup v1 writes "no limit" as the largest page-aligned int64; anything at or above this is unlimited.
_CGROUP_V1_UNLIMITED = 2**62


class KVSizingError(ConfigError):
    """Too little memory for the KV cache; the message names bytes per token, tokens needed and bytes found."""


@dataclass(frozen=True)
class MemoryReading:
    """Memory of one pool (a device, or the host within the pod's limit), and where the figures come from."""

    total_bytes: int
    available_bytes: int
    source: str


def parse_cgroup_limit(text: str) -> int | None:
    """Bytes of a cgroup memory limit file (v2 memory.max or v1 memory.limit_in_bytes); None when unlimited."""
    value = text.strip()
    if value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"cgroup memory limit {value!r} is neither 'max' nor a byte count") from None
    return None if limit >= _CGROUP_V1_UNLIMITED else limit


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field (its figures are in kB)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _inactive_file(stat_path: Path, key: str) -> int:
    # Page cache the kernel reclaims before it kills anything: not part of the working set (as the kubelet counts).
    try:
        for line in stat_path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def read_host_memory(cgroup_root: Path = CGROUP_ROOT, meminfo: Path = MEMINFO) -> MemoryReading:
    """The host memory this process may use: the pod's (cgroup) limit when it has one, else the machine's."""
    info = parse_meminfo(meminfo.read_text())
    machine_total, machine_available = info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    # cgroup v2 (unified hierarchy) first, then v1's memory controller.
    candidates = (
        ("memory.max", "memory.current", "memory.stat", "inactive_file", cgroup_root),
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file",
         cgroup_root / "memory"),
    )  # fmt: skip
    for limit_name, usage_name, stat_name, inactive_key, folder in candidates:
        limit_path = folder / limit_name
        if not limit_path.is_file():
            continue
        limit = parse_cgroup_limit(limit_path.read_text())
        if limit is None or (machine_total and limit >= machine_total):
            break  # no limit below the machine's memory: the machine's figures are the binding ones
        try:
            usage = int((folder / usage_name).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        working_set = max(0, usage - _inactive_file(folder / stat_name, inactive_key))
        available = max(0, min(limit - working_set, machine_available or limit))
        return MemoryReading(limit, available, f"cgroup limit {limit_path} ({usage_name} {working_set} B in use)")
    return MemoryReading(machine_total, machine_available, f"{meminfo} (MemTotal, MemAvailable)")


def read_device_memory(device: torch.device) -> MemoryReading:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return MemoryReading(total, free, f"torch.cuda.mem_get_info on {torch.cuda.get_device_name(device)}")
    host = read_host_memory()
    return MemoryReading(host.total_bytes, host.available_bytes, f"host memory (CPU device): {host.source}")


def cap_total(reading: MemoryReading, cap_gib: float | None) -> MemoryReading:
    """The reading as if the device had at most `cap_gib` (engine.accelerator_memory_gib)."""
    if cap_gib is None or cap_gib * GIB >= reading.total_bytes:
        return reading
    cap = int(cap_gib * GIB)
    used = reading.total_bytes - reading.available_bytes
    return MemoryReading(cap, max(0, cap - used), f"engine.accelerator_memory_gib {cap_gib:g} ({reading.source})")


def weights_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:  # tied embeddings count once
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass(frozen=True)
class CacheSize:
    """One cache's size and the figures it came from (for the start-up log and errors)."""

    num_blocks: int
    block_size: int
    bytes_per_token: int
    budget_bytes: int
    explanation: str

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token


def blocks_in(budget_bytes: int, block_bytes: int) -> int:
    return max(0, budget_bytes) // block_bytes


def cap_to_limits(size: CacheSize, max_requests: int, max_model_len: int, requests_field: str) -> CacheSize:
    """`size`, or the blocks `max_requests` requests of `max_model_len` tokens can hold at most when that is less."""
    limit_blocks = max_requests * math.ceil(max_model_len / size.block_size)
    if size.num_blocks <= limit_blocks:
        return size
    limit_bytes = limit_blocks * size.block_size * size.bytes_per_token
    explanation = (
        f"sized to the limits: {requests_field} {max_requests} x max_model_len {max_model_len} tokens = "
        f"{limit_blocks} blocks ({limit_bytes / GIB:.3g} GiB), less than the memory share of {size.num_blocks} "
        f"blocks ({size.explanation})"
    )
    return CacheSize(limit_blocks, size.block_size, size.bytes_per_token, limit_bytes, explanation)


def require_one_request(size: CacheSize, max_model_len: int, cache: str, fix: str) -> None:
    """A cache sized from memory must hold one request of max_model_len tokens, or the runtime cannot serve."""
    needed_blocks = math.ceil(max_model_len / size.block_size)
    if size.num_blocks >= needed_blocks:
        return
    needed_bytes = needed_blocks * size.block_size * size.bytes_per_token
    raise KVSizingError(
        f"{cache} KV cache too small for one request of max_model_len {max_model_len} tokens: it needs "
        f"{needed_bytes} bytes ({size.bytes_per_token} bytes per token x {needed_blocks * size.block_size} tokens "
        f"in blocks of {size.block_size}) but {max(0, size.budget_bytes)} bytes are available "
        f"({size.explanation}); {fix}"
    )


def accelerator_kv_size(
    *,
    reading: MemoryReading,
    utilization: float,
    weights: int,
    activation: int,
    activation_how: str,
    block_size: int,
    bytes_per_token: int,
) -> CacheSize:
    """budget = utilization x total - (total - available) - activation; (total - available) holds the weights."""
    in_use = reading.total_bytes - reading.available_bytes
    budget = int(utilization * reading.total_bytes) - in_use - activation
    explanation = (
        f"gpu_memory_utilization {utilization:g} x {reading.total_bytes} B total from {reading.source}, minus "
        f"{in_use} B in use after loading (weights {weights} B), minus activation peak {activation} B "
        f"({activation_how})"
    )
    return CacheSize(blocks_in(budget, block_size * bytes_per_token), block_size, bytes_per_token, budget,
                     explanation)  # fmt: skip


def cpu_device_kv_size(
    *,
    reading: MemoryReading,
    utilization: float,
    reserved_bytes: int,
    activation: int,
    activation_how: str,
    block_size: int,
    bytes_per_token: int,
) -> CacheSize:
    """A CPU device: budget = host share x (available - a fixed-size host cache) - activation."""
    budget = int(utilization * max(0, reading.available_bytes - reserved_bytes)) - activation
    reserved = f", less {reserved_bytes} B of host KV on the same memory" if reserved_bytes else ""
    explanation = (
        f"host_memory_utilization {utilization:g} x {reading.available_bytes} B available of {reading.total_bytes} B "
        f"from {reading.source}{reserved}, minus activation peak {activation} B ({activation_how})"
    )
    return CacheSize(blocks_in(budget, block_size * bytes_per_token), block_size, bytes_per_token, budget,
                     explanation)  # fmt: skip


def host_kv_size(
    *, reading: MemoryReading, utilization: float, taken_bytes: int, block_size: int, bytes_per_token: int
) -> CacheSize:
    """budget = utilization x (available - what the accelerator cache took from the same memory)."""
    budget = int(utilization * max(0, reading.available_bytes - taken_bytes))
    taken = f", less {taken_bytes} B of accelerator KV on the same memory" if taken_bytes else ""
    explanation = (
        f"host_memory_utilization {utilization:g} x {reading.available_bytes} B available of {reading.total_bytes} B "
        f"from {reading.source}{taken}"
    )
    return CacheSize(blocks_in(budget, block_size * bytes_per_token), block_size, bytes_per_token, budget,
                     explanation)  # fmt: skip


@dataclass(frozen=True)
class KVSizes:
    accelerator: CacheSize
    host: CacheSize


def configured_size(num_blocks: int | None, memory_gib: float | None, block_size: int, bytes_per_token: int,
                    blocks_field: str, gib_field: str) -> CacheSize | None:  # fmt: skip
    """The size a config fixes: a block count first, then GiB; None when the cache is to be sized from memory.
    Explicit block counts are taken as given (tests rely on tiny caches); GiB figures are checked by the caller."""
    if num_blocks is not None:
        return CacheSize(num_blocks, block_size, bytes_per_token, num_blocks * block_size * bytes_per_token,
                         blocks_field)  # fmt: skip
    if memory_gib is not None:
        budget = int(memory_gib * GIB)
        return CacheSize(blocks_in(budget, block_size * bytes_per_token), block_size, bytes_per_token, budget,
                         f"{gib_field} {memory_gib:g}")  # fmt: skip
    return None


def size_kv_caches(
    config: RuntimeConfig,
    *,
    bytes_per_token: int,
    max_model_len: int,
    resident_weights_bytes: int,
    on_cpu: bool,
    uses_host_kv: bool,
    read_device: Callable[[], MemoryReading],
    read_host: Callable[[], MemoryReading],
    measure_activation: Callable[[int, int], tuple[int, str]],
) -> KVSizes:
    """Both caches' sizes, from the config's overrides or from memory.

    `bytes_per_token`: K and V of one token over all layers; `resident_weights_bytes`: the weights on the
    device (for the explanation); `on_cpu`: the accelerator is this host's memory; `uses_host_kv`: some service
    takes the host path (else a host cache too small for one request is no error). The readers are called only
    for a cache sized from memory: `read_device()` and `read_host()` give a MemoryReading,
    `measure_activation(tokens, logit_rows)` the activation peak in bytes of the largest iteration and how it
    was found."""
    engine, pb = config.engine, config.piggyback
    host = configured_size(pb.num_host_kv_blocks, pb.host_kv_memory_gib, pb.host_block_size, bytes_per_token,
                           "piggyback.num_host_kv_blocks", "piggyback.host_kv_memory_gib")  # fmt: skip
    if host is not None and pb.num_host_kv_blocks is None and uses_host_kv:
        require_one_request(host, max_model_len, "host", "raise piggyback.host_kv_memory_gib or lower "
                            "model.max_model_len")  # fmt: skip

    configured = configured_size(engine.num_kv_blocks, engine.kv_cache_memory_gib, engine.block_size,
                                 bytes_per_token, "engine.num_kv_blocks", "engine.kv_cache_memory_gib")  # fmt: skip
    if configured is not None:
        accelerator = configured
        if engine.num_kv_blocks is None:
            require_one_request(accelerator, max_model_len, "accelerator", "raise engine.kv_cache_memory_gib or lower "
                                "model.max_model_len")  # fmt: skip
    else:
        # The profile forward first (it empties the allocator's cache when done), then the free memory: read
        # before, "in use" would count the blocks the profile leaves cached (vLLM's order).
        rows = min(engine.max_num_seqs, engine.max_num_batched_tokens)
        activation, how = measure_activation(engine.max_num_batched_tokens, rows)
        reading = cap_total(read_device(), engine.accelerator_memory_gib)
        if on_cpu:
            # The CPU device's cache is host memory, shared with the host cache, the CPU workers and the process:
            # it takes the host share of what is available, after a host cache whose size the config fixes.
            reserved = host.budget_bytes if host is not None else 0
            accelerator = cpu_device_kv_size(
                reading=reading, utilization=pb.host_memory_utilization, reserved_bytes=reserved,
                activation=activation, activation_how=how, block_size=engine.block_size,
                bytes_per_token=bytes_per_token,
            )  # fmt: skip
            fix = "give the process more memory, raise piggyback.host_memory_utilization"
            if host is not None:
                fix += f", lower {host.explanation.split()[0]} (the host cache set aside first)"
            accelerator = cap_to_limits(accelerator, engine.max_num_seqs, max_model_len, "engine.max_num_seqs")
        else:
            accelerator = accelerator_kv_size(
                reading=reading, utilization=engine.gpu_memory_utilization, weights=resident_weights_bytes,
                activation=activation, activation_how=how, block_size=engine.block_size,
                bytes_per_token=bytes_per_token,
            )  # fmt: skip
            fix = "use a device with more memory, raise engine.gpu_memory_utilization"
        require_one_request(accelerator, max_model_len, "accelerator", f"{fix}, lower "
                            "engine.max_num_batched_tokens or model.max_model_len")  # fmt: skip

    if host is None:
        # On a CPU device both caches live in the same memory: the host cache gets a share of what is left.
        taken = accelerator.num_bytes if on_cpu else 0
        host = host_kv_size(reading=read_host(), utilization=pb.host_memory_utilization, taken_bytes=taken,
                            block_size=pb.host_block_size, bytes_per_token=bytes_per_token)  # fmt: skip
        if on_cpu:
            host = cap_to_limits(host, pb.max_be_requests, max_model_len, "piggyback.max_be_requests")
        if uses_host_kv:
            require_one_request(host, max_model_len, "host", "give the pod more memory (LLMService "
                                "spec.resources.hostMemory), raise piggyback.host_memory_utilization or lower "
                                "model.max_model_len")  # fmt: skip
    # The host cache exists for every policy (the planner's bookkeeping); one that is never used may be tiny.
    if host.num_blocks < 1:
        host = CacheSize(1, host.block_size, host.bytes_per_token, host.budget_bytes, host.explanation)
    return KVSizes(accelerator, host)


def require_fixed_caches_fit(
    config: RuntimeConfig,
    sizes: KVSizes,
    *,
    on_cpu: bool,
    host_kv_allocated: bool,
    read_device: Callable[[], MemoryReading],
    read_host: Callable[[], MemoryReading],
) -> None:
    """A cache whose size the config fixes must fit the memory it lives in, or it cannot be held: the host cache
    (`host_kv_allocated`: the policy has a host path, so it is allocated) in the host's memory (the pod's limit,
    else the machine's), and the accelerator cache in the device's (capped by engine.accelerator_memory_gib);
    on a CPU device both caches in the host's together. A cache sized from memory is a share of it already."""
    engine, pb = config.engine, config.piggyback
    host_field = ("piggyback.num_host_kv_blocks" if pb.num_host_kv_blocks is not None else
                  "piggyback.host_kv_memory_gib" if pb.host_kv_memory_gib is not None else None)  # fmt: skip
    device_field = ("engine.num_kv_blocks" if engine.num_kv_blocks is not None else
                    "engine.kv_cache_memory_gib" if engine.kv_cache_memory_gib is not None else None)  # fmt: skip
    in_host: list[tuple[str, int]] = []
    if host_field is not None and host_kv_allocated:
        in_host.append((host_field, sizes.host.num_bytes))
    if device_field is not None and on_cpu:
        in_host.append((device_field, sizes.accelerator.num_bytes))
    if in_host:
        reading = read_host()
        _require_within(in_host, reading, "the host's memory", "give the pod more memory (LLMService "
                        "spec.resources.hostMemory) or run on a machine with more")  # fmt: skip
    if device_field is not None and not on_cpu:
        reading = cap_total(read_device(), engine.accelerator_memory_gib)
        _require_within([(device_field, sizes.accelerator.num_bytes)], reading, "the accelerator's memory",
                        "use a device with more memory")


def _require_within(caches: list[tuple[str, int]], reading: MemoryReading, memory: str, more: str) -> None:
    wanted = sum(nbytes for _, nbytes in caches)
    if wanted <= reading.total_bytes:
        return
    asked = " plus ".join(f"{field} ({nbytes / GIB:.3g} GiB of KV)" for field, nbytes in caches)
    fields = " or ".join(field for field, _ in caches)
    raise KVSizingError(
        f"{asked} cannot be held: {wanted} B is more than {memory} ({reading.total_bytes} B, "
        f"{reading.total_bytes / GIB:.3g} GiB, from {reading.source}); lower {fields} so that the caches together "
        f"stay well below {reading.total_bytes / GIB:.3g} GiB (the weights, the CPU workers and the process need "
        f"memory too), or {more}"
    )
