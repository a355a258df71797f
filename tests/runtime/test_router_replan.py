"""The live router plans its lengthAware stages with the DP (stages.plan_stages) from what it observes.

Specification:
- The router keeps a bounded window of finished requests' (prompt, output) lengths. Once it holds at least
  `replan_min_requests` and the re-plan interval has passed, it reads every replica's latency profile
  (GET /internal/v1/profile) and switches to exactly the plan `plan_stages` gives for the window's bucket
  demand and the replicas' decode rate (built from their latency model, torch-free); the stage gauges follow.
- Too few observations: no re-plan (the operator's starting boundaries stay), and no profile is even asked for.
- A replica without a usable profile (503, malformed, a model predicting no time): the plan stays, the
  `bad_profile` outcome is counted and the reason logged with the replica's name.
- Re-planning never happens within `replan_interval_s` of the last attempt, nor when the length distribution
  has not moved since the last DP plan; a distribution that moved re-plans again.
- The runtime's /internal/v1/profile serves its SLO controller's latency model so that the router rebuilds
  the same step-time predictions; without SLO control it answers 503 saying why.
"""

from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from piggyback_runtime.router.app import ReplicaProfile, Router, RouterSettings
from piggyback_runtime.router.stages import (
    StagePlan,
    bucket_token_demand,
    exponential_bucket_edges,
    plan_stages,
    token_rate_from_step_time,
)
from piggyback_runtime.scheduler.latency_model import (
    DECODE_COST_PADDED,
    IterationShape,
    LatencyModel,
    LinearAttentionModel,
    StaircaseModel,
    Step,
)

REPLICAS = ("http://a:1", "http://b:1", "http://c:1", "http://d:1")
OPERATOR_BOUNDARIES = (4096, 16384, 65536)  # what the operator passes before any length is known (pools.py)
MAX_CONTEXT = 131072
KV_CAPACITY = 2_000_000
MAX_ROWS = 256
# A replica whose decode attention pays every row the batch's longest context (the padded kernel): mixing
# lengths costs, so the DP has a reason to split stages by length.
MODEL = LatencyModel(StaircaseModel((Step(1, 512, 0.008),), 0, 1e-5), LinearAttentionModel(0.0, 0.0, 4e-9),
                     overhead_s=0.002, decode_cost=DECODE_COST_PADDED)  # fmt: skip
PROFILE = {"latency_model": MODEL.to_dict(), "kv_capacity_tokens": KV_CAPACITY, "max_batch_rows": MAX_ROWS,
           "max_context_tokens": MAX_CONTEXT}  # fmt: skip


def router_with_profiles(profiles: dict[str, Any], asked: list[str] | None = None, **settings: Any) -> Router:
    """A lengthAware router over REPLICAS at the operator's boundaries; replica r answers its profile request
    with profiles[r] (a dict: 200 with that body; an int: that status)."""

    def reply(request: httpx.Request) -> httpx.Response:
        replica = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        assert request.url.path == "/internal/v1/profile"
        if asked is not None:
            asked.append(replica)
        answer = profiles[replica]
        if isinstance(answer, int):
            return httpx.Response(answer, json={"error": {"message": f"{replica} has no profile"}})
        return httpx.Response(200, json=answer)

    router = Router(RouterSettings(REPLICAS, "lengthAware", OPERATOR_BOUNDARIES, **settings))
    router.client = httpx.AsyncClient(transport=httpx.MockTransport(reply))
    return router


