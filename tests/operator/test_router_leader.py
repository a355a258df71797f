"""One decision-maker among a pool's routers (runtime/piggyback_runtime/router/leader.py).

Specification:
- The first router to find no Lease creates it and leads; the others follow and read the leader's plan from it.
- A follower takes over only once the Lease has not changed for its duration, as seen on its own clock; of
  two racing for it, one wins (compare-and-swap on resourceVersion).
- A leader that cannot renew steps down after its renew deadline, before any follower may take over.
- Without Kubernetes (no API server, no service account token) a router is its own leader.
- Against the emulated API server, with real `piggyback router` processes: the second router follows and
  routes by the first's published stage boundaries (it was started with others, as if the leader had
  re-planned); the leader killed, the follower takes over after the Lease expires and keeps those boundaries;
  a router started later follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import yaml
from emulated_apiserver import ApiServer

from piggyback_operator import pools
from piggyback_operator.api import LLMServiceSpec
from piggyback_runtime.client import free_port
from piggyback_runtime.router.app import Router, RouterSettings
from piggyback_runtime.router.leader import (
    ANNOTATION_PLAN,
    LEASE_RBAC_RULE,
    ElectionSettings,
    KubernetesLeaseStore,
    LeaderElector,
    LeaseConflict,
    LeaseError,
    LeaseRecord,
    Standalone,
    adopt_published_plan,
    decode_plan,
    encode_plan,
    make_leadership,
)

NAMESPACE = "serving"
LEASE = "chat-pool-router"
LEASES = "coordination.k8s.io/v1/leases"


class MemoryLeaseStore:
    """The API server's Lease semantics in memory: resourceVersion bumps on every write, stale writes conflict."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.failing = False

    def _check(self) -> None:
        if self.failing:
            raise LeaseError("API server unreachable")

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.record = replace(record, resource_version=str(self.version))
        return self.record

    async def get(self) -> LeaseRecord | None:
        self._check()
        return self.record

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        self._check()
        if self.record is not None:
            raise LeaseConflict("exists")
        return self._store(record)

    async def replace(self, record: LeaseRecord) -> LeaseRecord:
        self._check()
        if self.record is None or record.resource_version != self.record.resource_version:
            raise LeaseConflict("stale resourceVersion")
        return self._store(record)


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def elector(store: MemoryLeaseStore, name: str, clock: Clock) -> LeaderElector:
    return LeaderElector(store, name, lease_duration_s=15, renew_deadline_s=10, retry_s=2, clock=clock)


async def test_the_first_router_leads_and_the_others_follow_reading_its_plan() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    assert await a.step({ANNOTATION_PLAN: "plan-of-a"}) is True
    assert await b.step({ANNOTATION_PLAN: "plan-of-b"}) is False
    assert store.record is not None and store.record.holder == "a"
    assert b.published()[ANNOTATION_PLAN] == "plan-of-a"
    clock.now_s += 2
    assert await a.step({ANNOTATION_PLAN: "replanned"}) is True  # renewal publishes the leader's current plan
    assert await b.step({ANNOTATION_PLAN: "plan-of-b"}) is False
    assert b.published()[ANNOTATION_PLAN] == "replanned"


async def test_a_follower_takes_over_only_after_the_lease_went_unrenewed_for_its_duration() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    await a.step({})
    await b.step({})  # b first sees the Lease now
    clock.now_s += 14.9  # a died right after its last renewal
    assert await b.step({}) is False
    clock.now_s += 0.1
    assert await b.step({}) is True
    assert store.record is not None and (store.record.holder, store.record.transitions) == ("b", 1)


async def test_renewals_keep_followers_waiting() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    await a.step({})
    await b.step({})
    for _ in range(20):
        clock.now_s += 2
        assert await a.step({}) is True
        assert await b.step({}) is False


async def test_of_two_followers_racing_for_an_expired_lease_one_wins() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    a, b, c = elector(store, "a", clock), elector(store, "b", clock), elector(store, "c", clock)
    await a.step({})
    await b.step({})
    await c.step({})
    clock.now_s += 20
    first_read = store.get

    async def both_read_before_either_writes() -> LeaseRecord | None:
        record = await first_read()
        await asyncio.sleep(0)
        return record

    store.get = both_read_before_either_writes  # type: ignore[method-assign]
    results = await asyncio.gather(b.step({}), c.step({}))
    assert sorted(results) == [False, True]
    assert store.record is not None and store.record.holder in ("b", "c") and store.record.transitions == 1


async def test_a_leader_that_cannot_renew_steps_down_before_the_lease_expires_for_others() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    await a.step({})
    await b.step({})
    store.failing = True
    clock.now_s += 9.9
    assert await a.step({}) is True  # within its renew deadline it may still act
    clock.now_s += 0.1
    assert await a.step({}) is False  # 10 s without renewal: it stops deciding...
    store.failing = False
    clock.now_s += 4.9
    assert await b.step({}) is False  # ...while the Lease is still a's for another 5 s
    clock.now_s += 0.1
    assert await b.step({}) is True


