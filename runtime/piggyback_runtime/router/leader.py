"""One decision-maker among a pool's routers: leader election by a coordination.k8s.io Lease.

The operator runs two routers per pool (a restart never leaves the pool unreachable). Each adapts the stage
boundaries and starts live migrations from what it sees; two doing so independently diverge. So the routers
elect a leader by a Lease (`<pool>-router` in the pool's namespace), as client-go's leader election does:

- The leader renews the Lease every `retry_s` and writes the stage plan it routes by into the Lease's
  annotation `piggyback.dev/stage-plan`. It alone re-plans and refines the stages and starts migrations.
- A follower reads the Lease every `retry_s`, routes by the leader's published plan (once it knows the same
  replicas), starts no migration and does not re-plan. Requests it proxies follow a migration only if their
  runtime hands them over.
- Expiry is judged on the follower's own clock: the Lease is free once its record has not changed for
  `leaseDurationSeconds` since this router last saw it change (no comparison of clocks across machines).
  The takeover writes with the record's resourceVersion, so of two routers racing one wins and the other
  stays a follower (409 Conflict). The new leader starts from the plan it was following.
- A leader that cannot renew for `renew_deadline_s` (< the lease duration) steps down before any follower may
  take over, so two routers never both act as leader on a healthy clock.
- Without Kubernetes (no API server address or no service account token) the router is its own leader
  (standalone): what a router does alone, as before.

The Kubernetes calls sit behind `LeaseStore` (get, create, compare-and-swap replace); `KubernetesLeaseStore`
speaks the API over HTTP with the pod's service account. The router's RBAC: `get`, `create` and `patch` on
`leases` (group coordination.k8s.io) in its namespace (`LEASE_RBAC_RULE`).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from piggyback_runtime.router.policy import LengthAwarePolicy
from piggyback_runtime.router.stages import Stage, StagePlan

if TYPE_CHECKING:
    from piggyback_runtime.router.app import Router

log = logging.getLogger(__name__)

ANNOTATION_PLAN = "piggyback.dev/stage-plan"
# client-go's defaults: a lease of 15 s, renewed every 2 s, given up by its leader after 10 s without a renewal.
LEASE_DURATION_S = 15.0
RENEW_DEADLINE_S = 10.0
RETRY_S = 2.0
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# What the router's ServiceAccount must be granted in its namespace (a Role; the operator renders it).
LEASE_RBAC_RULE: dict[str, list[str]] = {
    "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"],
}  # fmt: skip
# The operator's headless Service of a pool's runtimes is `<pool>-replicas` (pools.replicas_service_name) and
# its router Deployment `<pool>-router`: the Lease takes the router's name.
REPLICAS_SERVICE_SUFFIX = "-replicas"
LEASE_SUFFIX = "-router"


class LeaseError(Exception):
    """The Lease could not be read or written (API server unreachable, refused, malformed answer)."""


class LeaseConflict(LeaseError):
    """Someone else wrote the Lease first (HTTP 409): the write did not happen."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    lease_duration_s: float
    transitions: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""  # "" until stored


class LeaseStore(Protocol):
    """The three calls leader election needs; `replace` succeeds only if `record.resource_version` is current."""

    async def get(self) -> LeaseRecord | None: ...

    async def create(self, record: LeaseRecord) -> LeaseRecord: ...

    async def replace(self, record: LeaseRecord) -> LeaseRecord: ...


