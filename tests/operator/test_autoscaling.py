"""Autoscaling: the LLMService's /scale subresource, the KEDA ScaledObject, and which replica a scale-down removes.

Specification:
- `kubectl scale llms/NAME` (or an HPA) writes spec.replicas through /scale; the operator renders the pool's
  Deployment from it, down as well as up (replicas admission added are forgotten then); /scale reads back the
  pool's replicas and the label selector of its runtime pods.
- With `scaling.autoscaler: keda` the operator renders a ScaledObject (valid against KEDA's CRD) that targets
  the LLMService through /scale, on the service's queue and (LS) the pool's predicted SLO capacity, never on
  GPU utilisation; min/max from `scaling`, and a scale-down stabilisation window; switched off, it goes.
- A scale-down first marks the replicas to remove (pod deletion cost): not-ready ones, then the fewest
  requests in flight. The runtime drains on SIGTERM (readiness off, bounded drain), so the removed replica
  finishes what it can within drain_timeout_s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from conftest import NAMESPACE, be_spec, eventually, ls_spec
from crd_validation import validation_errors

from piggyback_operator import autoscaling, pools
from piggyback_operator.api import LLMServiceSpec
from piggyback_operator.scrape import parse_exposition
from piggyback_runtime import metrics as m

pytestmark = pytest.mark.timeout(120)
KEDA_CRD = "keda.sh_scaledobjects.yaml"
KEDA = {"minReplicas": 1, "maxReplicas": 4, "autoscaler": "keda", "scaleDownStabilizationSeconds": 600}


def member(name: str, spec: dict[str, Any]) -> pools.Member:
    return pools.Member(name, NAMESPACE, f"uid-{name}", LLMServiceSpec.model_validate(spec), True, False, name)


def test_an_ls_service_scales_on_its_queue_and_the_pools_predicted_slo_capacity():
    chat = member("chat", ls_spec(scaling=KEDA))
    scaled = autoscaling.render_scaled_object(chat)
    assert validation_errors(scaled, KEDA_CRD, "v1alpha1") == []
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "piggyback.dev/v1alpha1", "kind": "LLMService", "name": "chat"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"] == 600  # fmt: skip
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == {"queue", "capacity"}
    queue, capacity = triggers["queue"], triggers["capacity"]
    assert queue["metricType"] == "AverageValue" and queue["metadata"]["threshold"] == "4"
    assert m.NUM_WAITING in queue["metadata"]["query"] and 'model_name="chat"' in queue["metadata"]["query"]
    assert capacity["metricType"] == "Value" and capacity["metadata"]["threshold"] == "0.8"
    assert m.LS_HEADROOM_RPS in capacity["metadata"]["query"]
    assert f"{m.REQUESTS}_total" in capacity["metadata"]["query"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["serverAddress"] == autoscaling.DEFAULT_PROMETHEUS_URL
        assert "gpu" not in trigger["metadata"]["query"].lower()
        assert f'pod=~"{chat.pool}-[a-z0-9]+-[a-z0-9]+"' in trigger["metadata"]["query"]
    assert scaled["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"


def test_a_be_service_scales_on_its_backlog_alone():
    batch = member("batch", be_spec(scaling={**KEDA, "targetWaitingRequestsPerReplica": 64}))
    scaled = autoscaling.render_scaled_object(batch)
    assert validation_errors(scaled, KEDA_CRD, "v1alpha1") == []
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["name"] == "queue" and trigger["metadata"]["threshold"] == "64"
    assert 'class="BE"' in trigger["metadata"]["query"]


def test_the_vendored_keda_schema_catches_what_keda_would_refuse():
    scaled = autoscaling.render_scaled_object(member("chat", ls_spec(scaling=KEDA)))
    scaled["spec"]["minReplicaCount"] = 5
    assert validation_errors(scaled, KEDA_CRD, "v1alpha1")
    scaled = autoscaling.render_scaled_object(member("chat", ls_spec(scaling=KEDA)))
    scaled["spec"]["triggers"][0]["metadta"] = scaled["spec"]["triggers"][0].pop("metadata")
    assert validation_errors(scaled, KEDA_CRD, "v1alpha1")


@dataclass(frozen=True)
class Pod:
    name: str
    endpoint: str | None


def test_a_scale_down_removes_not_ready_replicas_then_those_with_the_least_in_flight():
    pods = [Pod("p-a", "10.0.0.1:8000"), Pod("p-b", "10.0.0.2:8000"), Pod("p-c", None), Pod("p-d", "10.0.0.4:8000")]
    in_flight = {"10.0.0.1:8000": 12.0, "10.0.0.2:8000": 1.0, "10.0.0.4:8000": 30.0}
    assert autoscaling.deletion_order(pods, in_flight, 1) == ["p-c"]
    assert autoscaling.deletion_order(pods, in_flight, 3) == ["p-c", "p-b", "p-a"]
    assert autoscaling.deletion_order(pods, {}, 1) == ["p-c"]


def test_the_scrape_reads_what_a_replica_has_in_flight():
    text = (f'# TYPE vllm:num_requests_running gauge\n{m.NUM_RUNNING}{{model_name="a",class="LS"}} 3\n'
            f'# TYPE vllm:num_requests_waiting gauge\n{m.NUM_WAITING}{{model_name="a",class="LS"}} 2\n'
            f'{m.NUM_WAITING}{{model_name="b",class="BE"}} 4\n')  # fmt: skip
    assert parse_exposition(text, at=0.0).in_flight == 9


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
async def test_scale_through_the_subresource_up_and_down_with_the_idlest_replica_marked_to_go(
        cluster, operator, runtime_factory):  # fmt: skip
    await cluster.add_gpu_node("gpu-a", gpus=4)
    busy, idle = runtime_factory(), runtime_factory()
    busy.set(services={"chat": {"class": "LS", "running": 8, "waiting": 3}}, headroom=1.0)
    idle.set(services={"chat": {"class": "LS", "running": 0}}, headroom=1.0)
    # replicas: 1 as the API server defaults it (the emulated one applies no defaults)
    await cluster.create("chat", ls_spec(replicas=1, scaling={"minReplicas": 1, "maxReplicas": 3}))
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")
    pool = cluster.status("chat")["pool"]
    scale = await eventually(lambda: cluster.status("chat").get("selector") and cluster.status("chat"),
                             what="status.selector")  # fmt: skip
    assert scale["selector"] == f"{pools.LABEL_POOL}={pool}"
    read = await cluster.read_scale("chat")
    assert (read["spec"]["replicas"], read["status"]["replicas"]) == (1, 1)
    assert read["status"]["selector"] == f"{pools.LABEL_POOL}={pool}"

    await cluster.scale("chat", 2)
    await eventually(lambda: cluster.deployment(pool)["spec"]["replicas"] == 2, what="scaled up to 2")
    await cluster.run_replicas(pool, node="gpu-a", port=busy.port, count=1)
    idle_pod = (await cluster.run_replicas(pool, node="gpu-a", port=idle.port, count=2))[0]
    await eventually(lambda: cluster.status("chat").get("readyReplicas") == 2, what="two ready replicas")
    await eventually(lambda: cluster.status("chat").get("measured"), what="a scrape of both")

    await cluster.scale("chat", 1)
    await eventually(lambda: cluster.deployment(pool)["spec"]["replicas"] == 1, what="scaled down to 1")
    marked = [p["metadata"]["name"] for p in cluster.api.all("v1/pods", NAMESPACE)
              if (p["metadata"].get("annotations") or {}).get(autoscaling.DELETION_COST_ANNOTATION)]
    assert marked == [idle_pod], "the replica with nothing in flight goes first"
    assert (await cluster.read_scale("chat"))["spec"]["replicas"] == 1


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
async def test_keda_gets_a_scaled_object_while_the_autoscaler_is_on(cluster, operator):
    await cluster.add_gpu_node("gpu-a", gpus=4)
    await cluster.create("chat", ls_spec(scaling=KEDA))
    scaled = await eventually(lambda: cluster.api.live("keda.sh/v1alpha1/scaledobjects", NAMESPACE, "chat"),
                              what="ScaledObject")  # fmt: skip
    assert scaled["spec"]["scaleTargetRef"]["name"] == "chat"
    assert validation_errors({k: v for k, v in scaled.items() if k != "status"}, KEDA_CRD, "v1alpha1") == []
    await cluster.patch("chat", {"spec": {"scaling": {"autoscaler": "none"}}})
    await eventually(lambda: cluster.api.live("keda.sh/v1alpha1/scaledobjects", NAMESPACE, "chat") is None,
                     what="ScaledObject deleted")  # fmt: skip
