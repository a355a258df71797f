"""kopf handlers: one per event. State lives in the LLMService status and in the children themselves.

- create/update/resume: admit the service into its pool (or say why not, and retry), render the pool.
- delete: re-render the pool without the service; when it was the last one, garbage collection removes
  the children (they are owned by every service they serve).
- timer: scrape the pool's runtime pods, write the figures and conditions into status, emit Events on
  SLO breach and recovery, and re-apply the pool's children if what they serve drifted.
Indexes give the operator a cluster-wide view (members per pool, GPU nodes, pod usage, runtime pods)
without list calls; kopf fills them before any handler runs, so a restarted operator decides on full data.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf
import kubernetes
from pydantic import ValidationError

from piggyback_operator import admission, autoscaling, conditions, gateway, pools, raycluster
from piggyback_operator import telemetry as t
from piggyback_operator.api import API_VERSION, KIND, PLURAL, LLMServiceSpec, unknown_spec_fields
from piggyback_operator.conditions import FALSE, TRUE, UNKNOWN, Cond
from piggyback_operator.kube import Conflict, Kube, load_client_config
from piggyback_operator.placement import NodeInfo, PodUsage, room
from piggyback_operator.scrape import PoolFigures, PoolScraper

SCRAPE_INTERVAL_S = float(os.environ.get("PIGGYBACK_SCRAPE_INTERVAL_S", "15"))
RETRY_DELAY_S = float(os.environ.get("PIGGYBACK_RETRY_DELAY_S", "30"))
ANNOTATION_PREFIX = "piggyback.dev"
FINALIZER = "piggyback.dev/finalizer"
RESOURCE = ("piggyback.dev", "v1alpha1", PLURAL)
PoolKey = tuple[str, str]  # (namespace, pool name)


@dataclass(frozen=True)
class RuntimePod:
    name: str
    node: str | None
    endpoint: str | None  # host:port when ready


# What kopf's indices (the @kopf.index functions below) hold, by key.
MembersIndex = kopf.Index[PoolKey, pools.Member]
NodesIndex = kopf.Index[str, NodeInfo]
UsageIndex = kopf.Index[str, PodUsage]
PodsIndex = kopf.Index[PoolKey, RuntimePod]


# --- startup -----------------------------------------------------------------------------------------


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account. Elsewhere: KUBECONFIG (read at login time, not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    # Handler progress and the last-handled spec go to annotations: status is ours and schema-pruned.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # Events for breaches and failures, not for every handler run
    settings.scanning.disabled = True  # the CRD is installed with the operator: no CRD/namespace watching
    # A service deleted while its scrape timer runs is finalized once kopf sees the timer stop; kopf polls
    # for that every `cancellation_polling` seconds (default 60), which would hold a deletion for a minute.
    settings.background.cancellation_polling = 0.5
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    try:
        memo.kube = Kube(await asyncio.to_thread(load_client_config))
    except kubernetes.config.ConfigException as exc:
        raise kopf.PermanentError(f"no Kubernetes credentials (in-cluster or KUBECONFIG): {exc}") from None
    memo.scraper = PoolScraper(min_interval_s=SCRAPE_INTERVAL_S / 2)
    memo.pool_locks = defaultdict(asyncio.Lock)  # admission and rendering of one pool, one at a time
    memo.status_locks = defaultdict(asyncio.Lock)
    memo.admitted = defaultdict(dict)  # pool key -> {name: Member} admitted by this process, ahead of the index
    memo.rendered = {}  # pool key -> signature of what was last applied
    memo.token_secrets = set()  # pool keys whose internal-token Secret is known to exist
    memo.stage_labels = {}  # pool key -> {pod: the stage labels last written on it}
    try:
        memo.network_policy = pools.NetworkPolicySettings.from_env()
    except ValueError as exc:
        raise kopf.PermanentError(f"network policy settings: {exc}") from None
    logger.info("piggyback operator configured: scrape every %ss, retry after %ss", SCRAPE_INTERVAL_S, RETRY_DELAY_S)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    if "scraper" in memo:
        await memo.scraper.close()
    if "kube" in memo:
        memo.kube.close()


@kopf.on.probe(id="pools")
def probe_pools(memo: kopf.Memo, **_: Any) -> int:
    return len(memo.get("rendered", {}))


# --- indexes -----------------------------------------------------------------------------------------


def member_from_body(body: Mapping[str, Any]) -> pools.Member:
    """The service as a pool member; PermanentError if its spec cannot be used (the message says why)."""
    meta = body["metadata"]
    try:
        spec = LLMServiceSpec.model_validate(copy.deepcopy(dict(body.get("spec") or {})))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise kopf.PermanentError(f"invalid spec: {problems}") from None
    status = body.get("status") or {}
    pool = pools.pool_name(spec)
    admitted = conditions.is_true(status.get("conditions"), "Admitted") and status.get("pool") == pool
    return pools.Member(
        name=meta["name"], namespace=meta["namespace"], uid=meta["uid"], spec=spec, admitted=admitted,
        deleting=bool(meta.get("deletionTimestamp")), created=meta.get("creationTimestamp") or "",
    )  # fmt: skip


@kopf.index(*RESOURCE)
def members_by_pool(body: kopf.Body, **_: Any) -> dict[PoolKey, pools.Member]:
    try:
        member = member_from_body(body)
    except kopf.PermanentError:
        return {}
    return {(member.namespace, member.pool): member}


@kopf.index("v1", "nodes")
def gpu_nodes(body: kopf.Body, **_: Any) -> dict[str, NodeInfo]:
    return {"all": NodeInfo.from_body(body)}


@kopf.index("v1", "pods")
def pod_usage(body: kopf.Body, **_: Any) -> dict[str, PodUsage]:
    usage = PodUsage.from_body(body)
    return {usage.node: usage} if usage else {}


def _pod_by_pool(body: kopf.Body, name: str, namespace: str | None, pool: str) -> dict[PoolKey, RuntimePod]:
    """A pod of `pool` as the runtime and router indices hold it: its node and its ready endpoint."""
    if namespace is None:  # never for a pod; kopf's signature allows it for cluster-scoped kinds
        return {}
    return {(namespace, pool): RuntimePod(name, body.get("spec", {}).get("nodeName"), pools.pod_endpoint(body))}


@kopf.index("v1", "pods", labels={pools.LABEL_POOL: kopf.PRESENT})
def runtime_pods(
    body: kopf.Body, name: str, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> dict[PoolKey, RuntimePod]:
    return _pod_by_pool(body, name, namespace, labels[pools.LABEL_POOL])


@kopf.index("v1", "pods", labels={pools.LABEL_ROUTER_FOR: kopf.PRESENT})
def router_pods(
    body: kopf.Body, name: str, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> dict[PoolKey, RuntimePod]:
    return _pod_by_pool(body, name, namespace, labels[pools.LABEL_ROUTER_FOR])


# --- pool view ---------------------------------------------------------------------------------------


def pool_members(key: PoolKey, index: MembersIndex, memo: kopf.Memo, exclude: str | None = None) -> list[pools.Member]:
    """Admitted, non-deleting members of a pool: the index, plus admissions it has not caught up with."""
    found: dict[str, pools.Member] = {}
    for m in index.get(key, []):
        if m.admitted and not m.deleting:
            found[m.name] = m
    indexed = {m.name: m for m in index.get(key, [])}
    for name, m in memo.admitted[key].items():
        latest = indexed.get(name)
        if latest is None or latest.deleting or latest.pool != key[1]:
            continue  # gone, going, or moved to another pool since this process admitted it
        found.setdefault(name, m)
    found.pop(exclude or "", None)
    return pools.ordered(list(found.values()))


def pool_pods(key: PoolKey, index: PodsIndex) -> list[RuntimePod]:
    return sorted(index.get(key, []), key=lambda p: p.name)


def node_rooms(gpu_nodes: NodesIndex, pod_usage: UsageIndex) -> dict[str, Any]:
    nodes = list(gpu_nodes.get("all", []))
    usages: list[PodUsage] = [u for node in pod_usage for u in pod_usage[node]]
    return room(nodes, usages)


async def apply_pool(
    key: PoolKey, members: list[pools.Member], memo: kopf.Memo, logger: kopf.Logger, scale_to: int | None = None,
    reset_scaled: bool = False, pods: list[RuntimePod] | None = None,
) -> int:
    """Render and apply the pool's ConfigMap and Deployment; returns the Deployment's replicas.

    `reset_scaled`: a member's spec.replicas changed (kubectl scale, the HPA through /scale): the replicas
    admission added are forgotten, so the members' replicas decide and a scale-down happens. `pods`: the
    pool's runtime pods, so a scale-down can mark the replicas to remove first (pod deletion cost).
    """  # fmt: skip
    namespace, pool = key
    if not members:
        memo.rendered.pop(key, None)
        return 0
    current = await memo.kube.read_deployment(namespace, pool)
    scaled = int(((current or {}).get("metadata", {}).get("annotations") or {}).get(pools.ANNOTATION_SCALED, 0))
    if reset_scaled:
        scaled = 0
    if scale_to is not None:
        scaled = max(scaled, scale_to)
    replicas = pools.desired_replicas(members, scaled)
    current_replicas = int(((current or {}).get("spec") or {}).get("replicas") or 0)
    if pods and replicas < current_replicas:
        # The ReplicaSet controller removes the lowest deletion cost first: the replicas with the least work
        # in flight, whose drain (readiness off at SIGTERM, in-flight requests finish) is shortest.
        figures = memo.scraper.latest(pool)
        for name in autoscaling.deletion_order(pods, figures.in_flight if figures else {}, current_replicas - replicas):
            await memo.kube.annotate_pod(namespace, name,
                                         {autoscaling.DELETION_COST_ANNOTATION: autoscaling.DRAIN_FIRST_COST})
    nodes = raycluster.wanted(members)
    kuberay = nodes is not None and await memo.kube.serves_resource(raycluster.GROUP_VERSION, raycluster.PLURAL)
    remote = raycluster.remote_section(nodes) if kuberay and nodes is not None else None
    address = raycluster.ray_address(pool, namespace) if remote else None
    try:
        configmap, deployment = pools.render_children(pool, namespace, members, replicas, scaled, remote, address)
    except ValueError as exc:  # RuntimeConfig refused the rendering: a spec the runtime cannot serve
        raise kopf.PermanentError(f"pool {pool} cannot be rendered: {exc}") from None
    await memo.kube.apply(configmap)
    if memo.network_policy.enabled:  # before the pods exist, so no pod ever runs unprotected
        await memo.kube.apply(pools.render_network_policy(pool, namespace, members, memo.network_policy))
    claim = pools.render_batch_claim(pool, namespace, members)
    if claim is not None and (key, "batch") not in memo.token_secrets:  # spec.batch: the pods wait for it
        await memo.kube.create_if_absent(claim)
        memo.token_secrets.add((key, "batch"))
    await memo.kube.apply(deployment)
    if key not in memo.token_secrets:  # the pods wait for it (secretKeyRef): create it right after its owner
        owner = current or await memo.kube.read_deployment(namespace, pool)
        if owner is not None:
            await memo.kube.create_if_absent(pools.render_internal_token_secret(pool, namespace, owner))
            memo.token_secrets.add(key)
    # The pool router, once the pool has several replicas; scaled to 0 (not deleted) if it shrinks back to one.
    if pools.uses_router(members, replicas) or (
        await memo.kube.read_deployment(namespace, pools.router_name(pool)) is not None
    ):
        for child in pools.render_router(pool, namespace, members, replicas):
            await memo.kube.apply(child)
    # gateway routing: the InferencePool and its endpoint picker; scaled to 0 if the pool leaves gateway routing.
    gateway_routed = pools.pool_routing(members) == "gateway"
    if gateway_routed or await memo.kube.read_deployment(namespace, gateway.epp_name(pool)) is not None:
        for child in gateway.render_epp(pool, namespace, members, enabled=gateway_routed):
            await memo.kube.apply(child)
        if gateway_routed:
            await memo.kube.apply(gateway.render_inference_pool(pool, namespace, members))
    if remote is not None and nodes is not None:  # the CPU attention nodes: a RayCluster owned by the Deployment
        owner = await memo.kube.read_deployment(namespace, pool)
        if owner is not None:
            body = raycluster.render(pool, namespace, nodes, pools.runtime_image(), owner, pools.labels(pool))
            await memo.kube.apply(body)
    memo.rendered[key] = signature(members, replicas)
    logger.info("applied pool %s: %d replicas serving %s", pool, replicas, ", ".join(m.name for m in members))
    return replicas


async def label_stages(
    key: PoolKey, pods: list[RuntimePod], routers: list[RuntimePod], memo: kopf.Memo, logger: kopf.Logger
) -> None:
    """Label each runtime pod of a lengthAware pool with its stage's length range, as a ready router of the
    pool routes now (its /metrics: the router refines and re-plans stages, so the labels follow it)."""
    ready = sorted(r.endpoint for r in routers if r.endpoint)
    if not ready:
        return
    try:
        stages = await memo.scraper.router_stages(ready[0])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        logger.info("stage labels of pool %s not updated: router %s: %s", key[1], ready[0], exc)
        return
    written = memo.stage_labels.get(key, {})
    now: dict[str, dict[str, str | None]] = {}  # only the pool's current pods: gone ones are forgotten
    for pod in pods:
        wanted = pools.stage_labels(stages.get(pod.endpoint) if pod.endpoint else None)
        if written.get(pod.name) != wanted:
            await memo.kube.label_pod(key[0], pod.name, wanted)
        now[pod.name] = wanted
    memo.stage_labels[key] = now


def signature(members: Iterable[pools.Member], replicas: int) -> tuple[Any, ...]:
    return (replicas, *((m.name, m.uid, m.spec) for m in members))


# --- status ------------------------------------------------------------------------------------------


def observed_conditions(
    member: pools.Member, admitted: Cond, pods: list[RuntimePod], replicas: int, figures: PoolFigures | None
) -> list[Cond]:
    if admitted.status != TRUE:
        waiting = f"waiting for admission ({admitted.reason})"
        return [
            admitted,
            Cond("Placed", FALSE, "NotAdmitted", waiting),
            Cond("RuntimeReady", FALSE, "NotAdmitted", waiting),
            Cond("SLOMet", UNKNOWN, "NotAdmitted", waiting),
        ]
    scheduled = sorted({p.node for p in pods if p.node})
    placed_count = sum(1 for p in pods if p.node)
    ready = sum(1 for p in pods if p.endpoint)
    # A pod the kubelet still calls ready may have a dead runtime (killed, hung) until its probes fail: the
    # last scrape knows sooner, so a ready pod that did not answer it does not count as serving.
    silent = sorted(p.endpoint for p in pods if p.endpoint and figures and p.endpoint in figures.failed)
    answering = ready - len(silent)
    on_nodes = f"pool {member.pool}: {placed_count}/{replicas} replicas on {', '.join(scheduled)}"
    placed = (
        Cond("Placed", TRUE, "Scheduled", on_nodes)
        if scheduled else
        Cond("Placed", FALSE, "Pending", f"pool {member.pool}: no replica scheduled onto a GPU node yet")
    )  # fmt: skip
    not_answering = f"; not answering /metrics: {', '.join(silent)}" if silent else ""
    if answering:
        runtime_ready = Cond("RuntimeReady", TRUE, "ReplicasReady",
                             f"{answering}/{replicas} runtime replicas ready{not_answering}")
    elif ready:
        errors = "; ".join(figures.errors) if figures else ""
        runtime_ready = Cond("RuntimeReady", FALSE, "RuntimeNotResponding",
                             f"{ready}/{replicas} replicas are ready pods but no runtime answers: {errors}")
    else:
        runtime_ready = Cond("RuntimeReady", FALSE, "NoReadyReplicas", f"0/{replicas} runtime replicas ready")
    return [admitted, placed, runtime_ready, slo_condition(member, figures)]


def slo_condition(member: pools.Member, figures: PoolFigures | None) -> Cond:
    f = figures.service(member.name) if figures else None
    if member.service_class == "BE":
        rate = f"{f.tokens_per_second:.1f} tok/s" if f and f.tokens_per_second is not None else "no rate yet"
        return Cond("SLOMet", TRUE, "BestEffort", f"best-effort service, no latency SLO; {rate}")
    if figures is None or figures.pods == 0:
        why = f"; scrape errors: {'; '.join(figures.errors)}" if figures and figures.errors else ""
        return Cond("SLOMet", UNKNOWN, "NotMeasured", f"no runtime replica answered /metrics yet{why}")
    slo = member.spec.slo
    assert slo is not None
    if f is None or f.attainment is None or not f.window_requests:
        return Cond("SLOMet", UNKNOWN, "NoRecentRequests", "no LS requests finished within the runtime's window")
    detail = (
        f"attainment {f.attainment:.3f} (target {slo.attainment_target}) over {f.window_requests} requests; "
        f"TTFT p99 {_ms(f.ttft_p99_s)} (SLO {slo.ttft_ms:g} ms), TPOT p99 {_ms(f.tpot_p99_s)} (SLO {slo.tpot_ms:g} ms)"
    )
    if f.attainment >= slo.attainment_target:
        return Cond("SLOMet", TRUE, "AttainmentMet", detail)
    return Cond("SLOMet", FALSE, "AttainmentBelowTarget", detail)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def measured(member: pools.Member, figures: PoolFigures | None) -> dict[str, Any] | None:
    if figures is None:
        return None
    f = figures.service(member.name)
    out: dict[str, Any] = {"scrapedAt": conditions.now()}
    if figures.headroom_rps is not None:
        out["poolHeadroomRequestsPerSecond"] = round(figures.headroom_rps, 3)
    if f is not None:
        for key, value in (
            ("ttftP99Ms", None if f.ttft_p99_s is None else round(f.ttft_p99_s * 1000, 3)),
            ("tpotP99Ms", None if f.tpot_p99_s is None else round(f.tpot_p99_s * 1000, 3)),
            ("attainment", None if f.attainment is None else round(f.attainment, 4)),
            ("windowRequests", f.window_requests),
            ("beTokensPerSecond", None if f.tokens_per_second is None or member.service_class != "BE"
             else round(f.tokens_per_second, 3)),
        ):  # fmt: skip
            if value is not None:
                out[key] = value
    return out


async def write_status(
    memo: kopf.Memo,
    member: pools.Member,
    pods: list[RuntimePod],
    replicas: int,
    figures: PoolFigures | None,
    admitted: Cond | None,
    logger: kopf.Logger,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """Recompute status on the freshest object (optimistic concurrency); returns (old, new) conditions.

    `admitted=None` keeps the Admitted condition the object has (timers do not decide admission).
    """
    async with memo.status_locks[(member.namespace, member.name)]:
        for _attempt in range(5):
            body = await memo.kube.read_llmservice(member.namespace, member.name)
            if body is None or body["metadata"].get("uid") != member.uid:
                return None  # deleted (or re-created) meanwhile
            old = body.get("status") or {}
            old_conditions = old.get("conditions") or []
            if admitted is None:
                current = conditions.find(old_conditions, "Admitted")
                if current is None:
                    return None  # the create handler has not decided yet
                admitted_now = Cond("Admitted", current["status"], current["reason"], current.get("message", ""))
                if old.get("pool") != member.pool:  # the spec moved it to another pool: not admitted there yet
                    return None
            else:
                admitted_now = admitted
            conds = observed_conditions(member, admitted_now, pods, replicas, figures)
            conds.append(conditions.aggregate_ready(conds))
            nodes = member.spec.cpu_attention_nodes
            if nodes is not None and admitted_now.status == TRUE:  # not in Ready: BE still runs on host CPUs
                installed = await memo.kube.serves_resource(raycluster.GROUP_VERSION, raycluster.PLURAL)
                cluster = (await memo.kube.read_custom("RayCluster", member.namespace,
                                                       raycluster.cluster_name(member.pool))) if installed else None
                conds.append(raycluster.condition(installed, cluster, nodes))
            generation = body["metadata"].get("generation")
            admitted_in_pool = admitted_now.status == TRUE
            status: dict[str, Any] = {
                "observedGeneration": generation,
                "conditions": conditions.render(old_conditions, conds, generation),
                "pool": member.pool,
                "endpoint": pools.endpoint_url(member) if admitted_in_pool else None,
                "nodes": sorted({p.node for p in pods if p.node}) if admitted_in_pool else [],
                "runtimeEndpoints": sorted(p.endpoint for p in pods if p.endpoint) if admitted_in_pool else [],
                "replicas": replicas if admitted_in_pool else None,
                "selector": f"{pools.LABEL_POOL}={member.pool}" if admitted_in_pool else None,
                "readyReplicas": sum(1 for p in pods if p.endpoint) if admitted_in_pool else None,
                "measured": measured(member, figures) if admitted_in_pool else None,
            }
            try:
                await memo.kube.patch_status(member.namespace, member.name, status, body["metadata"]["resourceVersion"])
            except Conflict:
                continue
            t.record_conditions(member.namespace, member.name, status["conditions"])
            if admitted_in_pool:
                t.POOL_REPLICAS.labels(member.namespace, member.pool).set(replicas)
            return old_conditions, status["conditions"]
        # Returning would lose this status (nothing else writes Admitted): let kopf retry the handler.
        raise kopf.TemporaryError(f"status of {member.namespace}/{member.name} kept changing underneath (409)",
                                  delay=min(RETRY_DELAY_S, 5.0))


# --- handlers ----------------------------------------------------------------------------------------


def _count_errors(handler: str, exc: BaseException) -> None:
    kind = (
        "temporary" if isinstance(exc, kopf.TemporaryError)
        else "permanent" if isinstance(exc, kopf.PermanentError)
        else "unexpected"
    )  # fmt: skip
    t.RECONCILE_ERRORS.labels(handler, kind).inc()


# backoff: how long kopf waits before retrying a handler that failed unexpectedly (API errors the client's own
# retries did not absorb); kopf's default is 60 s.
@kopf.on.resume(*RESOURCE, backoff=RETRY_DELAY_S)
@kopf.on.create(*RESOURCE, backoff=RETRY_DELAY_S)
@kopf.on.update(*RESOURCE, backoff=RETRY_DELAY_S)  # type: ignore[arg-type]  # kopf passes indices as extra keywords; its handler protocols cannot say so
async def reconcile(
    body: kopf.Body,
    old: Any,
    new: Any,
    reason: str,
    memo: kopf.Memo,
    logger: kopf.Logger,
    members_by_pool: MembersIndex,
    gpu_nodes: NodesIndex,
    pod_usage: UsageIndex,
    runtime_pods: PodsIndex,
    **_: Any,
) -> None:
    """Admit the service into its pool (or report why not and retry), and render the pool with it."""
    t.RECONCILES.labels("reconcile").inc()
    try:
        await _reconcile(body, old, reason, memo, logger, members_by_pool, gpu_nodes, pod_usage, runtime_pods)
    except (kopf.TemporaryError, kopf.PermanentError, Exception) as exc:
        _count_errors("reconcile", exc)
        raise


async def _reconcile(
    body: kopf.Body, old: Any, reason: str, memo: kopf.Memo, logger: kopf.Logger,
    members_index: MembersIndex, nodes_index: NodesIndex, usage_index: UsageIndex, pods_index: PodsIndex,
) -> None:  # fmt: skip
    unknown = unknown_spec_fields(body)
    if unknown:  # a typo the API server pruned does nothing: say so where `kubectl describe` shows it
        kopf.warn(body, reason="UnknownField", message=(
            f"{', '.join(unknown)}: not a field of {KIND} {API_VERSION}; the API server drops it, so it has no "
            "effect. Check the spelling (kubectl explain llms.spec) and apply with --validate=strict."))
    try:
        member = member_from_body(body)
    except kopf.PermanentError as exc:
        await _report_invalid(body, memo, str(exc), logger)
        raise
    key = (member.namespace, member.pool)

    if reason == "update" and isinstance(old, Mapping) and old.get("spec"):
        try:
            old_pool = pools.pool_name(LLMServiceSpec.model_validate(copy.deepcopy(dict(old["spec"]))))
        except ValidationError:
            old_pool = None
        if old_pool and old_pool != member.pool:  # moved: the old pool goes on without it
            old_key = (member.namespace, old_pool)
            async with memo.pool_locks[old_key]:
                memo.admitted[old_key].pop(member.name, None)
                remaining = pool_members(old_key, members_index, memo, exclude=member.name)
                await apply_pool(old_key, remaining, memo, logger)

    async with memo.pool_locks[key]:
        others = pool_members(key, members_index, memo, exclude=member.name)
        pods = pool_pods(key, pods_index)
        endpoints = [p.endpoint for p in pods if p.endpoint]
        if member.admitted:
            decision = admission.Decision(True, admission.ADMITTED, _admitted_message(body))
        else:
            deployment = await memo.kube.read_deployment(*key)
            figures = await memo.scraper.figures(member.pool, endpoints, force=True) if endpoints else None
            state = admission.PoolState(
                name=member.pool, admitted=others,
                replicas=int(((deployment or {}).get("spec") or {}).get("replicas") or 0),
                ready_endpoints=endpoints,
                serving_nodes={n: sum(1 for p in pods if p.node == n) for n in {p.node for p in pods if p.node}},
                figures=figures,
            )  # fmt: skip
            decision = admission.decide(member, state, node_rooms(nodes_index, usage_index))
            t.ADMISSION_DECISIONS.labels(member.service_class, decision.outcome, decision.reason).inc()
            logger.info(
                "admission of %s %s into pool %s: %s (%s) - %s; inputs: admitted=%s replicas=%d ready=%s "
                "headroom_rps=%s attainment=%s",
                member.service_class, member.name, member.pool, decision.outcome, decision.reason, decision.message,
                [m.name for m in others], state.replicas, endpoints,
                None if figures is None else figures.headroom_rps,
                None if figures is None else {n: f.attainment for n, f in figures.services.items()},
            )  # fmt: skip

        replicas = 0
        if decision.admitted:
            memo.admitted[key][member.name] = member
            replicas = await apply_pool(key, [*others, member], memo, logger, pods=pool_pods(key, pods_index),
                                        reset_scaled=_replicas_changed(reason, old, member))  # fmt: skip
            routed = pools.uses_router([*others, member], replicas)
            await memo.kube.apply(pools.render_service(member, routed=routed))
            await _apply_autoscaler(member, reason, old, memo)
        elif decision.scale_to is not None and others:
            replicas = await apply_pool(key, others, memo, logger, scale_to=decision.scale_to)
            kopf.event(body, type="Normal", reason="ScalingPool", message=decision.message)

    admitted_cond = Cond("Admitted", TRUE if decision.admitted else FALSE, decision.reason, decision.message)
    await write_status(memo, member, pool_pods(key, pods_index) if decision.admitted else [], replicas,
                       memo.scraper.latest(member.pool), admitted_cond, logger)  # fmt: skip
    if decision.permanent:
        raise kopf.PermanentError(decision.message)
    if not decision.admitted:
        raise kopf.TemporaryError(f"{decision.reason}: {decision.message}", delay=RETRY_DELAY_S)


def _old_spec(reason: str, old: Any) -> Mapping[str, Any]:
    spec = old.get("spec") if reason == "update" and isinstance(old, Mapping) else None
    return spec if isinstance(spec, Mapping) else {}


def _replicas_changed(reason: str, old: Any, member: pools.Member) -> bool:
    before = _old_spec(reason, old).get("replicas")
    return before is not None and before != member.spec.replicas


async def _apply_autoscaler(member: pools.Member, reason: str, old: Any, memo: kopf.Memo) -> None:
    """The ScaledObject while `scaling.autoscaler` is keda; deleted when it is switched off."""
    if member.spec.scaling is not None and member.spec.scaling.autoscaler == "keda":
        await memo.kube.apply(autoscaling.render_scaled_object(member))
    elif (_old_spec(reason, old).get("scaling") or {}).get("autoscaler") == "keda":
        await memo.kube.delete("ScaledObject", member.namespace, member.name)


def _admitted_message(body: Mapping[str, Any]) -> str:
    current = conditions.find((body.get("status") or {}).get("conditions"), "Admitted")
    return str((current or {}).get("message") or "admitted")


async def _report_invalid(body: Mapping[str, Any], memo: kopf.Memo, message: str, logger: kopf.Logger) -> None:
    meta = body["metadata"]
    old = body.get("status") or {}
    conds = [Cond(c, FALSE, "InvalidSpec", message) for c in conditions.ORDER]
    conds.append(conditions.aggregate_ready(conds))
    status = {"observedGeneration": meta.get("generation"),
              "conditions": conditions.render(old.get("conditions"), conds, meta.get("generation"))}
    try:
        await memo.kube.patch_status(meta["namespace"], meta["name"], status, meta["resourceVersion"])
    except Conflict:
        logger.info("status changed while reporting an invalid spec; the retry will report it")


@kopf.on.delete(*RESOURCE, backoff=RETRY_DELAY_S)  # type: ignore[arg-type]  # kopf passes indices as extra keywords; its handler protocols cannot say so
async def release(
    body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, members_by_pool: MembersIndex, **_: Any
) -> None:
    """Re-render the pool without this service; children it alone owned are garbage-collected."""
    t.RECONCILES.labels("release").inc()
    try:
        member = member_from_body(body)
    except kopf.PermanentError:
        return  # never rendered into any pool
    key = (member.namespace, member.pool)
    t.forget_service(member.namespace, member.name)
    try:
        async with memo.pool_locks[key]:
            memo.admitted[key].pop(member.name, None)
            remaining = pool_members(key, members_by_pool, memo, exclude=member.name)
            if remaining:
                await apply_pool(key, remaining, memo, logger)
            else:
                memo.rendered.pop(key, None)
                logger.info("%s was the last service of pool %s; its children go with it", member.name, member.pool)
    except Exception as exc:
        _count_errors("release", exc)
        raise


@kopf.timer(*RESOURCE, interval=SCRAPE_INTERVAL_S, initial_delay=min(SCRAPE_INTERVAL_S, 5.0))  # type: ignore[arg-type]  # kopf passes indices as extra keywords; its handler protocols cannot say so
async def observe(
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    members_by_pool: MembersIndex,
    runtime_pods: PodsIndex,
    router_pods: PodsIndex,
    **_: Any,
) -> None:
    """Scrape the pool's runtimes, write figures and conditions, and raise Events on breach and recovery;
    in a lengthAware pool, label the runtime pods with their stages."""
    t.RECONCILES.labels("observe").inc()
    try:
        member = member_from_body(body)
    except kopf.PermanentError:
        return
    if not member.admitted or member.deleting:
        return
    key = (member.namespace, member.pool)
    pods = pool_pods(key, runtime_pods)
    endpoints = [p.endpoint for p in pods if p.endpoint]
    figures = await memo.scraper.figures(member.pool, endpoints) if endpoints else None
    if figures is not None:
        t.SCRAPES.labels("ok").inc(figures.pods)
        t.SCRAPES.labels("error").inc(len(figures.errors))
        for error in figures.errors:
            logger.warning("scraping pool %s failed: %s", member.pool, error)

    async with memo.pool_locks[key]:
        members = pool_members(key, members_by_pool, memo)
        if member.name not in {m.name for m in members}:
            members = pools.ordered([*members, member])
        deployment = await memo.kube.read_deployment(*key)
        replicas = int(((deployment or {}).get("spec") or {}).get("replicas") or 0)
        if deployment is None or memo.rendered.get(key) != signature(members, replicas):
            # drift, restart, or a missed event
            replicas = await apply_pool(key, members, memo, logger, pods=pods)
            await memo.kube.apply(pools.render_service(member, routed=pools.uses_router(members, replicas)))
        length_aware = pools.pool_routing(members) == "lengthAware"
    if length_aware:  # outside the pool's lock: it asks a router over the network
        await label_stages(key, pods, pool_pods(key, router_pods), memo, logger)

    result = await write_status(memo, member, pods, replicas, figures, None, logger)
    if result is None:
        return
    before, after = (conditions.find(c, "SLOMet") for c in result)
    if member.service_class == "LS" and figures is not None:
        f = figures.service(member.name)
        if f is not None and f.attainment is not None:
            t.SLO_ATTAINMENT.labels(member.namespace, member.name).set(f.attainment)
    was = (before or {}).get("status")
    now = (after or {}).get("status")
    if now == FALSE and was != FALSE:
        kopf.warn(body, reason="SLOBreached", message=(after or {}).get("message", ""))
    elif now == TRUE and was == FALSE:
        kopf.event(body, type="Normal", reason="SLORecovered", message=(after or {}).get("message", ""))
