"""Remote DRAM as the hybrid rule's third tier (issue #28): a BE request that leaves HBM goes to the host or to a
remote node, wherever its row decodes fastest by the one cost model (`remote_capacity.tier_layer_s`); a row on
a node holds that node's KV and no host KV; a node that leaves takes its capacity out of the planner until a
replacement registers. Deterministic: the planner on a virtual clock (planner_fakes), no engine."""

from __future__ import annotations

import pytest

from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.remote_capacity import (
    CPUTier,
    RemoteCapacity,
    RemoteNodeCapacity,
    RemoteNodeFigures,
    node_tiers,
)
from piggyback_runtime.request import Request
from piggyback_runtime.scheduler.planner import Planner
from piggyback_runtime.scheduler.remote_tier import RemoteTier, TierCosts
from tests.runtime.planner_fakes import Clock, staircase_model
from tests.runtime.test_hybrid_planner import _add, _config, _ran, _request

LINK = RemoteNodeFigures(cores=4, dram_bandwidth_gb_s=100, dram_gib=1, network_gb_s=12.5)  # 100 Gbit/s
SLOW_LINK = RemoteNodeFigures(cores=4, dram_bandwidth_gb_s=100, dram_gib=1, network_gb_s=1e-5)  # 80 kbit/s
# 1 MB of KV per token per layer: a 120-token row's layer reads 120 MB, 1.2 ms at 100 GB/s, where a 100 Gbit/s
# link's round trip for its 6 KB of q/k/v and output is ~20 µs.
COSTS = TierCosts(kv_bytes_per_token_per_layer=1e6, qkv_bytes_per_row=4e3, out_bytes_per_row=2e3)
ROW_TOKENS = 120  # each request below: 60 prompt + 60 output tokens


def _tier(*nodes: CPUTier, host_b_s: float = 1e11) -> RemoteTier:
    return RemoteTier(host_b_s, list(nodes), COSTS)


def _planner(tier: RemoteTier, host_blocks: int = 16) -> tuple[Planner, Clock, HostKV]:
    """HBM of 64 blocks of 4 tokens (one 120-token request decodes there at most); host KV of `host_blocks`
    blocks of 16 tokens (16: two requests at full length)."""
    clock = Clock()
    host = HostKV(num_blocks=host_blocks, block_size=16, max_requests=8)
    planner = Planner(_config(), 64, host, staircase_model(), clock, kv_moves=True, remote_tier=tier)
    return planner, clock, host


def _run_until_placed(planner: Planner, clock: Clock, requests: list[Request]) -> list[str]:
    """Iterate until every request has left HBM or decodes there; the order they left HBM in."""
    left: list[str] = []
    for _ in range(200):
        plan = planner.schedule()
        left += [r.request_id for r in plan.be_to_host]
        _ran(planner, clock, plan)
        if all(r.output_token_ids for r in requests) and not planner._to_host_next:
            return left
    raise AssertionError("the requests never all left prefill")


def _where(planner: Planner, host: HostKV, request: Request) -> str:
    tier = planner.remote_tier
    assert tier is not None
    node = tier.node_of(request.request_id)
    on_host = request.request_id in host.slot_of
    assert not (node is not None and on_host), f"{request.request_id} holds KV on a node and on the host"
    if request.placement == "gpu":
        return "hbm"
    return "host" if on_host else f"node{node}"


