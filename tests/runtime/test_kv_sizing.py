"""KV caches sized from memory: the arithmetic with fake memory readers, cgroup and meminfo parsing, the start-up
error, and the engine built from it (which passes the model's figures and the policy's host path to the sizing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from piggyback_runtime.config import ModelConfig, RuntimeConfig
from piggyback_runtime.engine import Engine
from piggyback_runtime.kv import sizing
from piggyback_runtime.kv.sizing import KVSizes, KVSizingError, MemoryReading, size_kv_caches
from piggyback_runtime.model import activation_peak
from piggyback_runtime.model.loader import LoadedModel, load_model
from tests.runtime.configs import runtime_config

GIB = 2**30
# tiny-llama in fp32 on the CPU: 2 layers x (K and V) x 2 kv heads x 32 dims x 4 bytes.
BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 4
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    model = load_model(ModelConfig(uri="synthetic://tiny-llama"), "cpu")
    assert model.arch.kv_bytes_per_token(4) == BYTES_PER_TOKEN and model.max_model_len == MAX_MODEL_LEN
    return model


def size(cfg: RuntimeConfig, read_device: Any, read_host: Any, measure_activation: Any, *, on_cpu: bool = False,
         uses_host_kv: bool = True) -> KVSizes:  # fmt: skip
    """tiny-llama's figures (fp32) on a CUDA device (on_cpu=False; the memory readers are faked) or on the CPU."""
    return size_kv_caches(cfg, bytes_per_token=BYTES_PER_TOKEN, max_model_len=MAX_MODEL_LEN,
                          resident_weights_bytes=3 * 2**20, on_cpu=on_cpu, uses_host_kv=uses_host_kv,
                          read_device=read_device, read_host=read_host,
                          measure_activation=measure_activation)  # fmt: skip


def config(policy: str = "piggyback", engine: dict[str, Any] | None = None,
           piggyback: dict[str, Any] | None = None) -> RuntimeConfig:  # fmt: skip
    """No cache size set anywhere: both caches come from memory."""
    return runtime_config(
        services=[{"name": "chat", "class": "LS", "slo": {"ttft_ms": 1000, "tpot_ms": 100}},
                  {"name": "batch", "class": "BE"}],
        engine={"block_size": 16, "max_num_batched_tokens": 64, "max_num_seqs": 8, "policy": policy, **(engine or {})},
        piggyback={"host_block_size": 64, "max_be_requests": 4, "num_cpu_workers": 1, **(piggyback or {})},
    )  # fmt: skip


def device(total: int, available: int) -> Any:
    """A device reader (the engine's takes the torch device; the sizing's none)."""
    return lambda *_device: MemoryReading(total, available, "fake-gpu mem_get_info")


def host(total: int, available: int) -> Any:
    return lambda: MemoryReading(total, available, "fake pod limit")


def activation(nbytes: int) -> Any:
    """An activation reader (the engine's takes the loaded model first; the sizing's only the shape)."""
    return lambda *_shape: (nbytes, "fake profile")


def never(*_: Any) -> Any:
    raise AssertionError("an explicit size was set: memory must not be read")


# --- the arithmetic ---------------------------------------------------------------------------------------------
def test_accelerator_cache_is_the_utilization_share_minus_what_is_in_use_and_the_activation_peak():
    sizes = size(config(), device(80 * GIB, 64 * GIB), host(512 * GIB, 500 * GIB), activation(2 * GIB))
    budget = int(0.9 * 80 * GIB) - 16 * GIB - 2 * GIB  # 72 GiB share, 16 GiB in use (weights, context), activations
    assert sizes.accelerator.num_blocks == budget // (16 * BYTES_PER_TOKEN)
    assert sizes.accelerator.budget_bytes == budget
    # The host cache is not on the accelerator: its share is of the host's own available memory.
    assert sizes.host.num_blocks == int(0.5 * 500 * GIB) // (64 * BYTES_PER_TOKEN)


def test_utilization_and_host_share_come_from_the_config():
    cfg = config(engine={"gpu_memory_utilization": 0.5}, piggyback={"host_memory_utilization": 0.25})
    sizes = size(cfg, device(80 * GIB, 80 * GIB), host(100 * GIB, 100 * GIB), activation(0))
    assert sizes.accelerator.budget_bytes == 40 * GIB
    assert sizes.host.budget_bytes == 25 * GIB