def _micro_time() -> str:
    """Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubernetesLeaseStore:
    """A Lease on the API server: GET, POST, and PATCH carrying metadata.resourceVersion (a compare-and-swap:
    the API server answers 409 when the Lease changed since that version)."""

    def __init__(self, api_url: str, namespace: str, name: str, token: str = "", ca_file: str | None = None,
                 timeout_s: float = 5.0) -> None:  # fmt: skip
        self.name = name
        self.collection = f"{api_url.rstrip('/')}/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        headers = {"authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self.client = httpx.AsyncClient(headers=headers, timeout=timeout_s, verify=verify)

    async def _call(self, method: str, url: str, body: Any = None, content_type: str = "application/json") -> Any:
        try:
            answer = await self.client.request(method, url, content=None if body is None else json.dumps(body),
                                               headers={"content-type": content_type})  # fmt: skip
        except httpx.HTTPError as exc:
            raise LeaseError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if answer.status_code == 404 and method == "GET":
            return None
        if answer.status_code == 409:
            raise LeaseConflict(f"{method} {url}: {answer.text[:200]}")
        if answer.status_code >= 300:
            raise LeaseError(f"{method} {url}: HTTP {answer.status_code}: {answer.text[:300]}")
        try:
            return answer.json()
        except ValueError as exc:
            raise LeaseError(f"{method} {url}: the answer is not JSON") from exc

    async def get(self) -> LeaseRecord | None:
        body = await self._call("GET", f"{self.collection}/{self.name}")
        return None if body is None else _record(body)

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "annotations": dict(record.annotations)}, "spec": _spec(record)}
        return _record(await self._call("POST", self.collection, body))  # fmt: skip

    async def replace(self, record: LeaseRecord) -> LeaseRecord:
        patch = {"metadata": {"resourceVersion": record.resource_version, "annotations": dict(record.annotations)},
                 "spec": _spec(record)}  # fmt: skip
        return _record(await self._call("PATCH", f"{self.collection}/{self.name}", patch,
                                        "application/merge-patch+json"))  # fmt: skip

    async def close(self) -> None:
        await self.client.aclose()


def _spec(record: LeaseRecord) -> dict[str, Any]:
    return {"holderIdentity": record.holder, "leaseDurationSeconds": max(1, round(record.lease_duration_s)),
            "leaseTransitions": record.transitions, "acquireTime": record.acquire_time,
            "renewTime": record.renew_time}  # fmt: skip


def _record(body: Mapping[str, Any]) -> LeaseRecord:
    try:
        spec, meta = body.get("spec") or {}, body["metadata"]
        return LeaseRecord(holder=spec.get("holderIdentity") or "",
                           lease_duration_s=float(spec.get("leaseDurationSeconds") or LEASE_DURATION_S),
                           transitions=int(spec.get("leaseTransitions") or 0), acquire_time=spec.get("acquireTime"),
                           renew_time=spec.get("renewTime"), annotations=dict(meta.get("annotations") or {}),
                           resource_version=str(meta.get("resourceVersion") or ""))  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LeaseError(f"malformed Lease: {type(exc).__name__}: {exc}") from None


class Leadership(Protocol):
    """What the router asks: is it the pool's decision-maker now?"""

    is_leader: bool


class Standalone:
    """No Kubernetes: the router is its own leader."""

    is_leader = True


