"""Routing policies for a pool's replicas: where a request goes, and whether a running one should move.

Each policy answers two questions from the replicas' last reported loads (`ReplicaLoad`), without a central
coordinator: every decision reads only the loads of the replica concerned and its stage neighbours.
- candidates(length, class, loads): replicas to try for a new request, best first. The router tries them in
  order; a replica's own admission control is authoritative (loads may be stale), so a replica that reports
  it is not admitting goes last rather than away, and a 429 is passed on only after every candidate said no.
  LS: admitting replicas whose device KV fits the request first. BE: replicas whose host KV fits it first,
  most host KV free first (BE decode attention runs on the host, so GPU length mixing does not matter).
- migration_target(length, current, loads, in_flight): a replica to live-migrate a running request to, or
  None. At most `max_in_flight_migrations` at once (3, as L4).

Policies, registered by name in POLICIES:
- roundRobin: rotation, no migration (what a Kubernetes Service does).
- leastLoaded: shortest queue (running + waiting) first; Llumnix-style migration from a replica with waiting
  requests to one whose queue is `rebalance_queue_gap` shorter.
- lengthAware: L4's stages (router/stages.py). A request enters the stage holding its length; a running
  request that crosses its stage's upper bound by the hysteresis margin moves to the next stage. Rebalancing
  is decentralised: within a stage, as leastLoaded between the stage's replicas; across stages, a congested
  stage sends new requests and its longer running requests (past the middle of its range) to the next stage
  when that stage's queue is `rebalance_queue_gap` shorter. Only downstream: a downstream replica serves
  shorter requests correctly (at some mixing cost), whereas an upstream one would have to send them back.

No ping-pong, by construction: across stages requests only ever move downstream (lengths only grow, and no
rule moves one upstream), and a within-stage move needs the source to have waiting requests and a queue
longer than the target's by at least `rebalance_queue_gap` (≥ 2), which one move cannot reverse.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from piggyback_runtime.router.stages import Stage, StagePlan

SERVICE_CLASSES = ("LS", "BE")
DEFAULT_MAX_IN_FLIGHT_MIGRATIONS = 3  # L4 caps concurrent KV transfers at 3
DEFAULT_REBALANCE_QUEUE_GAP = 4  # requests; smaller gaps migrate on noise
DEFAULT_HYSTERESIS_FRACTION = 0.05  # of the upper bound: a request moves once it is this far past it


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's last reported state (its /metrics or the simulator's)."""

    replica: str
    running: int
    waiting: int
    kv_free_tokens: int
    host_kv_free_tokens: int = 0
    admitting: bool = True

    @property
    def queue_length(self) -> int:
        """L4's load signal: every request the replica holds."""
        return self.running + self.waiting


def _check_class(service_class: str) -> None:
    if service_class not in SERVICE_CLASSES:
        raise ValueError(f"service_class must be one of {', '.join(SERVICE_CLASSES)}, got {service_class!r}")


def _by_name(loads: Sequence[ReplicaLoad]) -> dict[str, ReplicaLoad]:
    return {load.replica: load for load in loads}


def _fits(load: ReplicaLoad, length_tokens: int, service_class: str) -> bool:
    if service_class == "BE":
        return load.host_kv_free_tokens >= length_tokens
    return load.admitting and load.kv_free_tokens >= length_tokens


def _be_order(loads: Sequence[ReplicaLoad], length_tokens: int) -> list[str]:
    """BE: replicas whose host KV fits the request, most host KV free first, then the rest likewise."""
    ordered = sorted(loads, key=lambda x: (not _fits(x, length_tokens, "BE"), -x.host_kv_free_tokens, x.queue_length))
    return [x.replica for x in ordered]


def _admission_order(ordered: Sequence[ReplicaLoad], length_tokens: int) -> list[str]:
    """LS: keep the policy's order, but replicas that can take the request now go before those that cannot."""
    return [x.replica for x in sorted(ordered, key=lambda x: not _fits(x, length_tokens, "LS"))]


