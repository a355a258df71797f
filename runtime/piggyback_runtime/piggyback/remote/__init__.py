"""Remote CPU attention nodes on Ray: BE KV in CPU-only machines' DRAM, attention on their cores (issue #28).

wire.py: the per-layer stream's frames; node.py: the node's KV and attention server; actor.py: Ray placement
and lifecycle; pool.py: the engine side, behind the local pool's interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from piggyback_runtime import metrics as m
    from piggyback_runtime.config import RemoteNodesConfig
    from piggyback_runtime.model.arch import ModelArch
    from piggyback_runtime.piggyback.pool import CPUAttentionPool
    from piggyback_runtime.piggyback.remote.pool import HybridAttentionPool, Placement
    from piggyback_runtime.piggyback.worker import SharedBuffers


def model_layout(arch: ModelArch, dtype: torch.dtype, block_size: int, threads: int) -> dict[str, Any]:
    """The hello frame's model fields: what a node needs to lay out its KV cache and run the kernel."""
    return {
        "layers": arch.num_hidden_layers, "kv_heads": arch.num_key_value_heads, "q_heads": arch.num_attention_heads,
        "head_dim": arch.head_dim, "block_size": block_size, "dtype": str(dtype).removeprefix("torch."),
        "scale": 1.0 / arch.head_dim**0.5, "threads": threads,
    }  # fmt: skip


def hybrid_pool(
    local: CPUAttentionPool, buffers: SharedBuffers, config: RemoteNodesConfig, arch: ModelArch,
    dtype: torch.dtype,
    threads: int, metrics: m.RuntimeMetrics, placement: Placement | None = None,
) -> HybridAttentionPool:  # fmt: skip
    """The local pool plus `config.num_nodes × workers_per_node` remote workers placed by Ray."""
    from piggyback_runtime.piggyback.remote.actor import RayPlacement
    from piggyback_runtime.piggyback.remote.pool import HybridAttentionPool

    threads_per_worker = max(1, int(config.cpus_per_worker))
    layout = model_layout(arch, buffers.key_cache.dtype, buffers.key_cache.shape[2], threads_per_worker)
    return HybridAttentionPool(local, buffers, config, placement or RayPlacement(config), layout, metrics)
