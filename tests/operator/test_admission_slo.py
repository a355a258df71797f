"""SLO-driven admission against a real runtime-like process on loopback that the operator's timer scrapes."""

from __future__ import annotations

import pytest
from conftest import Cluster, Runtime, be_spec, eventually, ls_spec

from piggyback_operator.telemetry import REGISTRY

# slow: the operator against an emulated API server, fake runtime processes
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

CHAT_IS_HEALTHY = {"class": "LS", "attainment": 0.998, "window": 500,
                   "ttft_s": [0.04] * 490 + [0.15] * 10, "tpot_s": [0.02] * 500}


def decisions(decision: str, reason: str, cls: str = "LS") -> float:
    return REGISTRY.get_sample_value(
        "llmservice_admission_decisions_total", {"class": cls, "decision": decision, "reason": reason}
    ) or 0.0


async def serving_chat(cluster: Cluster, runtime: Runtime, **spec: object) -> str:
    """A GPU node, an admitted LS service `chat`, and one ready replica whose runtime is `runtime`."""
    await cluster.add_gpu_node("gpu-a", gpus=1)
    runtime.set(services={"chat": CHAT_IS_HEALTHY}, headroom=0.0)
    await cluster.create("chat", ls_spec(**spec))
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True")
    pool = cluster.status("chat")["pool"]
    await eventually(lambda: cluster.deployment(pool))
    await cluster.run_replicas(pool, node="gpu-a", port=runtime.port)
    return pool


async def test_the_timer_writes_the_runtime_figures_into_status(cluster, operator, runtime):
    await serving_chat(cluster, runtime)
    measured = await eventually(lambda: cluster.status("chat").get("measured", {}).get("attainment"), what="figures")
    measured = cluster.status("chat")["measured"]
    assert measured["attainment"] == pytest.approx(0.998)
    assert measured["windowRequests"] == 500
    assert measured["ttftP99Ms"] == pytest.approx(125)  # rank 495 of 500: halfway into the (0.1, 0.15] bucket
    assert 15 <= measured["tpotP99Ms"] <= 20
    assert measured["poolHeadroomRequestsPerSecond"] == 0.0
    slo = cluster.condition("chat", "SLOMet")
    assert (slo["status"], slo["reason"]) == ("True", "AttainmentMet") and "TTFT p99" in slo["message"]


async def test_a_second_ls_service_is_refused_without_headroom_and_admitted_when_the_runtime_reports_it(
    cluster, operator, runtime
):
    pool = await serving_chat(cluster, runtime)
    before = decisions("rejected", "InsufficientSLOHeadroom")

    await cluster.create("chat2", ls_spec(expectedLoad={"requestsPerSecond": 5}))
    refused = await eventually(lambda: (c := cluster.condition("chat2", "Admitted")) and c, what="a decision")
    assert (refused["status"], refused["reason"]) == ("False", "InsufficientSLOHeadroom")
    assert "predicted headroom 0 req/s < expected load 5 req/s" in refused["message"]
    assert cluster.condition("chat2", "Ready")["reason"] == "InsufficientSLOHeadroom"
    assert [s["name"] for s in cluster.runtime_config(pool)["services"]] == ["chat"]
    assert decisions("rejected", "InsufficientSLOHeadroom") > before

    runtime.set(services={"chat": CHAT_IS_HEALTHY}, headroom=12.0)
    await eventually(lambda: cluster.condition("chat2", "Admitted").get("status") == "True", what="admitted on retry")
    admitted = cluster.condition("chat2", "Admitted")["message"]
    assert "predicted headroom 12 req/s covers expected load 5 req/s" in admitted
    await eventually(lambda: [s["name"] for s in cluster.runtime_config(pool)["services"]] == ["chat", "chat2"])


async def test_without_a_headroom_metric_admission_rests_on_measured_attainment_and_says_so(cluster, operator, runtime):
    await serving_chat(cluster, runtime)
    runtime.set(services={"chat": CHAT_IS_HEALTHY}, headroom=None)
    await cluster.create("chat2", ls_spec())
    admitted = await eventually(
        lambda: (c := cluster.condition("chat2", "Admitted")) and c.get("status") == "True" and c
    )
    assert "exports no headroom prediction" in admitted["message"]


async def test_a_pool_missing_its_attainment_target_refuses_new_ls_services(cluster, operator, runtime):
    await serving_chat(cluster, runtime)
    runtime.set(services={"chat": {**CHAT_IS_HEALTHY, "attainment": 0.9}}, headroom=100.0)
    await cluster.create("chat2", ls_spec())
    refused = await eventually(lambda: (c := cluster.condition("chat2", "Admitted")) and c)
    assert refused["reason"] == "InsufficientSLOHeadroom" and "chat attains 0.900 < target 0.99" in refused["message"]


async def test_without_headroom_the_pool_scales_within_bounds_if_a_gpu_is_free(cluster, operator, runtime_factory):
    first, second = runtime_factory(), runtime_factory()
    await cluster.add_gpu_node("gpu-b", gpus=1)  # a second GPU for the extra replica
    pool = await serving_chat(cluster, first, scaling={"minReplicas": 1, "maxReplicas": 2})
    await cluster.create("chat2", ls_spec(scaling={"minReplicas": 1, "maxReplicas": 2}))

    scaling = await eventually(lambda: (c := cluster.condition("chat2", "Admitted")) and c)
    assert scaling["reason"] == "ScalingUp" and "from 1 to 2 replicas" in scaling["message"]
    await eventually(lambda: cluster.deployment(pool)["spec"]["replicas"] == 2, what="scaled to 2")

    second.set(services={"chat": CHAT_IS_HEALTHY}, headroom=8.0)  # the new replica has room
    await cluster.run_replicas(pool, node="gpu-b", port=second.port)
    await eventually(lambda: cluster.condition("chat2", "Admitted").get("status") == "True", what="admitted")
    assert cluster.deployment(pool)["spec"]["replicas"] == 2
    await eventually(lambda: len(cluster.status("chat2").get("runtimeEndpoints", [])) == 2)


async def test_a_be_service_whose_kv_does_not_fit_in_host_memory_is_refused(cluster, operator):
    await cluster.add_gpu_node("gpu-small", gpus=1, memory="32Gi")
    await cluster.create("batch", be_spec(resources={"hostMemory": "64Gi"}))
    refused = await eventually(lambda: (c := cluster.condition("batch", "Admitted")) and c)
    assert (refused["status"], refused["reason"]) == ("False", "InsufficientHostMemory")
    assert "needs 68Gi host memory" in refused["message"]


async def test_an_slo_breach_and_its_recovery_raise_events(cluster, operator, runtime):
    await serving_chat(cluster, runtime)
    await eventually(lambda: cluster.condition("chat", "SLOMet").get("status") == "True")

    runtime.set(services={"chat": {**CHAT_IS_HEALTHY, "attainment": 0.8}}, headroom=0.0)
    await eventually(lambda: cluster.condition("chat", "SLOMet").get("reason") == "AttainmentBelowTarget")
    assert cluster.condition("chat", "Ready")["status"] == "False"
    breach = await eventually(lambda: cluster.events("SLOBreached"), what="an SLOBreached event")
    assert breach[0]["type"] == "Warning" and "attainment 0.800" in breach[0]["message"]

    runtime.set(services={"chat": CHAT_IS_HEALTHY}, headroom=0.0)
    await eventually(lambda: cluster.events("SLORecovered"), what="an SLORecovered event")
    assert cluster.condition("chat", "Ready")["status"] == "True"