class RoutingPolicy:
    name = ""

    def __init__(self, max_in_flight_migrations: int = DEFAULT_MAX_IN_FLIGHT_MIGRATIONS,
                 rebalance_queue_gap: int = DEFAULT_REBALANCE_QUEUE_GAP) -> None:  # fmt: skip
        if max_in_flight_migrations < 0:
            raise ValueError(f"max_in_flight_migrations must be >= 0, got {max_in_flight_migrations}")
        if rebalance_queue_gap < 2:
            raise ValueError(f"rebalance_queue_gap must be >= 2 (a gap of 1 lets two replicas swap a request back "
                             f"and forth), got {rebalance_queue_gap}")  # fmt: skip
        self.max_in_flight_migrations = max_in_flight_migrations
        self.rebalance_queue_gap = rebalance_queue_gap

    def candidates(self, length_tokens: int, service_class: str, loads: Sequence[ReplicaLoad]) -> list[str]:
        raise NotImplementedError

    def migration_target(
        self, request_length_tokens: int, current_replica: str, loads: Sequence[ReplicaLoad],
        in_flight_migrations: int, service_class: str = "LS",
    ) -> str | None:  # fmt: skip
        return None

    def _rebalance_within(
        self, length_tokens: int, current: ReplicaLoad, peers: Sequence[ReplicaLoad], service_class: str
    ) -> str | None:
        """Move off a replica with waiting requests to a peer whose queue is rebalance_queue_gap shorter."""
        if current.waiting <= 0:
            return None
        fitting = [p for p in peers if p.replica != current.replica and _fits(p, length_tokens, service_class)]
        if not fitting:
            return None
        target = min(fitting, key=lambda p: (p.queue_length, p.replica))
        return target.replica if current.queue_length - target.queue_length >= self.rebalance_queue_gap else None


class RoundRobinPolicy(RoutingPolicy):
    name = "roundRobin"

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self._counter = itertools.count()

    def candidates(self, length_tokens: int, service_class: str, loads: Sequence[ReplicaLoad]) -> list[str]:
        _check_class(service_class)
        if not loads:
            return []
        start = next(self._counter) % len(loads)
        rotated = [*loads[start:], *loads[:start]]
        if service_class == "BE":
            return [x.replica for x in sorted(rotated, key=lambda x: not _fits(x, length_tokens, "BE"))]
        return _admission_order(rotated, length_tokens)


class LeastLoadedPolicy(RoutingPolicy):
    name = "leastLoaded"

    def candidates(self, length_tokens: int, service_class: str, loads: Sequence[ReplicaLoad]) -> list[str]:
        _check_class(service_class)
        if service_class == "BE":
            return _be_order(loads, length_tokens)
        return _admission_order(sorted(loads, key=lambda x: (x.queue_length, -x.kv_free_tokens, x.replica)),
                                length_tokens)  # fmt: skip

    def migration_target(
        self, request_length_tokens: int, current_replica: str, loads: Sequence[ReplicaLoad],
        in_flight_migrations: int, service_class: str = "LS",
    ) -> str | None:  # fmt: skip
        _check_class(service_class)
        current = _by_name(loads).get(current_replica)
        if current is None or in_flight_migrations >= self.max_in_flight_migrations:
            return None
        return self._rebalance_within(request_length_tokens, current, loads, service_class)


