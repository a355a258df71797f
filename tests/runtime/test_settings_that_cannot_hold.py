"""Placement and budget settings that cannot hold are refused before any request is accepted, each with an error
naming the field, its value, the bound and what to set (issue #25, "Bad input"): at load where the config alone
decides it, else where the engine first knows the figure it depends on (the KV cache's size, the memory)."""

from __future__ import annotations

from typing import Any

import pytest

from piggyback_runtime.config import ConfigError, ModelConfig, RuntimeConfig
from piggyback_runtime.engine import Engine
from piggyback_runtime.kv import sizing
from piggyback_runtime.kv.sizing import KVSizes, KVSizingError, MemoryReading, require_fixed_caches_fit, size_kv_caches
from piggyback_runtime.model import activation_peak
from piggyback_runtime.model.loader import LoadedModel, load_model
from tests.runtime.configs import runtime_config, runtime_config_dict

GIB = 2**30
BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 4  # tiny-llama in fp32: 2 layers x (K and V) x 2 kv heads x 32 dims x 4 bytes
MAX_MODEL_LEN = 2048


def refusal(**sections: Any) -> str:
    """The load error of the test config with `sections` merged over it."""
    with pytest.raises(ConfigError) as error:
        RuntimeConfig.from_dict(runtime_config_dict(**sections))
    return str(error.value)


# --- the token budget ---------------------------------------------------------------------------------------------
def test_a_token_budget_below_one_decode_batch_is_refused_naming_both_fields_and_the_bound():
    message = refusal(engine={"max_num_batched_tokens": 32})  # max_num_seqs stays at its default, 256
    for part in ("engine.max_num_batched_tokens (32) is below engine.max_num_seqs (256)",
                 "raise engine.max_num_batched_tokens to at least 256", "set engine.max_num_seqs to at most 32"):
        assert part in message, (part, message)
    # One decode token of every running sequence fits: the bound itself holds.
    assert runtime_config(engine={"max_num_batched_tokens": 32, "max_num_seqs": 32}).engine.max_num_seqs == 32


def test_a_budget_floor_above_the_budget_is_refused():
    message = refusal(engine={"max_num_batched_tokens": 64, "max_num_seqs": 64, "min_num_batched_tokens": 128})
    assert "engine.min_num_batched_tokens (128) exceeds engine.max_num_batched_tokens (64)" in message


# --- the HBM reserve of hybrid placement --------------------------------------------------------------------------
def test_an_hbm_reserve_not_below_a_fixed_kv_cache_is_refused_at_load():
    # 64 blocks of 4 tokens: 256 tokens of accelerator KV.
    cache = {"policy": "hybrid", "num_kv_blocks": 64, "block_size": 4}
    message = refusal(engine={**cache, "hbm_reserve_min_tokens": 256})
    for part in ("engine.hbm_reserve_min_tokens (256)", "64 blocks of 4 = 256 tokens",
                 "set engine.hbm_reserve_min_tokens below 256"):
        assert part in message, (part, message)
    runtime_config(engine={**cache, "hbm_reserve_min_tokens": 255})
    # Without hybrid placement nothing is reserved, so nothing can fail to hold.
    runtime_config(engine={**cache, "hbm_reserve_min_tokens": 256, "hybrid_placement": False})
    runtime_config(engine={**cache, "hbm_reserve_min_tokens": 256, "policy": "piggyback"})


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(ModelConfig(uri="synthetic://tiny-llama"), "cpu")


def memory(total: int) -> Any:
    """A memory reader (device or host) reporting `total` bytes, all of them available."""
    return lambda *_device: MemoryReading(total, total, "fake memory")


def test_an_hbm_reserve_not_below_a_kv_cache_sized_from_memory_is_refused_when_the_engine_starts(loaded, monkeypatch):
    # On a CPU device the cache takes the host share of 64 MiB, capped at 8 sequences x 2048 tokens = 16384 tokens:
    # known only once the engine has sized it, and refused there, before the engine can accept a request.
    monkeypatch.setattr(sizing, "read_device_memory", memory(64 * 2**20))
    monkeypatch.setattr(sizing, "read_host_memory", memory(64 * 2**20))
    monkeypatch.setattr(activation_peak, "measure_activation_bytes", lambda *_shape: (0, "fake profile"))
    config = runtime_config(engine={"policy": "hybrid", "block_size": 16, "max_num_batched_tokens": 64,
                                    "max_num_seqs": 8, "hbm_reserve_min_tokens": 16384})  # fmt: skip
    with pytest.raises(ConfigError, match=r"hbm_reserve_min_tokens \(16384\).*1024 blocks of 16 = 16384 tokens"):
        Engine(config, loaded=loaded)


# --- BE rows on the host path ---------------------------------------------------------------------------------------
def test_no_be_row_per_layer_is_refused_where_a_service_decodes_on_the_host_path():
    message = refusal(policy="piggyback", piggyback={"max_be_rows_per_layer": 0})
    for part in ("piggyback.max_be_rows_per_layer is 0", "policy 'piggyback'", "service 'batch'",
                 "set piggyback.max_be_rows_per_layer to at least 1"):
        assert part in message, (part, message)
    assert "piggyback.max_be_rows_per_layer is 0" in refusal(policy="hybrid", piggyback={"max_be_rows_per_layer": 0})
    # Where no request decodes on the host path, or the policy takes every decoding row anyway (neo), 0 holds.
    runtime_config(policy="priority", piggyback={"max_be_rows_per_layer": 0})
    runtime_config(policy="neo", piggyback={"max_be_rows_per_layer": 0})
    runtime_config(policy="piggyback", piggyback={"max_be_rows_per_layer": 0},
                   services=[{"name": "chat", "class": "LS", "slo": {"ttft_ms": 1000, "tpot_ms": 100}}])