def test_accelerator_memory_gib_caps_the_device():
    # The operator pins a 24 GiB product; the device (here) reports more: the cap binds, usage stays counted.
    cfg = config(engine={"accelerator_memory_gib": 24})
    sizes = size(cfg, device(80 * GIB, 76 * GIB), host(8 * GIB, 8 * GIB), activation(GIB))
    assert sizes.accelerator.budget_bytes == int(0.9 * 24 * GIB) - 4 * GIB - GIB
    assert "engine.accelerator_memory_gib 24" in sizes.accelerator.explanation


# Limits far above what the memory holds: the memory share binds (a budget below max_num_seqs is refused).
UNCAPPED = {"max_num_seqs": 65536, "max_num_batched_tokens": 65536}
UNCAPPED_HOST = {"max_be_requests": 65536}


def test_on_a_cpu_device_both_caches_take_host_shares_of_the_same_memory():
    # The CPU device's cache is host memory: the host share (0.5) of what is available, less activations...
    sizes = size(config(engine=UNCAPPED, piggyback=UNCAPPED_HOST), device(10 * GIB, 8 * GIB), host(10 * GIB, 8 * GIB),
                 activation(GIB), on_cpu=True)  # fmt: skip
    assert sizes.accelerator.budget_bytes == 4 * GIB - GIB
    # ...and the host cache the host share of what that left.
    accelerator_bytes = sizes.accelerator.num_blocks * 16 * BYTES_PER_TOKEN
    assert sizes.host.budget_bytes == int(0.5 * (8 * GIB - accelerator_bytes))
    # A host cache of fixed size is set aside first (a pod's limit is the operator's host KV plus a base).
    sizes = size(config(engine=UNCAPPED, piggyback={"host_kv_memory_gib": 2}), device(6 * GIB, 5 * GIB), never,
                 activation(0), on_cpu=True)  # fmt: skip
    assert sizes.accelerator.budget_bytes == int(0.5 * (5 * GIB - 2 * GIB))
    assert sizes.accelerator.budget_bytes + sizes.host.budget_bytes < 5 * GIB


