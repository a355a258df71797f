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