def test_rows_that_leave_hbm_go_where_they_decode_fastest_and_a_node_row_holds_no_host_kv() -> None:
    # Host and nodes read KV equally fast: the host takes the first row (no link to cross), and then each row
    # goes to the tier with the least KV to read per layer pass: the nodes, then the nodes again in turn.
    tier = _tier(CPUTier(0, 2 * ROW_TOKENS, 1e11, LINK), CPUTier(1, 2 * ROW_TOKENS, 1e11, LINK))
    planner, clock, host = _planner(tier)
    requests = [_request(f"b{i}", 60, float(i), max_tokens=60) for i in range(6)]
    _add(planner, *requests)
    left = _run_until_placed(planner, clock, requests)
    where = {r.request_id: _where(planner, host, r) for r in requests}
    assert [where[rid] for rid in left] == ["host", "node0", "node1", "node0", "node1"]
    assert list(where.values()).count("hbm") == 1
    # Host KV holds exactly its one row; each node two rows at full length.
    assert list(host.slot_of) == [left[0]]
    assert tier.tokens_held(0) == tier.tokens_held(1) == 2 * ROW_TOKENS
    assert tier.free_tokens(0) == tier.free_tokens(1) == 0


def test_a_node_with_more_bandwidth_takes_a_row_before_the_host_and_a_slow_link_loses_to_it() -> None:
    fast = _tier(CPUTier(0, 4 * ROW_TOKENS, 4e11, LINK))  # 4x the host's bandwidth
    assert fast.choose(ROW_TOKENS, host_rows=0, host_tokens=0, host_fits=True) == 0
    # Same bandwidth as the host behind an 80 kbit/s link: 0.6 s a layer's round trip for one row's 6 KB. The
    # host wins while its layer pass is shorter (51 rows: 6120 tokens of 1 MB a layer at 100 GB/s, 61 ms), the
    # node once the host's is longer (1001 rows: 1.2 s).
    slow = _tier(CPUTier(0, 100 * ROW_TOKENS, 1e11, SLOW_LINK))
    assert slow.choose(ROW_TOKENS, host_rows=50, host_tokens=50 * ROW_TOKENS, host_fits=True) is None
    assert slow.choose(ROW_TOKENS, host_rows=1000, host_tokens=1000 * ROW_TOKENS, host_fits=True) == 0
    # A host that cannot hold the row leaves the node, however slow.
    assert slow.choose(ROW_TOKENS, host_rows=0, host_tokens=0, host_fits=False) == 0


def test_a_row_that_no_tier_can_hold_stays_in_hbm() -> None:
    tier = _tier(CPUTier(0, ROW_TOKENS - 1, 1e11, LINK))  # a node too small for one row
    planner, clock, host = _planner(tier, host_blocks=4)  # 64 host tokens: too small too
    requests = [_request(f"b{i}", 60, float(i), max_tokens=60) for i in range(2)]
    _add(planner, *requests)
    _run_until_placed(planner, clock, requests)
    assert [r.placement for r in requests] == ["gpu", "gpu"] and not host.slot_of and not tier.held
    with pytest.raises(LookupError, match="no CPU tier"):
        tier.choose(ROW_TOKENS, host_rows=0, host_tokens=0, host_fits=False)


def test_a_finished_row_frees_its_node_and_a_node_row_never_moves_back_to_hbm() -> None:
    tier = _tier(CPUTier(0, 4 * ROW_TOKENS, 4e11, LINK))  # the node is faster: rows go there first
    planner, clock, host = _planner(tier)
    requests = [_request(f"b{i}", 60, float(i), max_tokens=60) for i in range(3)]
    _add(planner, *requests)
    _run_until_placed(planner, clock, requests)
    on_node = [r for r in requests if tier.node_of(r.request_id) == 0]
    in_hbm = [r for r in requests if r.placement == "gpu"]
    assert on_node and in_hbm and not host.slot_of
    for request in in_hbm:  # HBM frees up
        planner.finish(request, "stop")
    plan = planner.schedule(host_rows_idle=on_node)
    assert plan.be_to_gpu == []  # their KV is on the node, not on this host: they decode there to the end
    done = on_node[0]
    planner.finish(done, "stop")
    assert tier.node_of(done.request_id) is None and tier.tokens_held(0) == ROW_TOKENS * (len(on_node) - 1)


