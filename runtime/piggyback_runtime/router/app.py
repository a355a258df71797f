"""The pool router: an OpenAI-compatible front for one pool's replicas, with live migration between stages.

Why inside runtime/piggyback_runtime/router/ and not a package of its own: it speaks the runtime's internal
protocol (server/internal.py; shared names in config.py), sends the same OpenAI bodies (server/protocol.py) and reuses
its metrics module and policies; it ships in the same image and starts as `piggyback router`, so one package
keeps the two sides of that protocol versioned together.

Per client request:
1. Route: the policy (router.policy) orders the replicas for the request's length and class from the
   replicas' last polled loads (GET /internal/v1/load every `poll_interval_s`). The router tries them in
   order: a 429 (that replica's admission said no) or an unreachable replica moves on to the next; the 429
   is passed on only when every candidate refused. Other errors (400, 401, 404) go straight to the client.
2. Relay: the replica's NDJSON token stream (POST /internal/v1/generate) becomes OpenAI SSE (or one JSON
   body for non-streaming requests).
3. Migrate: after each token the policy's `migration_target(length, replica, loads, in_flight)` may name
   another replica (lengthAware: the request crossed its stage's upper bound by the hysteresis margin). The
   router asks the current replica to push the request there (POST .../migrate); the replica's stream then
   ends with `migrated_to` and the router continues from the target's stream (GET .../stream). The client's
   stream never notices. A failed migration changes nothing: the request goes on where it was.
Stages (lengthAware): the router starts from --stage-boundaries (the operator's 4096,16384,65536) and adapts
them in one loop (`adapt_forever`): at most every `replan_interval_s`, once `replan_min_requests` requests have
finished and their length distribution moved since the last plan, it re-plans with the DP
(stages.plan_stages) from the window of finished requests' lengths and the replicas' own latency models
(GET /internal/v1/profile, rebuilt here without torch: `ReplicaProfile`); between re-plans it refines the
boundaries (stages.refine). A replica without a usable profile keeps the current plan (logged, counted). A
new plan applies to routing at once; requests in flight stay put until the migration policy moves them.
Failures the client sees explicitly: a replica that dies mid-stream ends the stream with an OpenAI error
event and `[DONE]` (non-streaming: a 502). Requests in flight when the router itself dies lose their
connection (the client sees the broken stream; the replicas see the disconnect and free the KV).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from piggyback_runtime import metrics as m
from piggyback_runtime.config import CLIENT_AUTHORIZATION_HEADER
from piggyback_runtime.router.leader import Leadership, Standalone, run_leadership
from piggyback_runtime.router.policy import POLICIES, LengthAwarePolicy, ReplicaLoad, RoutingPolicy, make_policy
from piggyback_runtime.router.stages import (
    ReplicaTokenRate,
    Stage,
    StagePlan,
    bucket_token_demand,
    exponential_bucket_edges,
    plan_stages,
    refine,
    single_stage,
    token_rate_from_step_time,
)
from piggyback_runtime.scheduler.latency_model import LatencyModel
from piggyback_runtime.server.protocol import (
    SSE_DONE,
    chat_role_choice,
    completion_body,
    error_response,
    health_body,
    sse_error,
    stream_choice,
    stream_chunk,
    usage,
)

log = logging.getLogger(__name__)

BYTES_PER_TOKEN_ESTIMATE = 4  # text prompts are not tokenised here: ~4 UTF-8 bytes a token (English BPE)


@dataclass(frozen=True)
class RouterSettings:
    endpoints: tuple[str, ...]
    policy: str = "roundRobin"
    # lengthAware: upper bounds of all stages but the last; endpoints split over the stages in order.
    stage_boundaries: tuple[int, ...] = ()
    poll_interval_s: float = 0.2
    internal_token: str = ""
    request_timeout_s: float = 600.0
    # "host:port" of a headless Service: the replicas are the addresses it resolves to, re-read every
    # DNS_REFRESH_S (how the operator deploys it: pod IPs come and go with the pool's replicas).
    pool_dns: str = ""
    # lengthAware: how often stage boundaries are refined from the lengths of the requests in flight (0: never).
    refine_interval_s: float = 10.0
    # lengthAware: stages re-planned by the DP (stages.plan_stages) from the lengths of recently finished
    # requests and the replicas' latency profiles (GET /internal/v1/profile), at most once per
    # replan_interval_s (0: never; the starting boundaries are then only refined). Until
    # replan_min_requests requests have finished the starting plan stays. The window holds the last
    # length_window_requests; a re-plan happens only when its length distribution has moved since the
    # last one (total variation distance of the buckets' demand shares >= replan_min_shift, or the
    # total demand changed by REPLAN_DEMAND_FACTOR either way).
    replan_interval_s: float = 60.0
    replan_min_requests: int = 50
    length_window_requests: int = 2000
    replan_min_shift: float = 0.1

    def __post_init__(self) -> None:
        if not self.endpoints and not self.pool_dns:
            raise ValueError("the router needs replica endpoints (--pool-endpoints) or a pool DNS name (--pool-dns)")
        if self.pool_dns and (":" not in self.pool_dns or not self.pool_dns.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"--pool-dns takes host:port, got {self.pool_dns!r}")
        bad = [e for e in self.endpoints if not e.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"endpoints must be http(s) URLs: {', '.join(bad)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if list(self.stage_boundaries) != sorted(set(self.stage_boundaries)) or any(
            b <= 0 for b in self.stage_boundaries
        ):
            raise ValueError(f"stage boundaries must be positive and strictly increasing: {self.stage_boundaries}")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        if self.refine_interval_s < 0:
            raise ValueError("refine_interval_s must be >= 0 (0 disables refinement)")
        if self.replan_interval_s < 0:
            raise ValueError("replan_interval_s must be >= 0 (0 disables re-planning)")
        if self.replan_min_requests < 1 or self.length_window_requests < self.replan_min_requests:
            raise ValueError(f"need 1 <= replan_min_requests <= length_window_requests, got "
                             f"{self.replan_min_requests} and {self.length_window_requests}")  # fmt: skip
        if not 0 <= self.replan_min_shift <= 1:
            raise ValueError(f"replan_min_shift is a share of demand in [0, 1], got {self.replan_min_shift}")

    def stage_plan(self, endpoints: Sequence[str]) -> StagePlan:
        """Stages at the given boundaries, the endpoints split over them in order (fewer endpoints than stages:
        the upper stages merge, as a single replica cannot be two stages)."""
        count = min(len(self.stage_boundaries) + 1, len(endpoints))
        if count <= 1:
            return single_stage(endpoints)
        edges = [0, *self.stage_boundaries[: count - 1], None]
        n = len(endpoints)
        return StagePlan([
            Stage(i, edges[i], edges[i + 1], tuple(endpoints[i * n // count : (i + 1) * n // count]))  # type: ignore[arg-type]
            for i in range(count)
        ])  # fmt: skip


DNS_REFRESH_S = 5.0
# The total demand changing by this factor (either way) re-plans even if its shape did not move: how close
# stages run to overload, and so which split is best, depends on the level too.
REPLAN_DEMAND_FACTOR = 2.0
# The shortest span the demand of a window is averaged over (a burst of finishes at one instant).
MIN_DEMAND_WINDOW_S = 1.0


class ProfileError(ValueError):
    """A replica's latency profile is missing or unusable for planning."""


