"""The multi-instance simulator: conservation of requests, migration, and why length-aware routing pays."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from piggyback_runtime.router.policy import make_policy
from piggyback_runtime.router.stages import Stage, StagePlan
from piggyback_runtime.sim.cluster import (
    DEFAULT_MIGRATION_BANDWIDTH_GB_S,
    DEFAULT_MIGRATION_LATENCY_S,
    ClusterRequest,
    ClusterSimulator,
    bimodal_workload,
    h100_llama3_8b_profile,
    run_router,
    skewed_workload,
)
from piggyback_runtime.sim.devices import with_mixing_penalty

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import routing as routing_benchmark


@pytest.fixture(scope="module")
def device():
    return h100_llama3_8b_profile()


@pytest.mark.slow  # seconds: a whole cluster simulation
def test_the_attention_model_charges_a_mixed_batch_like_l4_measures(device) -> None:
    """Same total context, same rows: a batch mixing short and long contexts is 1.1-2.1x slower in attention."""
    rows = 64
    homogeneous = [4000] * rows
    mixed = [1000] * 48 + [13000] * 16  # the same 256K tokens of context
    assert sum(mixed) == sum(homogeneous)
    dense_only = device.iteration_s(rows, 0.0, [1] * rows, rows)

    def attention_s(contexts: list[int]) -> float:
        return device.iteration_s(rows, 0.0, contexts, rows) - dense_only

    assert 1.1 <= attention_s(mixed) / attention_s(homogeneous) <= 2.1


@pytest.mark.parametrize("router", ["roundRobin", "leastLoaded", "lengthAware"])
def test_two_instances_conserve_requests_and_tokens(device, router: str) -> None:
    # Prompts of 500 with 300 output tokens all cross a boundary at 600: every request migrates under lengthAware.
    requests = [ClusterRequest(i, 0.05 * i, 500 if i % 2 else 20_000, 300) for i in range(40)]
    plan = StagePlan([Stage(0, 0, 600, ("replica-0",)), Stage(1, 600, None, ("replica-1",))])
    policy = make_policy(router, plan)
    # The window (duration_s) covers the whole run, so every output token produced is counted.
    sim = ClusterSimulator(device, 2, policy, requests, duration_s=1000.0, refine_interval_s=0)
    result = sim.run()
    assert len(result.records) == len(requests)
    assert all(r.finished_s is not None and r.rejected is None for r in result.records)
    assert all(r.first_token_s <= r.finished_s for r in result.records)
    # Every output token is produced exactly once (none lost or doubled by a migration).
    assert result.output_tokens_in_window == sum(r.output_tokens for r in requests)
    # Nothing is left behind: KV freed, queues empty, no transfer in flight.
    assert all(x.kv_used_tokens == 0 and not x.running and not x.waiting for x in sim.instances)
    assert sim._in_flight == 0
    if router == "lengthAware":
        short = [r for r in result.records if r.request.prompt_tokens == 500]
        assert all(r.migrations == 1 for r in short)
        assert result.migrations >= len(short)
    if router == "roundRobin":
        assert result.migrations == 0


def test_tokens_are_generated_once_each_across_a_migration(device) -> None:
    requests = [ClusterRequest(0, 0.0, 500, 300)]
    plan = StagePlan([Stage(0, 0, 600, ("replica-0",)), Stage(1, 600, None, ("replica-1",))])
    sim = ClusterSimulator(device, 2, make_policy("lengthAware", plan), requests, duration_s=100.0,
                           refine_interval_s=0, router_tick_s=0.01)  # fmt: skip
    result = sim.run()
    assert result.output_tokens_in_window == 300
    assert result.records[0].migrations == 1
    # The transfer moved the KV of a context just past the hysteresis margin (630 tokens) at 50 GB/s.
    per_token = device.shape.kv_bytes_per_token()
    assert 630 * per_token <= result.migration_bytes <= 700 * per_token
    # The request is paused while its KV moves, and never decodes on both replicas at once: after its first
    # token it needs 299 steps one after another plus the transfer.
    record = result.records[0]
    shortest_step_s = device.iteration_s(1, 0.0, (500,), 1)
    transfer_s = DEFAULT_MIGRATION_LATENCY_S + result.migration_bytes / (DEFAULT_MIGRATION_BANDWIDTH_GB_S * 1e9)
    assert record.finished_s - record.first_token_s >= 299 * shortest_step_s + transfer_s


def test_length_aware_beats_round_robin_on_a_strongly_bimodal_workload(device) -> None:
    """Why it must: under round-robin every replica's decode batch mixes 200-token and 30K-token contexts, so
    every step pays the mixing penalty (1 − mean/max near 1: attention up to 2× slower); length-aware puts the
    short ones on one replica and the long ones on the other, where mean ≈ max and the penalty vanishes."""
    requests = bimodal_workload(rate_per_s=6.0, duration_s=20.0, seed=3, short_tokens=200, long_tokens=30_000,
                                long_share=0.1, output_tokens=200)  # fmt: skip
    plan = StagePlan([Stage(0, 0, 4096, ("replica-0",)), Stage(1, 4096, None, ("replica-1",))])
    common = {"duration_s": 20.0, "refine_interval_s": 0}

    def ratio(profile) -> float:
        rr = ClusterSimulator(profile, 2, make_policy("roundRobin"), requests, **common).run()
        la = ClusterSimulator(profile, 2, make_policy("lengthAware", plan), requests, **common).run()
        assert len(rr.finished()) == len(la.finished()) == len(requests)
        return la.mean_latency_s / rr.mean_latency_s

    with_penalty = ratio(device)
    assert with_penalty < 0.8
    # Part of the gain is not the kernel: short requests no longer queue behind 30K-token prefills. The mixing
    # penalty must add to it: with an exact, length-blind attention model the gain is smaller.
    assert with_penalty < ratio(with_mixing_penalty(device, 0.0)) - 0.05


def test_the_planned_router_runs_end_to_end_on_a_skewed_workload(device) -> None:
    requests = skewed_workload(rate_per_s=3.0, duration_s=15.0, seed=1)
    result = run_router("lengthAware", device, 2, requests, 15.0,
                        plan_sample=skewed_workload(3.0, 15.0, seed=2))  # fmt: skip
    assert result.plan is not None and sorted(result.plan.replicas) == ["replica-0", "replica-1"]
    assert len(result.finished()) + sum(r.rejected is not None for r in result.records) == len(requests)
    assert 0 < result.slo_attainment <= 1


@pytest.mark.slow  # seconds: a whole cluster simulation
def test_the_benchmark_reports_every_router_and_the_l4_comparison() -> None:
    rows = routing_benchmark.run([2], [2.0], duration_s=10.0, seed=1)
    assert [r.router for r in rows] == ["roundRobin", "leastLoaded", "lengthAware"]
    assert all(r.finished == r.total and r.mean_s > 0 and r.tokens_s > 0 for r in rows)
    lines = routing_benchmark.summary(rows)
    assert len(lines) == 3 and "−67%" in lines[2] and "1.71×" in lines[2]


@pytest.mark.slow  # seconds: a whole cluster simulation
def test_piggyback_sim_cluster_prints_a_row_per_router_and_refuses_an_unknown_one(capsys) -> None:
    from piggyback_runtime.cli import main

    assert main(["sim", "cluster", "--instances", "2", "--rate", "1", "--duration-s", "5"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("roundRobin", "leastLoaded", "lengthAware")) and "SLO@5x" in out
    assert main(["sim", "cluster", "--router", "random"]) == 2
    assert "random" in capsys.readouterr().err