def test_no_accelerator_kv_share_for_be_is_refused_under_a_headroom_policy():
    for policy in ("headroom", "headroom-admit"):
        message = refusal(policy=policy, engine={"headroom_be_kv_share": 0})
        for part in ("engine.headroom_be_kv_share is 0", f"policy {policy!r}", "service 'batch'",
                     "set engine.headroom_be_kv_share above 0"):
            assert part in message, (part, message)
    runtime_config(policy="headroom", engine={"headroom_be_kv_share": 0.01})
    runtime_config(policy="hybrid", engine={"headroom_be_kv_share": 0})  # a share only the headroom policies use


# --- fixed cache sizes against the memory they live in ------------------------------------------------------------
def fixed_sizes(config: RuntimeConfig, on_cpu: bool) -> KVSizes:
    """The caches' sizes (a cache the config leaves unsized takes a share of 1 TiB, and is not checked)."""
    return size_kv_caches(config, bytes_per_token=BYTES_PER_TOKEN, max_model_len=MAX_MODEL_LEN,
                          resident_weights_bytes=0, on_cpu=on_cpu, uses_host_kv=True, read_device=memory(2**40),
                          read_host=memory(2**40), measure_activation=lambda *_shape: (0, "fake profile"))  # fmt: skip


def check(config: RuntimeConfig, *, on_cpu: bool, device_bytes: int = 80 * GIB, host_bytes: int = 64 * GIB) -> None:
    require_fixed_caches_fit(config, fixed_sizes(config, on_cpu), on_cpu=on_cpu, host_kv_allocated=True,
                             read_device=memory(device_bytes), read_host=memory(host_bytes))  # fmt: skip


def test_a_host_kv_cache_larger_than_the_hosts_memory_is_refused_naming_the_field():
    with pytest.raises(KVSizingError) as error:
        check(runtime_config(policy="piggyback", piggyback={"host_kv_memory_gib": 100}), on_cpu=False)
    message = str(error.value)
    for part in ("piggyback.host_kv_memory_gib (100 GiB of KV) cannot be held", "the host's memory",
                 f"{64 * GIB} B, 64 GiB, from fake memory", "lower piggyback.host_kv_memory_gib", "hostMemory"):
        assert part in message, (part, message)
    check(runtime_config(policy="piggyback", piggyback={"host_kv_memory_gib": 32}), on_cpu=False)
    # A block count is held to the same bound: 2**20 blocks of 64 tokens x 1 KiB a token = 64 GiB, then one more.
    with pytest.raises(KVSizingError, match=r"piggyback\.num_host_kv_blocks"):
        check(runtime_config(policy="piggyback", piggyback={"num_host_kv_blocks": 2**20 + 1}), on_cpu=False)
    check(runtime_config(policy="piggyback", piggyback={"num_host_kv_blocks": 2**20}), on_cpu=False)


def test_on_a_cpu_device_both_fixed_caches_together_must_fit_the_hosts_memory():
    config = runtime_config(policy="piggyback", engine={"kv_cache_memory_gib": 40},
                            piggyback={"host_kv_memory_gib": 40})  # fmt: skip
    with pytest.raises(KVSizingError, match=r"piggyback\.host_kv_memory_gib .* plus engine\.kv_cache_memory_gib"):
        check(config, on_cpu=True)
    check(config, on_cpu=False)  # on a GPU the accelerator cache is in the device's 80 GiB


def test_an_accelerator_kv_cache_larger_than_the_device_is_refused_naming_the_field():
    with pytest.raises(KVSizingError, match=r"engine\.kv_cache_memory_gib \(100 GiB of KV\).*accelerator's memory"):
        check(runtime_config(engine={"kv_cache_memory_gib": 100}), on_cpu=False)
    # engine.accelerator_memory_gib (the product the operator pins) caps the device.
    with pytest.raises(KVSizingError, match=r"engine\.kv_cache_memory_gib .*engine\.accelerator_memory_gib 24"):
        check(runtime_config(engine={"kv_cache_memory_gib": 30, "accelerator_memory_gib": 24}), on_cpu=False)
    check(runtime_config(engine={"kv_cache_memory_gib": 30}), on_cpu=False)


def test_the_engine_refuses_a_host_kv_cache_the_host_cannot_hold_before_it_starts(loaded, monkeypatch):
    monkeypatch.setattr(sizing, "read_host_memory", memory(64 * 2**20))
    config = runtime_config(policy="piggyback", engine={"num_kv_blocks": 256}, piggyback={"host_kv_memory_gib": 1})
    # A CPU device's own cache is in the host's memory too: both are named.
    with pytest.raises(KVSizingError, match=r"host_kv_memory_gib \(1 GiB of KV\) plus engine\.num_kv_blocks"):
        Engine(config, loaded=loaded)
    # On a CPU device an accelerator cache sized from memory comes first, from what the host cache leaves.
    config = runtime_config(policy="piggyback", piggyback={"host_kv_memory_gib": 1})
    with pytest.raises(KVSizingError, match=r"accelerator KV cache too small.*lower piggyback\.host_kv_memory_gib"):
        Engine(config, loaded=loaded)