@dataclass(frozen=True)
class ReplicaProfile:
    """What the stage planner knows of one replica's speed (GET /internal/v1/profile, server/internal.py)."""

    latency_model: LatencyModel
    kv_capacity_tokens: int
    max_batch_rows: int
    max_context_tokens: int

    @classmethod
    def from_json(cls, data: Any) -> ReplicaProfile:
        """Parse and sanity-check a profile answer; ProfileError saying what is wrong otherwise."""
        try:
            model = LatencyModel.from_dict(data["latency_model"])
            profile = cls(model, int(data["kv_capacity_tokens"]), int(data["max_batch_rows"]),
                          int(data["max_context_tokens"]))  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"malformed profile ({type(exc).__name__}: {exc})") from None
        if min(profile.kv_capacity_tokens, profile.max_batch_rows, profile.max_context_tokens) < 1:
            raise ProfileError("kv_capacity_tokens, max_batch_rows and max_context_tokens must be >= 1")
        # A model predicting a zero, negative or infinite step would make a stage look infinitely fast.
        probe = profile.decode_step_s([1, profile.max_context_tokens])
        if not (math.isfinite(probe) and probe > 0):
            raise ProfileError(f"its latency model predicts a {probe} s decode step; it must be > 0 and finite")
        return profile

    def decode_step_s(self, contexts: Sequence[int]) -> float:
        """One decode-only iteration of these contexts, as the replica's own SLO controller would predict it:
        one Dense row and one sampled row per decode, attention load as its kernel counts it."""
        rows = len(contexts)
        load = self.latency_model.decode_load(rows, sum(contexts), max(contexts, default=0))
        return self.latency_model.predict_parts(rows, 0.0, load, rows)

    def token_rate(self) -> ReplicaTokenRate:
        return token_rate_from_step_time(self.decode_step_s, self.kv_capacity_tokens, self.max_batch_rows)


