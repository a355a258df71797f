"""cpuAttentionNodes: the RayCluster the operator renders for a pool, the runtime's side of it, and the
condition that mirrors it (or says KubeRay is missing). No cluster: rendering and status are pure functions,
and the body is checked against KubeRay's own CRD schema (vendored in tests/operator/schemas/)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from crd_validation import validation_errors
from pydantic import ValidationError

from piggyback_operator import pools, raycluster
from piggyback_operator.api import LLMServiceSpec
from piggyback_runtime.config import RuntimeConfig

SCHEMA = "ray.io_rayclusters.yaml"
NODES = {"replicas": 4, "resources": {"cpu": "32", "memory": "256Gi"},
         "nodeSelector": {"node.kubernetes.io/role": "cpu"},
         "tolerations": [{"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}]}  # fmt: skip
OWNER = {"metadata": {"name": "default-abc", "uid": "uid-deploy"}}


def member(name: str = "batch", nodes: dict[str, Any] | None = NODES) -> pools.Member:
    body: dict[str, Any] = {"model": {"uri": "synthetic://tiny-llama"}, "class": "BE"}
    if nodes is not None:
        body["cpuAttentionNodes"] = nodes
    return pools.Member(name, "ns", f"uid-{name}", LLMServiceSpec.model_validate(body), True, False, name)


def test_the_rendered_raycluster_is_valid_kuberay_and_keeps_workers_on_cpu_only_nodes() -> None:
    nodes = raycluster.wanted([member()])
    assert nodes is not None
    body = raycluster.render("default-abc", "ns", nodes, "img:1", OWNER, pools.labels("default-abc"))
    assert validation_errors(body, SCHEMA, "v1") == []
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-deploy"
    (group,) = body["spec"]["workerGroupSpecs"]
    assert group["replicas"] == 4
    assert json.loads(group["rayStartParams"]["resources"]) == {raycluster.NODE_RESOURCE: 1}
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/role": "cpu"}
    assert pod["tolerations"] == [{"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "32", "memory": "256Gi"}
    # The head takes no actor: attention workers only ever land on the worker group.
    assert body["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_a_broken_raycluster_fails_the_vendored_schema() -> None:
    nodes = raycluster.wanted([member()])
    assert nodes is not None
    body = raycluster.render("default-abc", "ns", nodes, "img:1", OWNER, {})
    body["spec"]["workerGroupSpecs"][0]["replicas"] = "four"
    assert validation_errors(body, SCHEMA, "v1")


def test_the_runtime_joins_the_ray_cluster_as_its_driver() -> None:
    nodes = raycluster.wanted([member()])
    assert nodes is not None
    remote = raycluster.remote_section(nodes)
    configmap, deployment = pools.render_children("default-abc", "ns", [member()], 1, 0, remote,
                                                  raycluster.ray_address("default-abc", "ns"))  # fmt: skip
    config = RuntimeConfig.from_dict(yaml.safe_load(configmap["data"][pools.CONFIG_KEY]))
    assert config.piggyback.remote is not None
    assert config.piggyback.remote.num_nodes == 4 and config.piggyback.remote.address == "auto"
    assert config.piggyback.remote.node_resource == raycluster.NODE_RESOURCE
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_ADDRESS"] == "default-abc-cpu-head-svc.ns.svc:6379"
    # Without CPU attention nodes (or without KubeRay) the runtime gets neither.
    configmap, deployment = pools.render_children("default-abc", "ns", [member(nodes=None)], 1, 0)
    assert "remote" not in configmap["data"][pools.CONFIG_KEY]
    assert "RAY_ADDRESS" not in str(deployment)


def test_the_condition_mirrors_the_raycluster_or_says_kuberay_is_missing() -> None:
    nodes = raycluster.wanted([member()])
    assert nodes is not None
    missing = raycluster.condition(False, None, nodes)
    assert (missing.status, missing.reason) == ("False", raycluster.REASON_NOT_INSTALLED)
    pending = raycluster.condition(True, {"metadata": {"name": "c"}, "status": {"availableWorkerReplicas": 1}},
                                   nodes)  # fmt: skip
    assert (pending.status, pending.reason) == ("False", "RayClusterNotReady") and "1/4" in pending.message
    ready = raycluster.condition(True, {"metadata": {"name": "c"},
                                        "status": {"state": "ready", "availableWorkerReplicas": 4}}, nodes)  # fmt: skip
    assert (ready.status, ready.reason) == ("True", "RayClusterReady")


def test_bad_cpu_attention_nodes_are_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"cpuAttentionNodes\.replicas"):
        member(nodes={"replicas": -1})
    with pytest.raises(ValidationError, match=r"cpuAttentionNodes\.resources\.memory"):
        member(nodes={"resources": {"memory": "lots"}})