def test_on_a_cpu_device_a_cache_the_limits_cannot_fill_is_sized_to_the_limits():
    # 8 LS sequences x 2048 tokens = 1024 blocks of 16 (16 MiB), 4 BE requests x 2048 tokens = 128 blocks of 64
    # (8 MiB): far below the host shares of 8 GiB available. The explanation says which bound won.
    sizes = size(config(), device(10 * GIB, 8 * GIB), host(10 * GIB, 8 * GIB), activation(GIB), on_cpu=True)
    assert sizes.accelerator.num_blocks == 8 * MAX_MODEL_LEN // 16
    assert sizes.accelerator.budget_bytes == 8 * MAX_MODEL_LEN * BYTES_PER_TOKEN
    assert "sized to the limits: engine.max_num_seqs 8 x max_model_len 2048" in sizes.accelerator.explanation
    assert sizes.host.num_blocks == 4 * MAX_MODEL_LEN // 64
    assert "sized to the limits: piggyback.max_be_requests 4" in sizes.host.explanation
    # On a GPU the device's memory is the runtime's: the share is taken whatever the limits (as vLLM does).
    sizes = size(config(), device(80 * GIB, 64 * GIB), host(512 * GIB, 500 * GIB), activation(GIB))
    assert sizes.accelerator.num_blocks > 8 * MAX_MODEL_LEN // 16 and "limits" not in sizes.accelerator.explanation
    # A limit above the memory share leaves the memory share.
    sizes = size(config(engine=UNCAPPED), device(GIB, GIB // 2), host(GIB, GIB // 2), activation(0), on_cpu=True)
    assert sizes.accelerator.budget_bytes == GIB // 4 and "limits" not in sizes.accelerator.explanation


def test_free_memory_is_read_after_the_profile_forward_has_run_and_emptied_the_cache():
    # vLLM's order: load, profile the largest iteration (which empties the allocator's cache when done), then
    # read free memory; read before, the profile's cached blocks would count as "in use".
    calls: list[str] = []

    def read_device() -> MemoryReading:
        calls.append("read free memory")
        return MemoryReading(80 * GIB, 64 * GIB, "fake")

    def measure(*_shape: int) -> tuple[int, str]:
        calls.append("profile forward")
        return GIB, "fake profile"

    size(config(), read_device, host(512 * GIB, 500 * GIB), measure)
    assert calls == ["profile forward", "read free memory"]


def test_explicit_sizes_override_memory_and_read_nothing():
    cfg = config(engine={"kv_cache_memory_gib": 0.5}, piggyback={"host_kv_memory_gib": 0.25})
    sizes = size(cfg, never, never, never, on_cpu=True)
    assert sizes.accelerator.num_blocks == GIB // 2 // (16 * BYTES_PER_TOKEN)
    assert sizes.host.num_blocks == GIB // 4 // (64 * BYTES_PER_TOKEN)
    cfg = config(engine={"num_kv_blocks": 7, "kv_cache_memory_gib": 0.5}, piggyback={"num_host_kv_blocks": 3})
    sizes = size(cfg, never, never, never, on_cpu=True)
    assert (sizes.accelerator.num_blocks, sizes.host.num_blocks) == (7, 3)


# --- the start-up error -----------------------------------------------------------------------------------------
def test_too_little_device_memory_for_one_request_names_the_numbers():
    # One request of 2048 tokens needs 2048 x 1024 B = 2 MiB; 0.9 x 5 MiB - 2 MiB in use - 1 MiB peak leaves 1.5.
    total, in_use, peak = 5 * 2**20, 2 * 2**20, 2**20
    budget = int(0.9 * total) - in_use - peak
    assert budget < MAX_MODEL_LEN * BYTES_PER_TOKEN
    with pytest.raises(KVSizingError) as error:
        size(config(), device(total, total - in_use), host(GIB, GIB), activation(peak))
    message = str(error.value)
    for figure in (f"{BYTES_PER_TOKEN} bytes per token", f"x {MAX_MODEL_LEN} tokens",
                   f"{MAX_MODEL_LEN * BYTES_PER_TOKEN} bytes", f"{budget} bytes are available",
                   "fake-gpu mem_get_info", f"activation peak {peak} B", "max_model_len 2048",
                   "gpu_memory_utilization"):  # fmt: skip
        assert figure in message, (figure, message)


def test_too_little_host_memory_fails_only_where_a_service_takes_the_host_path():
    small_host = host(GIB, 2**20)  # half of 1 MiB available: far from one 2048-token request
    with pytest.raises(KVSizingError, match=r"host KV cache too small.*fake pod limit.*hostMemory"):
        size(config(), device(GIB, GIB), small_host, activation(0), on_cpu=True, uses_host_kv=True)
    sizes = size(config(), device(GIB, GIB), small_host, activation(0), on_cpu=True, uses_host_kv=False)
    assert sizes.host.num_blocks >= 1  # kept for the planner's bookkeeping, never used


def test_an_explicit_byte_size_too_small_is_an_error_too():
    with pytest.raises(KVSizingError, match=r"engine.kv_cache_memory_gib 0.001.*raise engine.kv_cache_memory_gib"):
        size(config(engine={"kv_cache_memory_gib": 0.001}), never, never, never, on_cpu=True)


def test_the_engine_sizes_its_caches_from_memory_and_refuses_to_start_without_room(loaded, monkeypatch):
    monkeypatch.setattr(sizing, "read_device_memory", device(64 * 2**20, 64 * 2**20))
    monkeypatch.setattr(sizing, "read_host_memory", host(64 * 2**20, 64 * 2**20))
    monkeypatch.setattr(activation_peak, "measure_activation_bytes", activation(0))
    engine = Engine(config("priority", engine=UNCAPPED), loaded=loaded)
    try:
        assert engine.allocator.num_blocks == int(0.5 * 64 * 2**20) // (16 * BYTES_PER_TOKEN)
    finally:
        engine.close()
    monkeypatch.setattr(sizing, "read_device_memory", device(3 * 2**20, 3 * 2**20))  # 1.5 MiB < 2 MiB needed
    with pytest.raises(KVSizingError, match=r"accelerator KV cache too small.*host_memory_utilization 0.5"):
        Engine(config("priority"), loaded=loaded)


def test_the_engine_asks_for_a_host_cache_that_holds_a_request_only_under_a_policy_with_a_host_path(
    loaded, monkeypatch
):
    monkeypatch.setattr(sizing, "read_device_memory", device(64 * 2**20, 64 * 2**20))
    monkeypatch.setattr(sizing, "read_host_memory", host(GIB, 2**20))  # far from one 2048-token request
    monkeypatch.setattr(activation_peak, "measure_activation_bytes", activation(0))
    with pytest.raises(KVSizingError, match=r"host KV cache too small"):
        Engine(config("piggyback"), loaded=loaded)  # BE attention on the host: it needs host KV
    engine = Engine(config("priority"), loaded=loaded)  # GPU-only: the host cache is bookkeeping
    engine.close()


# --- the readings -----------------------------------------------------------------------------------------------
def test_cgroup_limits_parse_and_unlimited_is_none():
    assert sizing.parse_cgroup_limit("max\n") is None
    assert sizing.parse_cgroup_limit("8589934592\n") == 8 * GIB
    assert sizing.parse_cgroup_limit("9223372036854771712") is None  # cgroup v1's "no limit"
    with pytest.raises(ValueError, match="neither 'max' nor a byte count"):
        sizing.parse_cgroup_limit("lots")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


MEMINFO = "MemTotal:       67108864 kB\nMemFree:         1000000 kB\nMemAvailable:   62914560 kB\n"  # 64 GiB, 60 GiB


def test_cgroup_v2_limit_minus_the_working_set_is_what_is_available(tmp_path):
    write(tmp_path / "meminfo", MEMINFO)
    write(tmp_path / "cg" / "memory.max", f"{8 * GIB}\n")
    write(tmp_path / "cg" / "memory.current", f"{3 * GIB}\n")
    write(tmp_path / "cg" / "memory.stat", f"anon {2 * GIB}\nfile {GIB}\ninactive_file {GIB}\n")
    reading = sizing.read_host_memory(tmp_path / "cg", tmp_path / "meminfo")
    assert (reading.total_bytes, reading.available_bytes) == (8 * GIB, 6 * GIB)  # reclaimable page cache is free
    assert "memory.max" in reading.source


def test_cgroup_v1_limit_is_read_from_the_memory_controller(tmp_path):
    write(tmp_path / "meminfo", MEMINFO)
    write(tmp_path / "cg" / "memory" / "memory.limit_in_bytes", f"{16 * GIB}\n")
    write(tmp_path / "cg" / "memory" / "memory.usage_in_bytes", f"{4 * GIB}\n")
    write(tmp_path / "cg" / "memory" / "memory.stat", f"total_inactive_file {GIB}\n")
    reading = sizing.read_host_memory(tmp_path / "cg", tmp_path / "meminfo")
    assert (reading.total_bytes, reading.available_bytes) == (16 * GIB, 13 * GIB)
    assert "memory.limit_in_bytes" in reading.source


@pytest.mark.parametrize("limit", ["max", str(128 * GIB), None])
def test_without_a_binding_limit_the_machine_figures_count(tmp_path, limit):
    write(tmp_path / "meminfo", MEMINFO)
    if limit is not None:
        write(tmp_path / "cg" / "memory.max", limit)
        write(tmp_path / "cg" / "memory.current", str(GIB))
    reading = sizing.read_host_memory(tmp_path / "cg", tmp_path / "meminfo")
    assert (reading.total_bytes, reading.available_bytes) == (64 * GIB, 60 * GIB)
    assert "MemAvailable" in reading.source


def test_this_machine_can_be_read():
    reading = sizing.read_device_memory(torch.device("cpu"))
    assert 0 < reading.available_bytes <= reading.total_bytes and "host memory (CPU device)" in reading.source


# --- the activation peak ----------------------------------------------------------------------------------------
def test_the_largest_iteration_runs_and_its_estimate_grows_with_the_shape(loaded):
    activation_peak._largest_iteration(loaded, 64, 8)  # the profile CUDA runs for its peak: shapes and GQA must hold
    small = activation_peak.estimate_activation_bytes(loaded, 64, 8)
    assert activation_peak.estimate_activation_bytes(loaded, 128, 8) > small
    assert activation_peak.estimate_activation_bytes(loaded, 64, 16) - small == 2 * 8 * loaded.arch.vocab_size * 4
    assert activation_peak.measure_activation_bytes(loaded, 64, 8) == (small, "estimated from the shapes (CPU)")