def pool_token_rate(profiles: Sequence[ReplicaProfile]) -> ReplicaTokenRate:
    """One rate for every replica, as the DP assumes a homogeneous pool: the slowest replica's per range
    (a pool's replicas run one model on one device type; if they differ, planning for the slowest is safe)."""
    rates = [p.token_rate() for p in profiles]
    return lambda lower, upper: min(rate(lower, upper) for rate in rates)


def demand_shift(before: Sequence[float], after: Sequence[float]) -> float:
    """How far a length distribution moved: total variation distance of the buckets' demand shares (0..1),
    or 1.0 when the total changed by REPLAN_DEMAND_FACTOR or more (or either is empty)."""
    total_before, total_after = sum(before), sum(after)
    if total_before <= 0 or total_after <= 0 or len(before) != len(after):
        return 1.0
    if max(total_before, total_after) >= REPLAN_DEMAND_FACTOR * min(total_before, total_after):
        return 1.0
    return 0.5 * sum(abs(b / total_before - a / total_after) for b, a in zip(before, after, strict=True))


def resolve_pool(pool_dns: str) -> tuple[str, ...]:
    """The replica URLs behind a headless Service name (sorted, so the stage split is stable)."""
    host, port = pool_dns.rsplit(":", 1)
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError:
        return ()
    addresses = sorted({info[4][0] for info in infos})
    return tuple(f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses)


class ReplicaLost(Exception):
    """The replica serving a request stopped answering mid-stream."""