class LeaderElector:
    """One router's side of the election. `step()` is one round, run every `retry_s`; `clock` is monotonic
    seconds (tests pass a virtual one)."""

    def __init__(self, store: LeaseStore, identity: str, lease_duration_s: float = LEASE_DURATION_S,
                 renew_deadline_s: float = RENEW_DEADLINE_S, retry_s: float = RETRY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if not 0 < renew_deadline_s < lease_duration_s:
            raise ValueError(f"need 0 < renew deadline ({renew_deadline_s} s) < lease duration "
                             f"({lease_duration_s} s): a leader must give up before others may take over")  # fmt: skip
        if not 0 < retry_s < renew_deadline_s:
            raise ValueError(f"need 0 < retry period ({retry_s} s) < renew deadline ({renew_deadline_s} s)")
        self.store, self.identity, self.clock, self.retry_s = store, identity, clock, retry_s
        self.lease_duration_s, self.renew_deadline_s = lease_duration_s, renew_deadline_s
        self.is_leader = False
        self.observed: LeaseRecord | None = None
        self._observed_changed_s = 0.0  # when (clock) the record last changed as seen from here
        self._renewed_s = 0.0  # when (clock) this router last wrote the Lease as its holder

    def published(self) -> Mapping[str, str]:
        """The annotations of the Lease as last read or written (the leader's published state)."""
        return self.observed.annotations if self.observed is not None else {}

    def _observe(self, record: LeaseRecord, now_s: float) -> None:
        if self.observed is None or record.resource_version != self.observed.resource_version:
            self._observed_changed_s = now_s
        self.observed = record

    def _lead(self, record: LeaseRecord, now_s: float) -> None:
        if not self.is_leader:
            log.info("leader election: %s leads (transition %d)", self.identity, record.transitions)
        self.is_leader = True
        self._renewed_s = now_s
        self._observe(record, now_s)

    def _follow(self, why: str) -> None:
        if self.is_leader:
            log.warning("leader election: %s no longer leads: %s", self.identity, why)
        self.is_leader = False

    async def step(self, publish: Mapping[str, str]) -> bool:
        """Acquire or renew the Lease (writing `publish` into its annotations) or observe its holder; whether this
        router leads now."""
        now_s = self.clock()
        try:
            current = await self.store.get()
            if current is None:
                record = LeaseRecord(self.identity, self.lease_duration_s, 0, _micro_time(), _micro_time(),
                                     dict(publish))  # fmt: skip
                self._lead(await self.store.create(record), now_s)
                return True
            self._observe(current, now_s)
            if current.holder == self.identity:
                renewed = replace(current, renew_time=_micro_time(), annotations={**current.annotations, **publish},
                                  lease_duration_s=self.lease_duration_s)  # fmt: skip
                self._lead(await self.store.replace(renewed), now_s)
                return True
            expired = now_s - self._observed_changed_s >= current.lease_duration_s
            if current.holder and not expired:
                self._follow(f"{current.holder} holds the Lease")
                return False
            taken = replace(current, holder=self.identity, lease_duration_s=self.lease_duration_s,
                            transitions=current.transitions + 1, acquire_time=_micro_time(),
                            renew_time=_micro_time(), annotations={**current.annotations, **publish})  # fmt: skip
            self._lead(await self.store.replace(taken), now_s)
            return True
        except LeaseConflict:
            self._follow("another router wrote the Lease first")
            return False
        except LeaseError as exc:
            if self.is_leader and now_s - self._renewed_s >= self.renew_deadline_s:
                self._follow(f"not renewed for {now_s - self._renewed_s:.1f} s ({exc})")
            elif not self.is_leader:
                log.warning("leader election: cannot read the Lease: %s", exc)
            return self.is_leader

    async def release(self) -> None:
        """Give the Lease up (on shutdown), so that a follower takes over at once instead of after expiry."""
        if not self.is_leader or self.observed is None:
            return
        self.is_leader = False
        try:
            await self.store.replace(replace(self.observed, holder="", renew_time=_micro_time()))
        except LeaseError as exc:
            log.warning("leader election: could not release the Lease (it expires by itself): %s", exc)


# --- the stage plan as published in the Lease ------------------------------------------------------------


def encode_plan(plan: StagePlan) -> str:
    return json.dumps([{"lower": s.lower_tokens, "upper": s.upper_tokens, "replicas": list(s.replicas)}
                       for s in plan.stages], separators=(",", ":"))  # fmt: skip


def decode_plan(text: str) -> StagePlan:
    """The published plan; ValueError if it is not one."""
    try:
        stages = [Stage(i, int(s["lower"]), None if s["upper"] is None else int(s["upper"]),
                        tuple(str(r) for r in s["replicas"])) for i, s in enumerate(json.loads(text))]  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a stage plan: {type(exc).__name__}: {exc}") from None
    return StagePlan(stages)


def adopt_published_plan(router: Router, published: Mapping[str, str]) -> bool:
    """A follower routes by the leader's plan, once it knows the same replicas; True if the plan changed."""
    text = published.get(ANNOTATION_PLAN)
    if not text or not isinstance(router.policy, LengthAwarePolicy) or router.plan is None:
        return False
    try:
        plan = decode_plan(text)
    except ValueError as exc:
        log.warning("leader election: the leader's published plan is unusable: %s", exc)
        return False
    if plan == router.plan or set(plan.replicas) != set(router.endpoints):
        return False  # same already, or this router's view of the pool differs yet (DNS): next round
    log.info("stages from the leader: %s -> %s", router.plan, plan)
    router._install_plan(plan)
    return True


async def run_leadership(router: Router, leadership: Leadership) -> None:
    """Take part in the election for as long as the router runs: publish the plan as leader, adopt it as
    follower. A standalone router only says that it leads."""
    router.metrics.leader.set(1 if leadership.is_leader else 0)
    if not isinstance(leadership, LeaderElector):
        return
    try:
        while True:
            publish = {ANNOTATION_PLAN: encode_plan(router.plan)} if router.plan is not None else {}
            if not await leadership.step(publish):
                adopt_published_plan(router, leadership.published())
            router.metrics.leader.set(1 if leadership.is_leader else 0)
            await asyncio.sleep(leadership.retry_s)
    finally:
        await leadership.release()


# --- configuration -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElectionSettings:
    lease_name: str = ""  # "" : derived from --pool-dns (`<pool>-replicas.<ns>...` -> `<pool>-router`)
    lease_namespace: str = ""  # "" : from --pool-dns, else the service account's namespace
    api_url: str = ""  # "" : in cluster, https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    lease_duration_s: float = LEASE_DURATION_S
    renew_deadline_s: float = RENEW_DEADLINE_S
    retry_s: float = RETRY_S


def _from_pool_dns(pool_dns: str) -> tuple[str, str]:
    """(lease name, namespace) for the operator's `<pool>-replicas.<namespace>.svc:<port>`, else ("", "")."""
    labels = pool_dns.rsplit(":", 1)[0].split(".")
    if len(labels) >= 2 and labels[0].endswith(REPLICAS_SERVICE_SUFFIX):
        return labels[0].removesuffix(REPLICAS_SERVICE_SUFFIX) + LEASE_SUFFIX, labels[1]
    return "", ""


def make_leadership(settings: ElectionSettings, pool_dns: str = "", env: Mapping[str, str] | None = None,
                    service_account: Path = SERVICE_ACCOUNT_DIR) -> tuple[Leadership, str]:  # fmt: skip
    """The elector for these settings and why: standalone without an API server, a token, or a Lease name."""
    env = os.environ if env is None else env
    api_url = settings.api_url
    if not api_url and env.get("KUBERNETES_SERVICE_HOST"):
        api_url = f"https://{env['KUBERNETES_SERVICE_HOST']}:{env.get('KUBERNETES_SERVICE_PORT', '443')}"
    token_file = service_account / "token"
    if not api_url:
        return Standalone(), "standalone leader: no Kubernetes API server (not in a cluster)"
    if not settings.api_url and not token_file.is_file():
        return Standalone(), "standalone leader: no service account token (automountServiceAccountToken off)"
    derived_name, derived_namespace = _from_pool_dns(pool_dns)
    name = settings.lease_name or derived_name
    namespace_file = service_account / "namespace"
    namespace = settings.lease_namespace or derived_namespace or (
        namespace_file.read_text().strip() if namespace_file.is_file() else "")  # fmt: skip
    if not name or not namespace:
        return Standalone(), "standalone leader: no Lease name or namespace (--leader-lease, --leader-namespace)"
    token = token_file.read_text().strip() if token_file.is_file() else ""
    ca_file = service_account / "ca.crt"
    store = KubernetesLeaseStore(api_url, namespace, name, token, str(ca_file) if ca_file.is_file() else None)
    identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    elector = LeaderElector(store, identity, settings.lease_duration_s, settings.renew_deadline_s, settings.retry_s)
    return elector, f"leader election by Lease {namespace}/{name} as {identity}"