def skewed_lengths(seed: int, short: int, long: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return ([(rng.randint(100, 1500), 200) for _ in range(short)]
            + [(rng.randint(20_000, 60_000), 300) for _ in range(long)])  # fmt: skip


def observe(router: Router, lengths: list[tuple[int, int]], start_s: float, span_s: float) -> None:
    for i, (prompt, output) in enumerate(lengths):
        router.observe_finished(prompt, output, now_s=start_s + span_s * i / len(lengths))


def expected_plan(lengths: list[tuple[int, int]], window_s: float) -> StagePlan:
    """plan_stages on the same inputs, built here from the latency model's own prediction of a decode step."""

    def step_s(contexts: list[int]) -> float:
        rows = len(contexts)
        # Padded decode attention: every row reads the longest context; one Dense and one sampled row per decode.
        return MODEL.predict(IterationShape(rows, 0.0, rows * max(contexts), rows))

    edges = exponential_bucket_edges(MAX_CONTEXT)
    demand = bucket_token_demand(lengths, edges, window_s)
    return plan_stages(REPLICAS, edges, demand, token_rate_from_step_time(step_s, KV_CAPACITY, MAX_ROWS))


def replans(router: Router, outcome: str) -> float:
    for line in router.metrics.render().decode().splitlines():
        if line.startswith(f'piggyback_router_stage_replans_total{{outcome="{outcome}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_router_replans_to_exactly_the_dp_plan_of_the_observed_lengths() -> None:
    router = router_with_profiles(dict.fromkeys(REPLICAS, PROFILE), replan_min_requests=50, replan_interval_s=30)
    starting = router.plan
    assert starting is not None and starting.boundaries == OPERATOR_BOUNDARIES  # the operator's default works
    lengths = skewed_lengths(seed=1, short=300, long=30)
    observe(router, lengths, start_s=0.0, span_s=99.0)

    assert await router.replan_once(now_s=100.0) == "replanned"
    want = expected_plan(lengths, window_s=100.0)
    assert router.plan == want and router.plan != starting
    assert router.policy.plan == want  # type: ignore[attr-defined]  # routing uses it, not just the gauge
    metrics = router.metrics.render().decode()
    for stage in want.stages[:-1]:
        assert f'piggyback_router_stage_upper_tokens{{stage="{stage.index}"}} {float(stage.upper_tokens)}' in metrics
    # Stages that no longer exist are no longer exported.
    assert f'piggyback_router_stage_lower_tokens{{stage="{len(want)}"}}' not in metrics
    assert replans(router, "replanned") == 1.0


async def test_too_few_observed_lengths_keep_the_starting_plan_without_asking_for_profiles() -> None:
    asked: list[str] = []
    router = router_with_profiles(dict.fromkeys(REPLICAS, PROFILE), asked, replan_min_requests=50)
    observe(router, skewed_lengths(seed=2, short=45, long=4), start_s=0.0, span_s=10.0)  # 49 < 50
    assert await router.replan_once(now_s=20.0) == "too_few_lengths"
    assert router.plan is not None and router.plan.boundaries == OPERATOR_BOUNDARIES
    assert asked == [] and replans(router, "too_few_lengths") == 1.0


@pytest.mark.parametrize(("bad", "reason"), [
    (503, "answered 503: http://c:1 has no profile"),
    ({**PROFILE, "latency_model": {"dense": {}}}, "malformed profile"),
    ({**PROFILE, "max_batch_rows": 0}, "must be >= 1"),
    ({**PROFILE, "latency_model": LatencyModel(StaircaseModel(()), LinearAttentionModel(0, 0, 0)).to_dict()},
     "predicts a 0.0 s decode step"),
])  # fmt: skip
async def test_a_replica_without_a_usable_profile_keeps_the_plan_and_says_why(
    bad: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    router = router_with_profiles({**dict.fromkeys(REPLICAS, PROFILE), "http://c:1": bad}, replan_min_requests=50)
    observe(router, skewed_lengths(seed=3, short=300, long=30), start_s=0.0, span_s=99.0)
    with caplog.at_level(logging.WARNING, logger="piggyback_runtime.router.app"):
        assert await router.replan_once(now_s=100.0) == "bad_profile"
    assert router.plan is not None and router.plan.boundaries == OPERATOR_BOUNDARIES
    assert replans(router, "bad_profile") == 1.0 and replans(router, "replanned") == 0.0
    assert any("http://c:1" in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text


async def test_replanning_respects_its_interval_and_waits_for_the_distribution_to_move() -> None:
    asked: list[str] = []
    router = router_with_profiles(dict.fromkeys(REPLICAS, PROFILE), asked, replan_min_requests=50,
                                  replan_interval_s=30, length_window_requests=330)  # fmt: skip
    skewed = skewed_lengths(seed=4, short=300, long=30)
    observe(router, skewed, start_s=0.0, span_s=99.0)
    assert await router.replan_once(now_s=100.0) == "replanned"
    first = router.plan
    assert await router.replan_once(now_s=129.0) is None and len(asked) == len(REPLICAS)  # within the interval
    # The same distribution again (the window slid over similar traffic): nothing moved, nothing re-planned.
    observe(router, skewed, start_s=100.0, span_s=99.0)
    assert await router.replan_once(now_s=200.0) is None and router.plan == first
    # Only short requests now (the window holds the last 330): the long stage is no longer worth a replica.
    only_short = skewed_lengths(seed=5, short=330, long=0)
    observe(router, only_short, start_s=200.0, span_s=99.0)
    assert await router.replan_once(now_s=300.0) == "replanned"
    assert router.plan == expected_plan(only_short, window_s=100.0) != first
    assert replans(router, "replanned") == 2.0


async def test_finished_requests_streamed_through_the_router_are_observed() -> None:
    def reply(request: httpx.Request) -> httpx.Response:
        line = {"request_id": "x", "token_ids": [1], "text": "hi", "num_prompt_tokens": 700, "num_output_tokens": 42,
                "finished": True, "finish_reason": "length", "error": None}  # fmt: skip
        return httpx.Response(200, content=json.dumps(line) + "\n")

    router = Router(RouterSettings(REPLICAS[:2], "lengthAware", (4096,)))
    router.client = httpx.AsyncClient(transport=httpx.MockTransport(reply))
    opened = await router.open({"model": "chat"}, 700, "LS", None)
    assert isinstance(opened, tuple), opened
    assert [line async for line in router.lines(*opened, "x", "LS")][-1]["finished"]
    assert [(p, o) for _, p, o in router.finished_lengths] == [(700, 42)]


def test_the_runtime_profile_endpoint_serves_its_controllers_model_to_the_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from piggyback_runtime.server.internal import register_internal_routes

    monkeypatch.delenv("PIGGYBACK_INTERNAL_TOKEN", raising=False)
    planner = SimpleNamespace(slo=SimpleNamespace(latency_model=MODEL))
    engine = SimpleNamespace(planner=planner, allocator=SimpleNamespace(num_blocks=1000, block_size=16),
                             config=SimpleNamespace(engine=SimpleNamespace(max_num_seqs=64)),
                             loaded=SimpleNamespace(max_model_len=8192))  # fmt: skip
    runtime = SimpleNamespace(ready_engine=lambda: SimpleNamespace(engine=engine))
    app = FastAPI()
    register_internal_routes(app, runtime)  # type: ignore[arg-type]
    client = TestClient(app)
    answer = client.get("/internal/v1/profile")
    assert answer.status_code == 200, answer.text
    profile = ReplicaProfile.from_json(answer.json())
    assert (profile.kv_capacity_tokens, profile.max_batch_rows, profile.max_context_tokens) == (16000, 64, 8192)
    contexts = [100, 3000, 50]
    assert profile.decode_step_s(contexts) == pytest.approx(0.002 + 0.008 + 4e-9 * 3 * 3000 + 0.0)
    planner.slo = None  # SLO control off: no latency model to serve
    refused = client.get("/internal/v1/profile")
    assert refused.status_code == 503 and "SLO control is off" in refused.json()["error"]["message"]


async def test_the_adaptation_loop_replans_once_enough_lengths_are_seen() -> None:
    import asyncio

    router = router_with_profiles(dict.fromkeys(REPLICAS, PROFILE), replan_min_requests=50, replan_interval_s=0.05,
                                  refine_interval_s=0.01)  # fmt: skip
    for prompt, output in skewed_lengths(seed=6, short=300, long=30):
        router.observe_finished(prompt, output)  # now: the loop's clock
    loop = asyncio.create_task(router.adapt_forever())
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if replans(router, "replanned"):
                break
    finally:
        loop.cancel()
    assert replans(router, "replanned") == 1.0
    assert router.plan is not None and router.plan.boundaries != OPERATOR_BOUNDARIES


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"replan_interval_s": -1}, "replan_interval_s must be >= 0"),
    ({"replan_min_requests": 0}, "replan_min_requests"),
    ({"replan_min_requests": 100, "length_window_requests": 50}, "replan_min_requests <= length_window_requests"),
    ({"replan_min_shift": 1.5}, "replan_min_shift"),
])  # fmt: skip
def test_bad_replanning_settings_say_what_to_fix(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouterSettings(REPLICAS, "lengthAware", OPERATOR_BOUNDARIES, **kwargs)
