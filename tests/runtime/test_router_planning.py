"""Stage planning (DP, buckets, refinement) and the routing policies: pure functions, no network, no torch."""

from __future__ import annotations

import itertools
import random

import pytest

from piggyback_runtime.router.policy import (
    POLICIES,
    LeastLoadedPolicy,
    LengthAwarePolicy,
    ReplicaLoad,
    RoundRobinPolicy,
    make_policy,
)
from piggyback_runtime.router.stages import (
    Stage,
    StagePlan,
    bucket_token_demand,
    exponential_bucket_edges,
    plan_qoe,
    plan_stages,
    plan_stages_brute_force,
    refine,
)


def mixing_rate(base_tokens_s: float = 1000.0, penalty: float = 1.0):
    """Tokens/s of a replica serving [lower, upper): slower for longer ranges, and slower the wider the range is
    relative to its top (the length-mixing penalty, 1 − mean/max)."""

    def rate(lower: int, upper: int) -> float:
        mean = (lower + upper) / 2
        return base_tokens_s / (1 + mean / 1000) / (1 + penalty * (1 - mean / upper))

    return rate


def three_stages() -> StagePlan:
    return StagePlan([Stage(0, 0, 100, ("a",)), Stage(1, 100, 1000, ("b", "b2")), Stage(2, 1000, None, ("c",))])


def load(name: str, running: int = 0, waiting: int = 0, kv_free: int = 10**6, host_free: int = 0,
         admitting: bool = True) -> ReplicaLoad:  # fmt: skip
    return ReplicaLoad(name, running, waiting, kv_free, host_free, admitting)


# --- the plan ---------------------------------------------------------------------------------------------------
def test_stage_for_uses_half_open_ranges_and_the_last_stage_is_unbounded() -> None:
    plan = three_stages()
    assert [plan.stage_for(n).index for n in (0, 99, 100, 999, 1000, 10**9)] == [0, 0, 1, 1, 2, 2]
    assert plan.stage_of("b2") == plan.stages[1] and plan.stage_of("zz") is None
    assert plan.boundaries == (100, 1000)
    with pytest.raises(ValueError, match="length_tokens"):
        plan.stage_for(-1)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([Stage(0, 0, 100, ("a",)), Stage(1, 200, None, ("b",))], "contiguous"),
        ([Stage(0, 0, 100, ("a",)), Stage(1, 100, None, ("a",))], "only one stage"),
        ([Stage(0, 0, 100, ("a",))], "unbounded"),
        ([Stage(0, 0, None, ())], "no replicas"),
        ([Stage(1, 0, None, ("a",))], "indices"),
    ],
)
def test_a_malformed_plan_is_refused_with_the_reason(stages: list[Stage], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StagePlan(stages)


def test_exponential_buckets_cover_100_to_100k_in_about_ten() -> None:
    edges = exponential_bucket_edges(100_000, first_bucket_tokens=256)
    assert edges[0] == 0 and edges[-1] == 100_000 and len(edges) - 1 == 10
    assert all(b == 2 * a for a, b in itertools.pairwise(edges[1:-1]))


def test_bucket_demand_counts_each_output_token_at_the_length_it_is_produced() -> None:
    # Prompt 200, 100 output tokens: contexts 200..299; 56 of them below 256, 44 in [256, 512).
    assert bucket_token_demand([(200, 100)], [0, 256, 512, 1024], window_s=2.0) == [28.0, 22.0, 0.0]
    # The last bucket is open-ended: tokens past the last edge still count there.
    assert bucket_token_demand([(1000, 100)], [0, 256, 512, 1024], window_s=1.0) == [0.0, 0.0, 100.0]


# --- the DP -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_dp_finds_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    edges = exponential_bucket_edges(4096, first_bucket_tokens=256)[: rng.randint(3, 5) + 1]
    demand = [rng.uniform(0, 800) for _ in range(len(edges) - 1)]
    replicas = [f"r{i}" for i in range(rng.randint(2, 5))]
    rate = mixing_rate(penalty=rng.uniform(0, 2))
    dp = plan_stages(replicas, edges, demand, rate)
    brute = plan_stages_brute_force(replicas, edges, demand, rate)
    assert plan_qoe(dp, edges, demand, rate) == pytest.approx(plan_qoe(brute, edges, demand, rate), rel=1e-12)
    assert sorted(dp.replicas) == sorted(replicas)


def test_without_a_mixing_penalty_pooling_wins_and_with_one_stages_separate_lengths() -> None:
    edges = [0, 256, 512, 1024, 2048]
    demand = [400.0, 50.0, 50.0, 300.0]
    replicas = ["r0", "r1", "r2", "r3"]
    # A flat rate: splitting only loses the pooling of queues.
    assert len(plan_stages(replicas, edges, demand, lambda lo, hi: 1000.0)) == 1
    # A strong mixing penalty: short and long lengths go to different replicas.
    plan = plan_stages(replicas, edges, demand, mixing_rate(penalty=3.0))
    assert len(plan) >= 2
    assert plan.stage_for(100) != plan.stage_for(1500)


def test_planning_input_errors_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="demand values"):
        plan_stages(["a"], [0, 10, 20], [1.0], lambda lo, hi: 1.0)
    with pytest.raises(ValueError, match="unique"):
        plan_stages(["a", "a"], [0, 10], [1.0], lambda lo, hi: 1.0)