async def test_a_released_lease_is_taken_at_once() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    a, b = elector(store, "a", clock), elector(store, "b", clock)
    await a.step({})
    await b.step({})
    await a.release()
    assert await b.step({}) is True


def test_timings_that_could_give_two_leaders_are_refused() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderElector(MemoryLeaseStore(), "a", lease_duration_s=10, renew_deadline_s=10)
    with pytest.raises(ValueError, match="retry period"):
        LeaderElector(MemoryLeaseStore(), "a", lease_duration_s=10, renew_deadline_s=5, retry_s=5)


def test_without_kubernetes_a_router_is_its_own_leader(tmp_path: Path) -> None:
    leadership, why = make_leadership(ElectionSettings(), "chat-pool-replicas.serving.svc:8000", env={},
                                      service_account=tmp_path)  # fmt: skip
    assert isinstance(leadership, Standalone) and leadership.is_leader and "no Kubernetes API" in why
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    leadership, why = make_leadership(ElectionSettings(), "chat-pool-replicas.serving.svc:8000", env=in_cluster,
                                      service_account=tmp_path)  # fmt: skip
    assert isinstance(leadership, Standalone) and "no service account token" in why


def test_in_a_cluster_the_lease_is_named_after_the_pools_router(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret")
    (tmp_path / "namespace").write_text("elsewhere")
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    leadership, why = make_leadership(ElectionSettings(), "chat-pool-replicas.serving.svc:8000", env=in_cluster,
                                      service_account=tmp_path)  # fmt: skip
    assert isinstance(leadership, LeaderElector)
    assert isinstance(leadership.store, KubernetesLeaseStore)
    assert leadership.store.collection == "https://10.0.0.1:443/apis/coordination.k8s.io/v1/namespaces/serving/leases"
    assert leadership.store.name == LEASE and f"Lease serving/{LEASE}" in why


def test_the_rbac_the_router_needs_matches_the_calls_it_makes() -> None:
    assert LEASE_RBAC_RULE == {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                               "verbs": ["get", "create", "patch"]}  # fmt: skip


def test_a_follower_adopts_the_leaders_plan_once_it_knows_the_same_replicas() -> None:
    replicas = ("http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000")
    leader = Router(RouterSettings(replicas, "lengthAware", (100,)))
    follower = Router(RouterSettings(replicas, "lengthAware", (500,)))
    published = {ANNOTATION_PLAN: encode_plan(leader.plan)}  # type: ignore[arg-type]
    assert decode_plan(published[ANNOTATION_PLAN]) == leader.plan
    assert adopt_published_plan(follower, published) is True
    assert follower.plan == leader.plan and follower.policy.plan == leader.plan  # type: ignore[attr-defined]
    assert adopt_published_plan(follower, published) is False  # already
    elsewhere = Router(RouterSettings(replicas[:2], "lengthAware", (500,)))
    assert adopt_published_plan(elsewhere, published) is False and elsewhere.plan != leader.plan


# --- against the emulated API server ------------------------------------------------------------------------


@pytest.fixture
async def leases_api() -> AsyncIterator[tuple[ApiServer, str]]:
    async with ApiServer() as api, kmock.Server(api) as server:
        api.resources[LEASES] = kmock.ResourceInfo(kind="Lease", namespaced=True,
                                                   verbs={"get", "list", "watch", "create", "patch"})  # fmt: skip
        yield api, f"http://127.0.0.1:{server.port}"


@pytest.mark.slow  # starts a process
async def test_the_kubernetes_store_creates_reads_and_refuses_a_stale_write(leases_api: tuple[ApiServer, str]) -> None:
    api, url = leases_api
    store = KubernetesLeaseStore(url, NAMESPACE, LEASE)
    try:
        assert await store.get() is None
        created = await store.create(LeaseRecord("a", 15, annotations={ANNOTATION_PLAN: "[]"}))
        assert created.resource_version and (await store.get()) == created
        renewed = await store.replace(replace(created, renew_time="2026-01-01T00:00:00.000000Z"))
        assert renewed.resource_version != created.resource_version
        with pytest.raises(LeaseConflict):
            await store.replace(replace(created, holder="b"))  # written against the old version
        with pytest.raises(LeaseConflict):
            await store.create(LeaseRecord("b", 15))
        live = api.live(LEASES, NAMESPACE, LEASE)
        assert live is not None and live["spec"]["holderIdentity"] == "a"
        assert live["metadata"]["annotations"][ANNOTATION_PLAN] == "[]"
    finally:
        await store.close()
    verbs = {(c.method, c.path.rsplit("/", 1)[-1]) for c in api.calls}
    assert verbs == {("GET", LEASE), ("POST", "leases"), ("PATCH", LEASE)}  # get, create, patch: LEASE_RBAC_RULE


# --- two router processes, one killed -------------------------------------------------------------------------

# Replicas nobody serves: the routers mark them down, but plan stages over them all the same.
REPLICAS = ",".join(f"http://127.0.0.1:{port}" for port in (9, 19, 29))


class RouterProcess:
    def __init__(self, tmp: Path, api_url: str, boundary: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / f"router-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "piggyback_runtime.cli", "router", "--pool-endpoints", REPLICAS,
             "--policy", "lengthAware", "--stage-boundaries", str(boundary), "--refine-interval-s", "0",
             "--replan-interval-s", "0", "--host", "127.0.0.1", "--port", str(self.port),
             "--kube-api", api_url, "--leader-lease", LEASE, "--leader-namespace", NAMESPACE,
             "--lease-duration-s", "3", "--lease-renew-deadline-s", "2", "--lease-retry-s", "0.25"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "KUBERNETES_SERVICE_HOST": ""},
        )  # fmt: skip

    async def metrics(self) -> dict[str, float]:
        """The router's metrics, {'name{labels}': value}; empty until it answers (the first request also starts
        its background loops, the election among them)."""
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"{self.url}/metrics", timeout=2)).text
            return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines() if line and not line.startswith("#")}  # fmt: skip
        return {}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