@dataclass
class Router:
    settings: RouterSettings
    metrics: m.RouterMetrics = field(default_factory=m.RouterMetrics)
    # Of a pool's routers, the leader (router/leader.py) alone re-plans stages and starts migrations.
    leadership: Leadership = field(default_factory=Standalone)

    def __post_init__(self) -> None:
        self.loads: dict[str, ReplicaLoad] = {}
        self.up: dict[str, bool] = {}
        self.endpoints: tuple[str, ...] = ()
        # (monotonic finish time, prompt tokens, output tokens) of recently finished requests: the stage DP's input.
        self.finished_lengths: deque[tuple[float, int, int]] = deque(maxlen=self.settings.length_window_requests)
        self.last_replan_attempt_s: float | None = None
        # Bucket edges and demand the current DP plan was made for (None: the starting plan, not the DP's).
        self.planned_for: tuple[list[int], list[float]] | None = None
        self.set_endpoints(self.settings.endpoints or resolve_pool(self.settings.pool_dns))
        self.service_class: dict[str, str] = {}
        self.in_flight_migrations = 0
        self.lengths: dict[str, int] = {}  # request id -> current context length, requests in flight
        headers = {"authorization": f"Bearer {self.settings.internal_token}"} if self.settings.internal_token else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.settings.request_timeout_s,
                                                                               connect=5.0))  # fmt: skip

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """(Re)build the stages and the policy over these replicas (the pool scaled)."""
        if tuple(endpoints) == self.endpoints and hasattr(self, "policy"):
            return
        self.endpoints = tuple(endpoints)
        self.plan = self.settings.stage_plan(self.endpoints) if self.endpoints else None
        # No replica known yet (DNS not resolved): nothing to route to; any policy answers "none".
        policy = self.settings.policy if self.plan is not None else "roundRobin"
        self.policy: RoutingPolicy = make_policy(policy, self.plan)
        self.up = {e: self.up.get(e, False) for e in self.endpoints}
        self.loads = {e: load for e, load in self.loads.items() if e in self.endpoints}
        self.planned_for = None  # other replicas: the next re-plan must not be skipped as "nothing moved"
        self._show_plan()

    def _show_plan(self) -> None:
        self.metrics.stage_lower_tokens.clear()
        self.metrics.stage_upper_tokens.clear()
        for stage in self.plan.stages if self.plan else ():
            self.metrics.stage_lower_tokens.labels(str(stage.index)).set(stage.lower_tokens)
            if stage.upper_tokens is not None:
                self.metrics.stage_upper_tokens.labels(str(stage.index)).set(stage.upper_tokens)

    def _install_plan(self, plan: StagePlan) -> None:
        """Route by `plan` from now on. Requests in flight stay where they are; the migration policy moves
        those whose length the new plan puts in another stage, as it does for any boundary crossing."""
        assert isinstance(self.policy, LengthAwarePolicy)
        self.plan = self.policy.plan = plan
        self._show_plan()

    def refine_once(self) -> bool:
        """Move lengthAware stage boundaries towards equal attention work per replica (stages.refine), from the
        lengths of the requests in flight now; True if they moved."""
        if not isinstance(self.policy, LengthAwarePolicy) or self.plan is None or len(self.plan) < 2:
            return False
        if not self.lengths:
            return False
        refined = refine(self.plan, list(self.lengths.values()))
        if refined == self.plan:
            return False
        log.info("stage boundaries refined: %s -> %s", self.plan.boundaries, refined.boundaries)
        self._install_plan(refined)
        return True

    # --- stage planning (DP) --------------------------------------------------------------------------------
    def observe_finished(self, prompt_tokens: int, output_tokens: int, now_s: float | None = None) -> None:
        """A request finished with these lengths: one more sample of the pool's length distribution."""
        self.finished_lengths.append((time.monotonic() if now_s is None else now_s, prompt_tokens, output_tokens))

    def window_demand(self, bucket_edges: Sequence[int], now_s: float) -> list[float]:
        """Decode tokens/s per bucket over the window of finished requests (stages.bucket_token_demand),
        averaged over the span from the window's first finish to now."""
        window_s = max(MIN_DEMAND_WINDOW_S, now_s - self.finished_lengths[0][0]) if self.finished_lengths else 1.0
        return bucket_token_demand([(p, o) for _, p, o in self.finished_lengths], bucket_edges, window_s)

    async def fetch_profiles(self, replicas: Sequence[str]) -> list[ReplicaProfile]:
        """Every replica's latency profile (GET /internal/v1/profile); ProfileError naming the first that has
        none or an unusable one."""

        async def one(replica: str) -> ReplicaProfile:
            try:
                answer = await self.client.get(f"{replica}/internal/v1/profile", timeout=5.0)
            except httpx.HTTPError as exc:
                raise ProfileError(f"replica {replica}: profile unreachable ({type(exc).__name__})") from None
            if answer.status_code != 200:
                raise ProfileError(f"replica {replica}: profile answered {answer.status_code}: {_message(answer)}")
            try:
                return ReplicaProfile.from_json(answer.json())
            except ValueError as exc:  # ProfileError, or a body that is not JSON
                raise ProfileError(f"replica {replica}: {exc}") from None

        return list(await asyncio.gather(*(one(r) for r in replicas)))

    async def replan_once(self, now_s: float | None = None) -> str | None:
        """Re-plan the lengthAware stages with the DP (stages.plan_stages) if due: the REPLAN_* outcome when an
        attempt was made, None when not (not lengthAware, disabled, within replan_interval_s of the last
        attempt, or the length distribution has not moved by replan_min_shift since the last DP plan)."""
        settings = self.settings
        if not isinstance(self.policy, LengthAwarePolicy) or self.plan is None or settings.replan_interval_s <= 0:
            return None
        now_s = time.monotonic() if now_s is None else now_s
        if self.last_replan_attempt_s is not None and now_s - self.last_replan_attempt_s < settings.replan_interval_s:
            return None
        self.last_replan_attempt_s = now_s
        if len(self.finished_lengths) < settings.replan_min_requests:
            return self._replan_outcome(m.REPLAN_TOO_FEW_LENGTHS)
        replicas = self.plan.replicas  # in stage order: a re-plan keeps the replicas' order (fewer moves)
        try:
            profiles = await self.fetch_profiles(replicas)
        except ProfileError as exc:
            log.warning("stages not re-planned, the current plan stays: %s", exc)
            return self._replan_outcome(m.REPLAN_BAD_PROFILE)
        edges = exponential_bucket_edges(min(p.max_context_tokens for p in profiles))
        demand = self.window_demand(edges, now_s)
        unmoved = self.planned_for is not None and self.planned_for[0] == edges
        if unmoved and demand_shift(self.planned_for[1], demand) < settings.replan_min_shift:  # type: ignore[index]
            return None
        # ~30 ms of pure Python for 16 replicas: off the event loop, so streams keep flowing meanwhile.
        plan = await asyncio.to_thread(plan_stages, replicas, edges, demand, pool_token_rate(profiles))
        if self.plan is None or self.plan.replicas != replicas:  # the pool changed meanwhile: plan again later
            return None
        self.planned_for = (edges, demand)
        if plan == self.plan:
            return self._replan_outcome(m.REPLAN_UNCHANGED)
        log.info("stages re-planned from %d finished requests: %s -> %s", len(self.finished_lengths), self.plan, plan)
        self._install_plan(plan)
        return self._replan_outcome(m.REPLAN_DONE)

    def _replan_outcome(self, outcome: str) -> str:
        self.metrics.stage_replans.labels(outcome).inc()
        return outcome

    async def adapt_forever(self) -> None:
        """Every refine interval: re-plan with the DP when due (replan_once), otherwise refine the boundaries."""
        settings = self.settings
        tick_s = settings.refine_interval_s or settings.replan_interval_s
        while tick_s > 0:
            await asyncio.sleep(tick_s)
            if not self.leadership.is_leader:
                continue  # followers route by the leader's plan (leader.adopt_published_plan)
            try:
                replanned = await self.replan_once() == m.REPLAN_DONE
            except Exception:  # a planning bug must not stop refinement, nor kill the router
                log.exception("stage re-planning failed; the current plan stays")
                replanned = False
            if not replanned and settings.refine_interval_s > 0:
                self.refine_once()

    async def discover_forever(self) -> None:
        while self.settings.pool_dns:
            self.set_endpoints(await asyncio.to_thread(resolve_pool, self.settings.pool_dns))
            await asyncio.sleep(DNS_REFRESH_S)

    # --- load polling -------------------------------------------------------------------------------------
    async def poll_once(self) -> None:
        async def one(endpoint: str) -> None:
            try:
                answer = await self.client.get(f"{endpoint}/internal/v1/load", timeout=2.0)
                answer.raise_for_status()
                data = answer.json()
            except (httpx.HTTPError, ValueError):
                self.up[endpoint] = False
                self.loads.pop(endpoint, None)
            else:
                self.up[endpoint] = True
                self.service_class.update(data.get("services", {}))
                self.loads[endpoint] = ReplicaLoad(endpoint, int(data["running"]), int(data["waiting"]),
                                                   int(data["kv_free_tokens"]), int(data["host_kv_free_tokens"]),
                                                   bool(data["admitting"]))  # fmt: skip
            self.metrics.replica_up.labels(endpoint).set(1 if self.up[endpoint] else 0)

        await asyncio.gather(*(one(e) for e in self.endpoints))
        for stage in self.plan.stages if self.plan else ():
            total = 0
            for replica in stage.replicas:
                load = self.loads.get(replica)
                queue = load.queue_length if load is not None else 0
                total += queue
                self.metrics.replica_queue.labels(replica, str(stage.index)).set(queue)
            self.metrics.stage_queue.labels(str(stage.index)).set(total)

    async def poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.settings.poll_interval_s)

    def current_loads(self) -> list[ReplicaLoad]:
        # A replica never polled yet (router just started) counts as empty and up: better than refusing work.
        return [self.loads.get(e) or ReplicaLoad(e, 0, 0, 1 << 40, 1 << 40) for e in self.endpoints
                if self.up.get(e, True) or e not in self.loads]  # fmt: skip

    # --- routing ------------------------------------------------------------------------------------------
    async def open(self, payload: dict[str, Any], length_tokens: int, service_class: str,
                   client_authorization: str | None) -> tuple[str, httpx.Response] | JSONResponse:  # fmt: skip
        """Start the request on the first candidate that takes it; a JSON error response if none does."""
        headers = {CLIENT_AUTHORIZATION_HEADER: client_authorization} if client_authorization else {}
        candidates = self.policy.candidates(length_tokens, service_class, self.current_loads())
        last_refusal: httpx.Response | None = None
        unreachable: list[str] = []
        for replica in candidates:
            request = self.client.build_request("POST", f"{replica}/internal/v1/generate", json=payload,
                                                headers=headers)  # fmt: skip
            try:
                answer = await self.client.send(request, stream=True)
            except httpx.HTTPError:
                self.up[replica] = False
                unreachable.append(replica)
                continue
            if answer.status_code == 200:
                return replica, answer
            await answer.aread()
            await answer.aclose()
            if answer.status_code == 429:
                self.metrics.retries.inc()
                last_refusal = answer
                continue
            if answer.status_code == 503:  # not ready or draining: another replica may take it
                unreachable.append(replica)
                continue
            self.metrics.requests.labels("failed").inc()
            return error_response(answer.status_code, _message(answer), code=_code(answer))
        if last_refusal is not None:
            self.metrics.requests.labels("rejected").inc()
            return error_response(429, f"every replica of the pool refused the request: {_message(last_refusal)}",
                                 code=_code(last_refusal), err_type="rate_limit_error",
                                 headers={"Retry-After": last_refusal.headers.get("retry-after", "1")})  # fmt: skip
        self.metrics.requests.labels("failed").inc()
        return error_response(503, f"no replica of the pool could take the request (unreachable or not ready: "
                                  f"{', '.join(unreachable) or 'none configured'})",
                             err_type="service_unavailable")  # fmt: skip

    async def lines(self, replica: str, answer: httpx.Response, request_id: str,
                    service_class: str) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """The request's NDJSON lines, across migrations; ReplicaLost if its replica stops answering."""
        migrating: list[asyncio.Task[None]] = []
        try:
            while True:
                moved_to: str | None = None
                try:
                    async for raw in answer.aiter_lines():
                        if not raw:
                            continue
                        line = json.loads(raw)
                        if "migrated_to" in line:
                            moved_to = line["migrated_to"]
                            break
                        yield line
                        if line["finished"]:
                            self.observe_finished(int(line["num_prompt_tokens"]), int(line["num_output_tokens"]))
                            return
                        length = line["num_prompt_tokens"] + line["num_output_tokens"]
                        self.lengths[request_id] = length
                        if self.leadership.is_leader and not any(not t.done() for t in migrating):
                            target = self.policy.migration_target(length, replica, self.current_loads(),
                                                                  self.in_flight_migrations, service_class)  # fmt: skip
                            if target is not None and target != replica:
                                migrating.append(asyncio.create_task(self.migrate(replica, target, request_id)))
                except httpx.HTTPError as exc:
                    raise ReplicaLost(f"replica {replica} stopped answering mid-stream ({type(exc).__name__})") from exc
                finally:
                    await answer.aclose()
                if moved_to is None:
                    raise ReplicaLost(f"replica {replica} ended the stream without finishing the request")
                replica = moved_to
                try:
                    answer = await self.client.send(
                        self.client.build_request("GET", f"{replica}/internal/v1/requests/{request_id}/stream"),
                        stream=True,
                    )  # fmt: skip
                except httpx.HTTPError as exc:
                    raise ReplicaLost(f"migration target {replica} is unreachable after the hand-over") from exc
                if answer.status_code != 200:
                    await answer.aclose()
                    raise ReplicaLost(f"migration target {replica} has no stream for the request")
        finally:
            self.lengths.pop(request_id, None)
            for task in migrating:
                if not task.done():
                    task.cancel()

    async def migrate(self, source: str, target: str, request_id: str) -> None:
        self.in_flight_migrations += 1
        try:
            answer = await self.client.post(f"{source}/internal/v1/requests/{request_id}/migrate",
                                            json={"target": target}, timeout=30.0)  # fmt: skip
            outcome = answer.json().get("outcome", m.MIGRATION_FAILED)
        except (httpx.HTTPError, ValueError):
            outcome = m.MIGRATION_FAILED
        finally:
            self.in_flight_migrations -= 1
        self.metrics.migrations.labels(outcome).inc()
        log.info("migration of %s from %s to %s: %s", request_id, source, target, outcome)