# --- refinement -------------------------------------------------------------------------------------------------
def test_refine_moves_a_boundary_to_even_out_work_per_replica() -> None:
    plan = StagePlan([Stage(0, 0, 1000, ("a",)), Stage(1, 1000, None, ("b",))])
    # Stage 0 holds far more context than stage 1: its boundary must come down so some requests move on.
    lengths = [100] * 10 + list(range(550, 1000, 50)) * 2 + [5000]
    refined = refine(plan, lengths)
    assert refined.boundaries[0] < 1000
    assert refined.boundaries[0] >= 1000 / 2  # one bounded step at a time
    left = sum(x for x in lengths if x < refined.boundaries[0])
    right = sum(x for x in lengths if x >= refined.boundaries[0])
    assert abs(left - right) < abs(sum(x for x in lengths if x < 1000) - 5000)
    # Balanced within the tolerance: nothing moves.
    assert refine(plan, [900] * 5 + [4500]) == plan
    assert refined.stages[0].replicas == ("a",)


# --- policies ---------------------------------------------------------------------------------------------------
def test_registry_names_the_three_policies_and_length_aware_needs_a_plan() -> None:
    assert set(POLICIES) == {"roundRobin", "leastLoaded", "lengthAware"}
    with pytest.raises(ValueError, match="StagePlan"):
        make_policy("lengthAware")
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")
    with pytest.raises(ValueError, match="rebalance_queue_gap"):
        LeastLoadedPolicy(rebalance_queue_gap=1)


def test_round_robin_rotates_and_ls_tries_admitting_replicas_first() -> None:
    policy = RoundRobinPolicy()
    loads = [load("a"), load("b"), load("c")]
    assert [policy.candidates(10, "LS", loads)[0] for _ in range(4)] == ["a", "b", "c", "a"]
    refusing = [load("a", admitting=False), load("b"), load("c")]
    assert policy.candidates(10, "LS", refusing)[-1] == "a"  # still tried, last: its own admission decides


def test_least_loaded_orders_by_queue_and_be_goes_where_host_kv_is_free() -> None:
    policy = LeastLoadedPolicy()
    loads = [load("a", running=5, host_free=100), load("b", running=1, host_free=0), load("c", running=3,
                                                                                          host_free=5000)]
    assert policy.candidates(50, "LS", loads) == ["b", "c", "a"]
    assert policy.candidates(1000, "BE", loads) == ["c", "a", "b"]
    with pytest.raises(ValueError, match="service_class"):
        policy.candidates(10, "XX", loads)