class LengthAwarePolicy(RoutingPolicy):
    name = "lengthAware"

    def __init__(self, plan: StagePlan, hysteresis_fraction: float = DEFAULT_HYSTERESIS_FRACTION,
                 **kwargs: int) -> None:  # fmt: skip
        super().__init__(**kwargs)
        if not 0 <= hysteresis_fraction < 1:
            raise ValueError(f"hysteresis_fraction must be in [0, 1), got {hysteresis_fraction}")
        self.plan = plan
        self.hysteresis_fraction = hysteresis_fraction

    def _stage_loads(self, stage: Stage, by_name: dict[str, ReplicaLoad]) -> list[ReplicaLoad]:
        return [by_name[r] for r in stage.replicas if r in by_name]

    def _congested_towards(self, stage: Stage, by_name: dict[str, ReplicaLoad]) -> Stage | None:
        """The next stage, if its least-loaded replica's queue is rebalance_queue_gap shorter than this stage's."""
        following = self.plan.next_stage(stage)
        here, there = self._stage_loads(stage, by_name), self._stage_loads(following, by_name) if following else []
        if not here or not there:
            return None
        gap = min(x.queue_length for x in here) - min(x.queue_length for x in there)
        return following if gap >= self.rebalance_queue_gap else None

    def candidates(self, length_tokens: int, service_class: str, loads: Sequence[ReplicaLoad]) -> list[str]:
        _check_class(service_class)
        if service_class == "BE":
            return _be_order(loads, length_tokens)
        by_name = _by_name(loads)
        entry = self.plan.stage_for(length_tokens)
        spill = self._congested_towards(entry, by_name)
        # Stages in the order to try: entry (or the next one first when the entry is congested), then the
        # rest downstream, then upstream last (a request there would have to be migrated straight away).
        downstream = list(self.plan.stages[entry.index:])
        if spill is not None:
            downstream[0], downstream[1] = downstream[1], downstream[0]
        order = downstream + list(reversed(self.plan.stages[:entry.index]))
        ordered: list[ReplicaLoad] = []
        for stage in order:
            ordered += sorted(self._stage_loads(stage, by_name), key=lambda x: (x.queue_length, x.replica))
        # Replicas the plan does not know (e.g. just added) go last; they are still usable.
        ordered += [x for x in loads if self.plan.stage_of(x.replica) is None]
        return _admission_order(ordered, length_tokens)

    def migration_target(
        self, request_length_tokens: int, current_replica: str, loads: Sequence[ReplicaLoad],
        in_flight_migrations: int, service_class: str = "LS",
    ) -> str | None:  # fmt: skip
        _check_class(service_class)
        if in_flight_migrations >= self.max_in_flight_migrations or service_class == "BE":
            return None  # BE attention runs on the host: length mixing does not slow the GPU
        by_name = _by_name(loads)
        current = by_name.get(current_replica)
        stage = self.plan.stage_of(current_replica)
        if current is None or stage is None:
            return None
        following = self.plan.next_stage(stage)
        if following is not None:
            assert stage.upper_tokens is not None
            crossed = request_length_tokens >= stage.upper_tokens * (1 + self.hysteresis_fraction)
            past_middle = request_length_tokens >= (stage.lower_tokens + stage.upper_tokens) / 2
            if crossed or (past_middle and self._congested_towards(stage, by_name) is not None):
                targets = [x for x in self._stage_loads(following, by_name)
                           if _fits(x, request_length_tokens, "LS")]  # fmt: skip
                if targets:
                    return min(targets, key=lambda x: (x.queue_length, x.replica)).replica
                if crossed:
                    return None  # the next stage is full: stay (correct, only slower) rather than go elsewhere
        return self._rebalance_within(request_length_tokens, current, self._stage_loads(stage, by_name), "LS")


POLICIES: dict[str, type[RoutingPolicy]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadedPolicy.name: LeastLoadedPolicy,
    LengthAwarePolicy.name: LengthAwarePolicy,
}


def make_policy(name: str, plan: StagePlan | None = None, **kwargs: float) -> RoutingPolicy:
    """A policy by its registered name; lengthAware needs a plan (plan_stages, or stages.single_stage)."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; expected one of {', '.join(POLICIES)}")
    if name == LengthAwarePolicy.name:
        if plan is None:
            raise ValueError("the lengthAware policy needs a StagePlan (router.stages.plan_stages)")
        return LengthAwarePolicy(plan, **kwargs)  # type: ignore[arg-type]
    return POLICIES[name](**kwargs)  # type: ignore[arg-type]
