"""The engine section the operator renders for a pool: the share of GPU memory, and the GPU's memory where the
pool is pinned to a product; host KV that fits the pod's memory limit. Every rendering validates as a
RuntimeConfig (render_runtime_config builds one) and survives the ConfigMap round trip."""

from __future__ import annotations

import pytest
import yaml

from piggyback_operator import pools
from piggyback_operator.api import LLMServiceSpec
from piggyback_operator.placement import GPU_MEMORY_LABEL, GPU_PRODUCT_LABEL, gpu_memory_bytes
from piggyback_operator.quantity import parse_quantity
from piggyback_runtime.config import RuntimeConfig

MIB, GIB = 2**20, 2**30


def member(name: str, cls: str = "LS", selector: dict[str, str] | None = None, **spec: object) -> pools.Member:
    body = {"class": cls, "model": {"uri": "pvc://weights/llama-8b"}, **spec}
    if selector is not None:
        body["placement"] = {"nodeSelector": selector}
    if cls == "LS":
        body.setdefault("slo", {"ttftMs": 200, "tpotMs": 40})
    return pools.Member(name, "ns", f"uid-{name}", LLMServiceSpec.model_validate(body), True, False, name)


def rendered(members: list[pools.Member]) -> RuntimeConfig:
    """The config as the runtime reads it: from the ConfigMap's YAML, through RuntimeConfig's validation."""
    configmap, _ = pools.render_children("p", "ns", members, replicas=1, scaled=0)
    return RuntimeConfig.from_dict(yaml.safe_load(configmap["data"][pools.CONFIG_KEY]), source="configmap")


@pytest.mark.parametrize(("labels", "expected_bytes"), [
    ({GPU_MEMORY_LABEL: "81559"}, 81559 * MIB),  # GPU feature discovery's own figure wins
    ({GPU_MEMORY_LABEL: "81559", GPU_PRODUCT_LABEL: "NVIDIA-L4"}, 81559 * MIB),
    ({GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3"}, 80e9),  # decimal GB: never above what the device reports
    ({GPU_PRODUCT_LABEL: "NVIDIA-A100-SXM4-40GB"}, 40e9),
    ({GPU_PRODUCT_LABEL: "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb"}, 20e9),  # a MIG slice: its profile, not the GPU
    ({GPU_PRODUCT_LABEL: "NVIDIA-L4"}, 23034 * MIB),  # no size in the name: the table
    ({GPU_PRODUCT_LABEL: "NVIDIA-H200"}, 143771 * MIB),
    ({GPU_PRODUCT_LABEL: "Some-Future-GPU"}, None),
    ({"accelerator": "h100"}, None),
    ({GPU_MEMORY_LABEL: "lots"}, None),
])  # fmt: skip
def test_gpu_memory_comes_from_feature_discovery_labels(labels, expected_bytes):
    assert gpu_memory_bytes(labels) == expected_bytes


def test_every_pool_renders_the_share_of_gpu_memory_the_runtime_fills():
    config = rendered([member("chat")])
    assert config.engine.gpu_memory_utilization == 0.9
    assert config.engine.accelerator_memory_gib is None  # not pinned: the runtime measures the GPU it lands on
    # No explicit cache size: the runtime sizes the accelerator cache from memory.
    assert config.engine.kv_cache_memory_gib is None and config.engine.num_kv_blocks is None


def test_a_pool_pinned_to_a_gpu_product_caps_the_runtimes_device_memory_at_that_products():
    config = rendered([member("chat", selector={GPU_PRODUCT_LABEL: "NVIDIA-L4"}), member("jobs", "BE")])
    assert config.engine.accelerator_memory_gib == pytest.approx(23034 / 1024)
    assert config.engine.accelerator_memory_gib * GIB <= 23034 * MIB
    config = rendered([member("chat", selector={GPU_MEMORY_LABEL: "81559", "pool": "h100"})])
    assert config.engine.accelerator_memory_gib == pytest.approx(81559 / 1024)


def test_host_kv_fits_within_the_pods_memory_limit():
    members = [member("chat"), member("jobs", "BE", resources={"hostMemory": "48Gi"}),
               member("more", "BE", resources={"hostMemory": "16Gi"})]  # fmt: skip
    config = rendered(members)
    _, deployment = pools.render_children("p", "ns", members, replicas=1, scaled=0)
    limit = parse_quantity(deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])
    assert config.piggyback.host_kv_memory_gib == 64
    # The process itself (weights staging, CPU workers, buffers) keeps its base allowance beside the cache.
    assert config.piggyback.host_kv_memory_gib * GIB + pools.BASE_MEMORY_BYTES == limit
    # No BE memory asked for: no size rendered, the runtime takes its share of what the pod's limit leaves.
    assert rendered([member("chat")]).piggyback.host_kv_memory_gib is None


def test_tensor_parallel_size_renders_the_ranks_and_requests_a_gpu_for_each():
    members = [member("chat", tensorParallelSize=4), member("jobs", "BE")]
    assert rendered(members).engine.tensor_parallel_size == 4
    _, deployment = pools.render_children("p", "ns", members, replicas=1, scaled=0)
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "runtime"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert rendered([member("chat")]).engine.tensor_parallel_size == 1  # the default: one GPU, no ranks


def test_a_tensor_parallel_size_a_presets_heads_do_not_divide_is_refused_naming_the_field():
    body = {"class": "BE", "model": {"uri": "synthetic://tiny-llama"}, "tensorParallelSize": 4}
    with pytest.raises(ValueError, match=r"spec\.tensorParallelSize=4 .*num_key_value_heads \(2\)"):
        LLMServiceSpec.model_validate(body)
    assert LLMServiceSpec.model_validate({**body, "tensorParallelSize": 2}).tensor_parallel_size == 2
    # A file:// or pvc:// model's heads are unknown to the operator: the runtime checks when it loads.
    assert LLMServiceSpec.model_validate({**body, "model": {"uri": "pvc://w/m"}}).tensor_parallel_size == 4
