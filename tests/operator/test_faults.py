"""The operator under faults: stopped mid-reconcile, an API server failing its writes, a runtime that dies.

Each scenario runs the real kopf operator against the emulated API server, which injects the fault (see
`ApiServer.inject`); the fake runtime is a real process the test kills, freezes and restarts.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from typing import Any

import pytest
from conftest import NAMESPACE, Cluster, OperatorThread, Runtime, be_spec, eventually, ls_spec, running_operator
from emulated_apiserver import ApiServer

from piggyback_operator import pools
from piggyback_operator.api import LLMServiceSpec
from piggyback_operator.kube import BACKOFF_S

# slow: the operator against an emulated API server, fake runtime processes
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

POOL = pools.pool_name(LLMServiceSpec.model_validate(ls_spec()))
CHILDREN = {  # resource -> the path of the pool's (or a service's) child, as the operator writes it
    "apps/v1/deployments": rf"^/apis/apps/v1/namespaces/{NAMESPACE}/deployments/[^/]+$",
    "v1/configmaps": rf"^/api/v1/namespaces/{NAMESPACE}/configmaps/[^/]+$",
    "v1/services": rf"^/api/v1/namespaces/{NAMESPACE}/services/[^/]+$",
    "networking.k8s.io/v1/networkpolicies": rf"^/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies/",
}
ANY_CHILD = "|".join(f"(?:{p})" for p in CHILDREN.values())
STATUS = r"/llmservices/[^/]+/status$"
KOPF_PATCH = r"/llmservices/[^/]+$"  # kopf's finalizer and progress annotations
HEALTHY = {"class": "LS", "attainment": 1.0, "window": 100, "ttft_s": [0.05] * 100, "tpot_s": [0.02] * 100}


def children(api: ApiServer) -> dict[str, list[str]]:
    return {res: sorted(o["metadata"]["name"] for o in api.all(res, NAMESPACE)) for res in CHILDREN}


def assert_status_complete(cluster: Cluster, name: str) -> None:
    """Nothing of the status was lost: every condition, the pool, the endpoint, the generation observed."""
    status = cluster.status(name)
    conds = {c["type"]: c for c in status.get("conditions", [])}
    assert set(conds) == {"Admitted", "Placed", "RuntimeReady", "SLOMet", "Ready"}, status
    assert conds["Admitted"]["status"] == "True" and status["pool"] == POOL
    assert status["endpoint"] == f"http://{name}.{NAMESPACE}.svc:8000/v1"
    assert status["observedGeneration"] == cluster.llms(name)["metadata"]["generation"]


# --- the operator restarted mid-reconcile ----------------------------------------------------------------------


@pytest.mark.parametrize("then", ["drop", "land"], ids=["write-lost", "write-landed-after-stop"])
async def test_an_operator_stopped_while_creating_a_child_converges_after_restart_without_duplicates(
    cluster: Cluster, apiserver: ApiServer, then: str
) -> None:
    await cluster.add_gpu_node("gpu-a")
    held = apiserver.inject("PATCH", CHILDREN["apps/v1/deployments"], "hold", then=then)
    first = OperatorThread()
    first.settings.queueing.exit_timeout = 0.5  # how long kopf lets handlers finish after SIGTERM (default 2 s)
    await first.start()
    await cluster.create("chat", ls_spec())
    await eventually(lambda: held.hits, what="the operator's Deployment create in flight")

    # SIGTERM: kopf gives the handler 0.5 s, then cancels it; the create is still held at the API server (and
    # released before the client's own 3 s timeout, so that "land" answers the request it held).
    first.request_stop()
    await asyncio.sleep(1.5)
    held.release()
    await first.stop()
    # Mid-reconcile for sure: the pool's ConfigMap exists, the Deployment only if the held write landed, and
    # the status claims no admission (the handler never got that far).
    assert cluster.configmap(POOL) is not None
    assert (cluster.deployment(POOL) is not None) == (then == "land")
    assert cluster.service("chat") is None and cluster.condition("chat", "Admitted") == {}

    async with running_operator():
        await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")
        await eventually(lambda: cluster.deployment(POOL) and cluster.service("chat"), what="children")
    assert children(apiserver) == {
        "apps/v1/deployments": [POOL], "v1/configmaps": [POOL], "v1/services": ["chat"],
        "networking.k8s.io/v1/networkpolicies": [POOL],
    }  # fmt: skip
    assert [r["name"] for r in cluster.deployment(POOL)["metadata"]["ownerReferences"]] == ["chat"]
    assert [s["name"] for s in cluster.runtime_config(POOL)["services"]] == ["chat"]


# --- an API server failing the operator's writes for a while ----------------------------------------------------


def inject_faults(api: ApiServer, kind: str) -> list[Any]:
    if kind == "500":  # every write fails a few times, kopf's own patches included
        return [api.inject("PATCH", ANY_CHILD, "status", status=500, times=4),
                api.inject("PATCH", STATUS, "status", status=500, times=3),
                api.inject("PATCH", KOPF_PATCH, "status", status=503, times=2)]
    if kind == "409":  # the objects "changed underneath": applies race a create, status patches go stale
        # More conflicts in a row than the status writer's 5 read-modify-write attempts: kopf must retry it.
        return [api.inject("PATCH", ANY_CHILD, "status", status=409, times=4),
                api.inject("PATCH", r"/llmservices/chat/status$", "status", status=409, times=7)]
    # timeouts: the write lands but the answer comes after the client gave up (PIGGYBACK_API_TIMEOUT_S=3)
    return [api.inject("PATCH", ANY_CHILD, "late", delay_s=3.5, times=2),
            api.inject("PATCH", STATUS, "late", delay_s=3.5, times=1)]


@pytest.mark.parametrize("kind", ["500", "409", "timeout"])
async def test_failing_writes_are_retried_with_backoff_without_duplicate_children_or_lost_status(
    cluster: Cluster, apiserver: ApiServer, operator: None, runtime: Runtime, kind: str
) -> None:
    await cluster.add_gpu_node("gpu-a")
    runtime.set(services={"chat": HEALTHY, "batch": {"class": "BE", "tokens": 10}}, headroom=5.0)
    faults = inject_faults(apiserver, kind)
    await cluster.create("chat", ls_spec())
    await cluster.create("batch", be_spec())
    for name in ("chat", "batch"):
        await eventually(lambda n=name: cluster.condition(n, "Admitted").get("status") == "True", what=name)
    await cluster.run_replicas(POOL, node="gpu-a", port=runtime.port)
    for name in ("chat", "batch"):
        await eventually(lambda n=name: cluster.condition(n, "Ready").get("status") == "True", what=f"{name} Ready")

    for fault in faults:
        assert len(fault.hits) == fault.times, f"fault {fault.path.pattern} hit {len(fault.hits)}/{fault.times}"
    assert children(apiserver) == {
        "apps/v1/deployments": [POOL], "v1/configmaps": [POOL], "v1/services": ["batch", "chat"],
        "networking.k8s.io/v1/networkpolicies": [POOL],
    }  # fmt: skip
    assert sorted(s["name"] for s in cluster.runtime_config(POOL)["services"]) == ["batch", "chat"]
    for name in ("chat", "batch"):
        assert_status_complete(cluster, name)

    if kind == "500":  # retried by the client with exponential backoff, not hammered nor left to kopf's 60 s
        configmap = [c.at for c in apiserver.operator_calls() if c.method == "PATCH"
                     and c.path.endswith(f"/configmaps/{POOL}")][:5]  # fmt: skip
        gaps = [b - a for a, b in itertools.pairwise(configmap)]
        minimum = [0.8 * BACKOFF_S * 2**i for i in range(4)]  # doubling, less the jitter
        assert len(gaps) == 4 and all(g >= m for g, m in zip(gaps, minimum, strict=True)), (gaps, minimum)
        # The first retry comes sooner than kopf's handler retry (PIGGYBACK_RETRY_DELAY_S=1 here) could.
        assert gaps[0] < 1.0, f"retried by kopf's handler retry, not by the client: {gaps}"


# --- the runtime process killed or hung -------------------------------------------------------------------------


async def serving(cluster: Cluster, runtime: Runtime) -> str:
    await cluster.add_gpu_node("gpu-a")
    runtime.set(services={"chat": HEALTHY}, headroom=5.0)
    await cluster.create("chat", ls_spec())
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")
    (pod,) = await cluster.run_replicas(POOL, node="gpu-a", port=runtime.port)
    await eventually(lambda: cluster.condition("chat", "Ready").get("status") == "True", what="Ready")
    return pod


def runtime_ready(cluster: Cluster) -> tuple[str, str]:
    c = cluster.condition("chat", "RuntimeReady")
    return c.get("status", ""), c.get("reason", "")


async def test_a_killed_runtime_shows_in_status_at_once_and_recovers_when_its_container_restarts(
    cluster: Cluster, operator: None, runtime: Runtime
) -> None:
    pod = await serving(cluster, runtime)

    runtime.kill()  # the kubelet has not noticed yet: the pod still says Ready
    await eventually(lambda: runtime_ready(cluster) == ("False", "RuntimeNotResponding"), what="not responding")
    assert f"127.0.0.1:{runtime.port}" in cluster.condition("chat", "RuntimeReady")["message"]
    assert (cluster.condition("chat", "Ready")["status"], cluster.condition("chat", "Ready")["reason"]) == (
        "False", "RuntimeNotResponding")

    await cluster.set_pod_ready(pod, False)  # the readiness probe fails
    await eventually(lambda: runtime_ready(cluster) == ("False", "NoReadyReplicas"), what="no ready replicas")

    runtime.restart()  # the container restarts; its metrics start from zero
    runtime.set(services={"chat": HEALTHY}, headroom=5.0)
    await cluster.set_pod_ready(pod, True, restarted=True)
    await eventually(lambda: cluster.condition("chat", "Ready").get("status") == "True", what="Ready again")
    assert runtime_ready(cluster) == ("True", "ReplicasReady")
    assert cluster.status("chat")["runtimeEndpoints"] == [f"127.0.0.1:{runtime.port}"]


async def test_a_hung_runtime_shows_in_status_and_recovers_when_it_answers_again(
    cluster: Cluster, operator: None, runtime: Runtime
) -> None:
    await serving(cluster, runtime)
    runtime.process.send_signal(signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
    try:
        await eventually(lambda: runtime_ready(cluster) == ("False", "RuntimeNotResponding"), what="hung")
    finally:
        runtime.process.send_signal(signal.SIGCONT)
    await eventually(lambda: cluster.condition("chat", "Ready").get("status") == "True", what="Ready again")
    assert runtime_ready(cluster) == ("True", "ReplicasReady")
