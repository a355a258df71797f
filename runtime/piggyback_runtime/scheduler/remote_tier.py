"""Remote DRAM as the hybrid rule's third tier: the planner's ledger of BE KV on remote CPU nodes.

Hybrid placement keeps a BE request's KV in HBM while HBM is spare; beyond it, the request decodes on the CPU
path, with its KV either in the GPU host's DRAM or in one remote node's. `RemoteTier` decides which (the tier on
which the row's layer pass is shortest with it added, `remote_capacity.tier_layer_s`: DRAM bandwidth per KV
held, and a node's per-layer round trip on its link) and holds each node's reservations: a request placed on a
node holds that node's KV at its full length (prompt + max_tokens) and no host KV. The nodes' capacities come
from whoever knows them: the runtime's remote pool (`RemoteCapacity`, refreshed every step: a node that died
takes its capacity out until a replacement registered) or the simulator's device (`device.remote`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from piggyback_runtime.remote_capacity import CPUTier, tier_layer_s


@dataclass(frozen=True)
class TierCosts:
    """The model's bytes that weigh DRAM bandwidth against the network: per KV token per layer (all heads),
    and one BE row's q/k/v out and attention output back per layer."""

    kv_bytes_per_token_per_layer: float
    qkv_bytes_per_row: float
    out_bytes_per_row: float


class RemoteTier:
    def __init__(self, host_bandwidth_b_s: float, nodes: Sequence[CPUTier], costs: TierCosts,
                 host_stages_remote_kv: bool = False) -> None:  # fmt: skip
        """`host_bandwidth_b_s`: the host's CPU attention bandwidth; `nodes`: the remote nodes now;
        `host_stages_remote_kv`: a remote row's KV passes through host KV on its way to the node (the runtime's
        remote pool ships it from the host staging cache), so placing it on a node needs host room for it too;
        the runtime frees that staging once shipped (the row keeps only its slot), and the placement here counts
        the host KV the staged rows still hold as theirs, not the host tier's."""
        if host_bandwidth_b_s <= 0:
            raise ValueError(f"host_bandwidth_b_s must be > 0, got {host_bandwidth_b_s}")
        self.host_bandwidth_b_s = host_bandwidth_b_s
        self.costs = costs
        self.host_stages_remote_kv = host_stages_remote_kv
        self.nodes: dict[int, CPUTier] = {}
        self.held: dict[str, tuple[int, int]] = {}  # request id -> (node index, KV tokens reserved)
        self.update_nodes(nodes)

    def update_nodes(self, nodes: Sequence[CPUTier]) -> None:
        """The nodes as they are now. One missing or with no capacity takes no new row (its rows keep their
        reservations until they end or are lost); one that comes back takes rows again."""
        for node in nodes:
            if node.index is None:
                raise ValueError("a remote node needs an index (None is the host)")
        self.nodes = {node.index: node for node in nodes if node.index is not None}

    # --- what nodes hold ------------------------------------------------------------------------------------
    def node_of(self, request_id: str) -> int | None:
        held = self.held.get(request_id)
        return held[0] if held is not None else None

    def tokens_held(self, index: int) -> int:
        return sum(tokens for node, tokens in self.held.values() if node == index)

    def rows_held(self, index: int) -> int:
        return sum(1 for node, _ in self.held.values() if node == index)

    def free_tokens(self, index: int) -> int:
        node = self.nodes.get(index)
        return 0 if node is None else max(0, node.kv_tokens - self.tokens_held(index))

    def release(self, request_id: str) -> int | None:
        """The request left its node (done, failed, lost with the node): its reservation is free. Its node."""
        held = self.held.pop(request_id, None)
        return held[0] if held is not None else None

    # --- placement ---------------------------------------------------------------------------------------------
    def layer_s(self, tier: CPUTier, rows: int, tokens: float) -> float:
        c = self.costs
        return tier_layer_s(tier, rows, tokens, c.kv_bytes_per_token_per_layer, c.qkv_bytes_per_row,
                            c.out_bytes_per_row)  # fmt: skip

    def choose(self, tokens: int, host_rows: int, host_tokens: int, host_fits: bool) -> int | None:
        """Where a row of `tokens` (full length) decodes fastest among the tiers that can hold it: None for the
        host (which holds `host_rows` rows of `host_tokens` KV, and can take it when `host_fits`), else a node's
        index. Raises LookupError when none can. Ties go to the host, then to the lower node index."""
        options: list[tuple[float, int, int | None]] = []
        if host_fits:
            host = CPUTier(None, 0, self.host_bandwidth_b_s)
            options.append((self.layer_s(host, host_rows + 1, host_tokens + tokens), -1, None))
        for index, node in sorted(self.nodes.items()):
            if self.free_tokens(index) >= tokens:
                cost = self.layer_s(node, self.rows_held(index) + 1, self.tokens_held(index) + tokens)
                options.append((cost, index, index))
        if not options:
            raise LookupError(f"no CPU tier can hold {tokens} more KV tokens")
        return min(options)[2]

    def reserve(self, request_id: str, index: int, tokens: int) -> None:
        if request_id in self.held:
            raise ValueError(f"{request_id} already holds KV on node {self.held[request_id][0]}")
        if self.free_tokens(index) < tokens:
            raise ValueError(f"node {index} has {self.free_tokens(index)} KV tokens free, not {tokens}")
        self.held[request_id] = (index, tokens)