def _message(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return answer.text[:300]


def _code(answer: httpx.Response) -> str | None:
    try:
        return answer.json()["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def estimate_prompt_tokens(kind: str, body: dict[str, Any]) -> int:
    """The prompt's length for stage choice: exact for token-id prompts, estimated from bytes for text."""
    if kind == "completions":
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        text = json.dumps(prompt, ensure_ascii=False)
    else:
        text = json.dumps(body.get("messages", []), ensure_ascii=False)
    return max(1, len(text.encode()) // BYTES_PER_TOKEN_ESTIMATE)


def _router(http: Request) -> Router:
    router: Router = http.app.state.router
    return router


async def _start_background_loops(http: Request, call_next: Any) -> Response:
    # Lazily on the server's loop: the first request (a probe) starts the poller, discovery, the stage
    # adaptation and the leadership loop, once.
    router, tasks = _router(http), http.app.state.background_tasks
    if not tasks:
        for loop in (router.poll_forever(), router.discover_forever(), router.adapt_forever(),
                     run_leadership(router, router.leadership)):  # fmt: skip
            tasks.add(asyncio.create_task(loop))
    response: Response = await call_next(http)
    return response


async def healthz() -> JSONResponse:
    return JSONResponse(health_body("ok"))


async def readyz(http: Request) -> JSONResponse:
    router = _router(http)
    await router.poll_once()
    up = [e for e, ok in router.up.items() if ok]
    return JSONResponse(health_body("ready" if up else "no replica up", replicas_up=up),
                        status_code=200 if up else 503)  # fmt: skip


async def metrics(http: Request) -> Response:
    return Response(_router(http).metrics.render(), media_type="text/plain; version=0.0.4")


async def models(http: Request) -> Response:
    router = _router(http)
    headers = {"authorization": http.headers["authorization"]} if "authorization" in http.headers else {}
    for endpoint in router.endpoints:
        with contextlib.suppress(httpx.HTTPError):
            answer = await router.client.get(f"{endpoint}/v1/models", headers=headers, timeout=5.0)
            return Response(answer.content, status_code=answer.status_code, media_type="application/json")
    return error_response(503, "no replica of the pool answers", err_type="service_unavailable")


async def _relay(kind: str, http: Request) -> Response:
    """One client request of either OpenAI kind: route, relay (streaming or one body), count the outcome."""
    router = _router(http)
    try:
        body = await http.json()
    except ValueError:
        return error_response(400, "the body is not JSON")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return error_response(400, "the body must be a JSON object with a `model`", code="invalid_request")
    stream = bool(body.get("stream"))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    service_class = router.service_class.get(body["model"], "LS")
    length = estimate_prompt_tokens(kind, body)
    opened = await router.open({**body, "kind": kind, "request_id": request_id}, length, service_class,
                               http.headers.get("authorization"))  # fmt: skip
    if isinstance(opened, JSONResponse):
        return opened
    replica, answer = opened
    lines = router.lines(replica, answer, request_id, service_class)
    created = int(time.time())
    if stream:
        return StreamingResponse(_sse(lines, kind, request_id, created, body["model"], include_usage, router),
                                 media_type="text/event-stream")  # fmt: skip
    text, last = "", None
    try:
        async for line in lines:
            text += line["text"]
            last = line
    except ReplicaLost as exc:
        router.metrics.requests.labels("failed").inc()
        return error_response(502, f"The request failed: {exc}", err_type="server_error", code="replica_lost")
    assert last is not None
    if last["finish_reason"] not in ("stop", "length"):
        router.metrics.requests.labels("failed").inc()
        return error_response(500, f"The runtime failed this request: {last['error'] or last['finish_reason']}",
                              code="engine_error")  # fmt: skip
    router.metrics.requests.labels("completed").inc()
    return JSONResponse(completion_body(request_id, kind == "chat", created, body["model"], text,
                                        last["finish_reason"], _usage(last)))  # fmt: skip


async def completions(http: Request) -> Response:
    return await _relay("completions", http)


async def chat_completions(http: Request) -> Response:
    return await _relay("chat", http)


def create_router_app(router: Router) -> FastAPI:
    """The router's HTTP app: module-level handlers wired here, the router in `app.state` (as the server does)."""
    app = FastAPI(title="Piggyback pool router")
    app.state.router = router
    app.state.background_tasks = set()
    app.middleware("http")(_start_background_loops)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def _usage(line: dict[str, Any]) -> dict[str, int]:
    return usage(int(line["num_prompt_tokens"]), int(line["num_output_tokens"]))


async def _sse(lines: AsyncIterator[dict[str, Any]], kind: str, request_id: str, created: int, model: str,
               include_usage: bool, router: Router) -> AsyncIterator[str]:  # fmt: skip
    chat = kind == "chat"

    def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
        return stream_chunk(request_id, chat, created, model, choice, include_usage, usage)

    def error(message: str, code: str) -> str:
        return sse_error(message, "server_error", code)

    if chat:
        yield event(chat_role_choice())
    last: dict[str, Any] | None = None
    try:
        async for line in lines:
            last = line
            failed = line["finished"] and line["finish_reason"] not in ("stop", "length")
            if line["text"] or (line["finished"] and not failed):
                finish = line["finish_reason"] if line["finished"] and not failed else None
                yield event(stream_choice(chat, line["text"], finish))
            if failed:
                router.metrics.requests.labels("failed").inc()
                yield error(f"The runtime failed this request: {line['error'] or line['finish_reason']}",
                            "engine_error")  # fmt: skip
                yield SSE_DONE
                return
    except ReplicaLost as exc:
        router.metrics.requests.labels("failed").inc()
        yield error(f"The request failed: {exc}", "replica_lost")
        yield SSE_DONE
        return
    router.metrics.requests.labels("completed").inc()
    if include_usage and last is not None:
        yield event(None, _usage(last))
    yield SSE_DONE


def run_router(settings: RouterSettings, host: str, port: int, leadership: Leadership | None = None) -> None:
    import uvicorn

    router = Router(settings, leadership=leadership or Standalone())
    uvicorn.run(create_router_app(router), host=host, port=port, log_level="info")


def parse_endpoints(text: str) -> tuple[str, ...]:
    return tuple(e.strip().rstrip("/") for e in text.split(",") if e.strip())


def parse_boundaries(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        message = f"--stage-boundaries takes comma-separated token counts, e.g. 2048,16384; got {text!r}"
        raise ValueError(message) from None


def settings_from(endpoints: str | None, policy: str, boundaries: str | None, poll_interval_s: float,
                  token: str, pool_dns: str | None = None, **adaptation: Any) -> RouterSettings:  # fmt: skip
    """adaptation: RouterSettings' refine/replan fields given on the command line (None: the default)."""
    given = {name: value for name, value in adaptation.items() if value is not None}
    return RouterSettings(parse_endpoints(endpoints or ""), policy, parse_boundaries(boundaries), poll_interval_s,
                          token, pool_dns=pool_dns or "", **given)  # fmt: skip


__all__: Sequence[str] = ("Router", "RouterSettings", "create_router_app", "run_router", "settings_from")