def boundary_and_leader(metrics: dict[str, Any]) -> tuple[float | None, float | None]:
    return metrics.get('piggyback_router_stage_upper_tokens{stage="0"}'), metrics.get("piggyback_router_leader")


@pytest.mark.slow
async def test_two_routers_one_leader_killed_the_follower_takes_over_with_the_same_boundaries(
    leases_api: tuple[ApiServer, str], tmp_path: Path
) -> None:
    api, url = leases_api
    routers: list[RouterProcess] = []
    try:
        first = RouterProcess(tmp_path, url, boundary=100)
        routers.append(first)
        assert await _until(first, (100.0, 1.0)), "the first router never led"
        holder = api.live(LEASES, NAMESPACE, LEASE)["spec"]["holderIdentity"]  # type: ignore[index]

        second = RouterProcess(tmp_path, url, boundary=500)  # as if the leader had re-planned to 100
        routers.append(second)
        assert await _until(second, (100.0, 0.0)), "the second router did not follow the leader's boundaries"

        first.kill()
        # Within a lease duration (3 s) plus a few rounds, the follower leads, with the boundaries it followed.
        assert await _until(second, (100.0, 1.0)), "the follower never took over"
        lease = api.live(LEASES, NAMESPACE, LEASE)
        assert lease is not None and lease["spec"]["holderIdentity"] != holder
        assert lease["spec"]["leaseTransitions"] == 1
        assert decode_plan(lease["metadata"]["annotations"][ANNOTATION_PLAN]).boundaries == (100,)

        third = RouterProcess(tmp_path, url, boundary=900)
        routers.append(third)
        assert await _until(third, (100.0, 0.0)), "a router started later did not follow the new leader"
        assert boundary_and_leader(await second.metrics()) == (100.0, 1.0)
    finally:
        for router in routers:
            router.kill()


async def _until(router: RouterProcess, expected: tuple[float, float], timeout_s: float = 60.0) -> bool:
    """Whether the router's (stage-0 upper bound, leader) reaches `expected` within the timeout."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if router.process.poll() is not None:
            raise AssertionError(f"router exited with {router.process.returncode}")
        if boundary_and_leader(await router.metrics()) == expected:
            return True
        await asyncio.sleep(0.2)
    return False


def test_the_router_cluster_role_grants_exactly_what_the_election_uses() -> None:
    """manifests/base/router-rbac.yaml is what the operator binds each pool router's ServiceAccount to."""
    role = yaml.safe_load((Path(__file__).resolve().parents[2] / "manifests/base/router-rbac.yaml").read_text())
    assert role["metadata"]["name"] == pools.ROUTER_CLUSTER_ROLE
    assert role["rules"] == [LEASE_RBAC_RULE]


def test_the_operator_gives_each_pool_router_an_account_bound_to_the_lease_role() -> None:
    chat = pools.Member("chat", "ns", "uid-chat", LLMServiceSpec.model_validate({
        "model": {"uri": "synthetic://tiny-llama"}, "class": "LS", "replicas": 2,
        "slo": {"ttftMs": 1000, "tpotMs": 100}, "placement": {"pool": "p", "routing": "lengthAware"}}),
        True, False, "chat")  # fmt: skip
    children = {c["kind"]: c for c in pools.render_router("p", "ns", [chat], 2)}
    deployment = children["Deployment"]["spec"]["template"]["spec"]
    binding = children["RoleBinding"]
    assert deployment["serviceAccountName"] == children["ServiceAccount"]["metadata"]["name"] == "p-router"
    assert deployment["automountServiceAccountToken"] is True
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": pools.ROUTER_CLUSTER_ROLE}  # fmt: skip
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "p-router", "namespace": "ns"}]
    assert deployment["containers"][0]["image"] == pools.router_image()