def test_length_aware_enters_the_stage_holding_the_length_and_spills_downstream_when_congested() -> None:
    policy = LengthAwarePolicy(three_stages())
    loads = [load("a", running=2), load("b", running=3), load("b2", running=1), load("c")]
    assert policy.candidates(50, "LS", loads)[0] == "a"
    assert policy.candidates(500, "LS", loads)[:2] == ["b2", "b"]
    assert policy.candidates(5000, "LS", loads)[0] == "c"
    # Stage 0 congested (queue 10 vs 1 downstream): new short requests go to the next stage first.
    congested = [load("a", running=8, waiting=2), load("b", running=1), load("b2", running=3), load("c")]
    assert policy.candidates(50, "LS", congested)[0] == "b"
    # A full entry stage's replica (no KV for the request) goes after the others that fit.
    full = [load("a", kv_free=10), load("b"), load("b2"), load("c")]
    assert policy.candidates(50, "LS", full)[0] != "a"


def test_crossing_the_upper_bound_migrates_downstream_only_past_the_hysteresis_margin() -> None:
    policy = LengthAwarePolicy(three_stages(), hysteresis_fraction=0.05)
    loads = [load("a"), load("b", running=2), load("b2", running=1), load("c")]
    assert policy.migration_target(99, "a", loads, 0) is None
    assert policy.migration_target(104, "a", loads, 0) is None  # past 100 but within 5%
    assert policy.migration_target(105, "a", loads, 0) == "b2"  # the next stage's least-loaded replica
    assert policy.migration_target(5000, "c", loads, 0) is None  # the last stage keeps everything


def test_a_growing_request_never_ping_pongs_between_stages() -> None:
    policy = LengthAwarePolicy(three_stages())
    rng = random.Random(3)
    replica, visited_stages = "a", [0]
    for length in range(50, 3000, 7):
        loads = [load(n, running=rng.randint(0, 12), waiting=rng.randint(0, 4)) for n in ("a", "b", "b2", "c")]
        target = policy.migration_target(length, replica, loads, 0)
        if target is not None:
            replica = target
            visited_stages.append(policy.plan.stage_of(replica).index)
    assert visited_stages == sorted(visited_stages)  # only ever downstream
    assert visited_stages[-1] == 2


def test_within_stage_rebalancing_moves_load_off_a_long_queue_and_not_back() -> None:
    policy = LengthAwarePolicy(three_stages(), rebalance_queue_gap=4)
    busy = [load("a"), load("b", running=8, waiting=3), load("b2", running=2), load("c")]
    assert policy.migration_target(300, "b", busy, 0) == "b2"
    after = [load("a"), load("b", running=7, waiting=3), load("b2", running=3), load("c")]
    assert policy.migration_target(300, "b2", after, 0) is None  # the move cannot be undone by itself
    # No waiting requests at the source, or a gap below the threshold: no move.
    assert policy.migration_target(300, "b", [load("b", running=11), load("b2", running=2)], 0) is None
    assert policy.migration_target(300, "b", [load("b", running=4, waiting=1), load("b2", running=2)], 0) is None
    # Least-loaded (Llumnix-style) rebalances across the whole pool the same way.
    ll = LeastLoadedPolicy(rebalance_queue_gap=4)
    assert ll.migration_target(300, "b", [load("b", running=8, waiting=3), load("x", running=1)], 0) == "x"


def test_across_stage_rebalancing_sends_longer_requests_on_early_from_a_congested_stage() -> None:
    policy = LengthAwarePolicy(three_stages(), rebalance_queue_gap=4)
    congested = [load("a"), load("b", running=9, waiting=2), load("b2", running=9, waiting=2), load("c")]
    assert policy.migration_target(700, "b", congested, 0) == "c"  # past the middle of [100, 1000)
    assert policy.migration_target(300, "b", congested, 0) is None  # short ones stay (no peer in b is freer)


def test_in_flight_migrations_are_capped() -> None:
    policy = LengthAwarePolicy(three_stages(), max_in_flight_migrations=3)
    loads = [load("a"), load("b"), load("b2"), load("c")]
    assert policy.migration_target(2000, "b", loads, in_flight_migrations=2) == "c"
    assert policy.migration_target(2000, "b", loads, in_flight_migrations=3) is None
    # A target without KV room for the request is no target.
    assert policy.migration_target(2000, "b", [load("b"), load("c", kv_free=100)], 0) is None