def test_a_lost_node_takes_its_capacity_out_until_a_replacement_registers() -> None:
    # The runtime's pool reports workers 2 and 3 (after two local ones); worker 3 died and is being replaced.
    def pool(worker_3_ready: bool) -> RemoteCapacity:
        return RemoteCapacity((RemoteNodeCapacity(2, True, 30, 30, 0, 12.5, None),
                               RemoteNodeCapacity(3, worker_3_ready, 30, 30, 0, 12.5, None)))  # fmt: skip

    tier = _tier()
    tier.update_nodes(node_tiers(pool(worker_3_ready=False), block_size=16, attention_b_s_per_worker=4e11))
    assert sorted(tier.nodes) == [2] and tier.nodes[2].kv_tokens == 30 * 16
    tier.reserve("b0", 2, 4 * ROW_TOKENS)  # worker 2 is full now
    with pytest.raises(LookupError):  # the host cannot take it either: nowhere
        tier.choose(ROW_TOKENS, host_rows=0, host_tokens=0, host_fits=False)
    tier.update_nodes(node_tiers(pool(worker_3_ready=True), block_size=16, attention_b_s_per_worker=4e11))
    assert tier.choose(ROW_TOKENS, host_rows=0, host_tokens=0, host_fits=False) == 3  # the replacement answered
    assert tier.node_of("b0") == 2  # a live node's rows keep their place throughout


def test_a_row_lost_with_its_node_gives_its_reservation_back_for_the_next_placement() -> None:
    tier = _tier(CPUTier(0, 2 * ROW_TOKENS, 4e11, LINK), CPUTier(1, 2 * ROW_TOKENS, 1e11, LINK))
    planner, clock, _host = _planner(tier)
    requests = [_request(f"b{i}", 60, float(i), max_tokens=60) for i in range(2)]
    _add(planner, *requests)
    _run_until_placed(planner, clock, requests)
    lost = next(r for r in requests if tier.node_of(r.request_id) == 0)
    tier.update_nodes([CPUTier(1, 2 * ROW_TOKENS, 1e11, LINK)])  # node 0 died
    planner.release_remote_kv(lost)  # the engine sends it back to prefill (retry_on_worker_loss)
    assert tier.node_of(lost.request_id) is None and tier.held == {}


def test_a_node_row_staged_on_the_host_gives_its_host_kv_back_once_shipped_so_nodes_add_capacity() -> None:
    # The runtime's tier: a node row's KV passes through host KV (host_stages_remote_kv), so placing it needs
    # host room for the staging. The host holds two rows at full length: two node rows fill it, and a third row
    # has nowhere to go until the CPU path frees the first two's staging (shipped to the node: slot kept,
    # blocks freed); then the node takes two more, beyond what the host alone could hold.
    tier = RemoteTier(1e9, [CPUTier(0, 4 * ROW_TOKENS, 1e11, LINK)], COSTS, host_stages_remote_kv=True)
    planner, _, host = _planner(tier)
    requests = [_request(f"b{i}", 60, float(i), max_tokens=60) for i in range(4)]
    assert planner._reserve_for_host(requests[0]) and planner._reserve_for_host(requests[1])
    assert [tier.node_of(r.request_id) for r in requests[:2]] == [0, 0]
    assert host.allocator.num_free == 0
    assert not planner._reserve_for_host(requests[2]), "no host room to stage it"
    for request in requests[:2]:
        assert host.release_blocks(request.request_id) == 8
    assert planner._reserve_for_host(requests[2]) and planner._reserve_for_host(requests[3])
    assert [tier.node_of(r.request_id) for r in requests] == [0, 0, 0, 0]
    assert tier.tokens_held(0) == 4 * ROW_TOKENS
    assert set(host.slot_of) == {r.request_id for r in requests}, "every row keeps its slot"
    assert host.blocks_of("b0") == [] and host.allocator.num_free == 0
    host.free("b0")  # the request ends: its slot goes back too
    assert "b0" not in host.slot_of and host.allocator.num_free == 0
