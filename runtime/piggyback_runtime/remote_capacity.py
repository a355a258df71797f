"""Remote CPU attention nodes as the planner and the simulator see them: one set of figures, one cost model.

Pure Python and low in the import graph: the runtime's remote pool (piggyback/remote/) reports live
`RemoteCapacity`, the simulator (sim/devices.py) builds its 1G4C model from `RemoteNodeFigures`, and the
planner may read either without importing the other. A network transfer costs the same everywhere:
`RemoteNodeFigures.network_s`.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 1 << 30
# Share of a node's DRAM that holds BE KV (the rest: OS, the worker process, buffers); the host tier uses the same.
KV_SHARE_OF_DRAM = 0.8


@dataclass(frozen=True)
class RemoteNodeFigures:
    """One CPU-only node: what it can hold, how fast its attention reads KV, and its link to the GPU node."""

    cores: int
    dram_bandwidth_gb_s: float  # all sockets, GB/s (1e9 B/s)
    dram_gib: float
    network_gb_s: float  # the node's link, per direction, GB/s (100 Gbit/s = 12.5 GB/s)
    network_latency_s: float = 10e-6  # one message, one way

    def network_s(self, num_bytes: float) -> float:
        """One message of `num_bytes` to or from this node: its link's latency plus its bandwidth."""
        if num_bytes <= 0:
            return 0.0
        return self.network_latency_s + num_bytes / (self.network_gb_s * GB)

    def kv_bytes(self) -> float:
        return self.dram_gib * GIB * KV_SHARE_OF_DRAM


# The paper's 1G4C CPU-only node: a DGX-A100-class host (2 x 204.8 GB/s DDR4-3200, 1 TiB) on a 100 Gbit/s link.
PAPER_CPU_NODE = RemoteNodeFigures(cores=128, dram_bandwidth_gb_s=409.6, dram_gib=1024, network_gb_s=12.5)


def bytes_per_be_token_per_layer(q_heads: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(sent, received) bytes of one BE row's decode step for one layer on the remote path: q, k, v out and
    the attention output back, float32 (what the CPU kernel reads and writes), frame headers not counted."""
    return 4 * head_dim * (q_heads + 2 * kv_heads), 4 * head_dim * q_heads


@dataclass(frozen=True)
class RemoteNodeCapacity:
    """One remote attention worker as the runtime sees it now."""

    index: int  # the worker's index in the pool
    ready: bool  # False while it is being (re)placed: it takes no new BE request
    kv_blocks: int  # of its KV cache, 0 until it answered
    kv_blocks_free: int
    rows: int  # BE requests it holds
    network_gb_s: float
    round_trip_p50_s: float | None  # measured per-layer round trip (None: nothing measured yet)


@dataclass(frozen=True)
class RemoteCapacity:
    """All remote workers: what the planner can place BE KV and rows on beyond the host tier."""

    workers: tuple[RemoteNodeCapacity, ...]

    @property
    def ready_workers(self) -> int:
        return sum(1 for w in self.workers if w.ready)

    @property
    def kv_blocks_free(self) -> int:
        return sum(w.kv_blocks_free for w in self.workers if w.ready)

    @property
    def rows(self) -> int:
        return sum(w.rows for w in self.workers)


# --- the BE tiers beyond HBM: one cost model for the planner, the simulator and the runtime --------------------
@dataclass(frozen=True)
class CPUTier:
    """Where a host-path BE row's KV can live beyond HBM: the GPU host's DRAM (`index` None) or one remote CPU
    node, as the planner's placement sees it: what it can hold and how fast its attention reads it."""

    index: int | None  # None: the GPU host; else the remote node's index (the runtime: its pool worker index)
    kv_tokens: int  # BE KV tokens it can hold in all (0 while a node is down: it takes no new row)
    attention_bandwidth_b_s: float  # KV bytes per second its CPU attention reads
    network: RemoteNodeFigures | None = None  # a node's link to the GPU node (None: the host, over PCIe)

    @property
    def remote(self) -> bool:
        return self.index is not None


def tier_layer_s(tier: CPUTier, rows: int, held_tokens: float, kv_bytes_per_token_per_layer: float,
                 qkv_bytes_per_row: float, out_bytes_per_row: float) -> float:  # fmt: skip
    """One pass of a tier's `rows` over one layer: every row's KV at that layer read once (`held_tokens` KV
    tokens over the tier's attention bandwidth), plus, on a node, that layer's round trip on its link (the
    rows' q/k/v out, their outputs back, one message each way, batched per node per layer as the runtime's
    stream sends them). A row on the tier advances about one layer per this time (never faster than the
    accelerator's passes): the planner puts a new row where this, with the row added, is least."""
    seconds = held_tokens * kv_bytes_per_token_per_layer / tier.attention_bandwidth_b_s
    if tier.network is not None and rows > 0:
        seconds += tier.network.network_s(rows * qkv_bytes_per_row) + tier.network.network_s(rows * out_bytes_per_row)
    return seconds


# One core's share of DRAM bandwidth that the CPU attention kernel reads KV at (an assumption: a 24-core host on
# 2 x 200 GB/s at the kernel's 80 %). The runtime knows the cores the host's workers and each remote worker run
# on, not their DRAM bandwidth: it weighs one against the other by cores.
ATTENTION_B_S_PER_CORE = 13e9


def node_tiers(capacity: RemoteCapacity, block_size: int, attention_b_s_per_worker: float) -> list[CPUTier]:
    """The runtime's remote workers as the planner's tiers: the ready ones, with their KV cache (blocks ×
    `block_size` tokens) and their link. A worker that is down or being replaced is left out: its capacity
    leaves the planner until the replacement has answered."""
    return [
        CPUTier(w.index, w.kv_blocks * block_size, attention_b_s_per_worker,
                RemoteNodeFigures(0, attention_b_s_per_worker / GB, 0.0, w.network_gb_s))
        for w in capacity.workers if w.ready
    ]  # fmt: skip
