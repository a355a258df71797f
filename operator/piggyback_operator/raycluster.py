"""Remote CPU attention nodes: a KubeRay RayCluster of CPU-only workers for a pool (LLMService
`cpuAttentionNodes`), the runtime pods as its drivers.

The RayCluster (ray.io/v1) has a head that runs nothing (num-cpus 0: no attention actor lands on it) and one
worker group, `cpu-attention`, on the CPU-only nodes the spec selects. Each worker carries the custom Ray
resource the runtime's actors ask for (`piggyback_cpu_attention`), so they never land on a GPU node. It is
owned by the pool's Deployment (garbage-collected with it). The runtime pods get RAY_ADDRESS (the head's
service) and `piggyback.remote` in their config.

Only when the KubeRay CRD is served (API discovery: /apis/ray.io/v1 lists rayclusters); otherwise the members'
status says so with reason `KubeRayNotInstalled`, and BE attention stays on the pods' host CPUs.

Tests check the rendered body against KubeRay's own CRD schema (tests/operator/schemas/, Apache-2.0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from piggyback_operator.api import CPUAttentionNodes
from piggyback_operator.conditions import FALSE, TRUE, Cond
from piggyback_operator.quantity import parse_quantity

GROUP_VERSION = "ray.io/v1"
PLURAL = "rayclusters"
NODE_RESOURCE = "piggyback_cpu_attention"  # RemoteNodesConfig.node_resource's default, set on every worker
RAY_GCS_PORT = 6379
CONDITION = "CPUAttentionNodes"
REASON_NOT_INSTALLED = "KubeRayNotInstalled"


def cluster_name(pool: str) -> str:
    return f"{pool}-cpu"


def ray_address(pool: str, namespace: str) -> str:
    """The head's GCS address as the runtime pods reach it (KubeRay names the head service <cluster>-head-svc)."""
    return f"{cluster_name(pool)}-head-svc.{namespace}.svc:{RAY_GCS_PORT}"


def wanted(members: Sequence[Any]) -> CPUAttentionNodes | None:
    """The pool's cpuAttentionNodes: its first member (by name) that asks for them."""
    for member in sorted(members, key=lambda m: m.name):
        if member.spec.cpu_attention_nodes is not None:
            nodes: CPUAttentionNodes = member.spec.cpu_attention_nodes
            return nodes
    return None


def remote_section(nodes: CPUAttentionNodes) -> dict[str, Any]:
    """The runtime's `piggyback.remote` for these workers (one attention worker per worker pod)."""
    cores = parse_quantity(nodes.resources.cpu)
    memory_gib = parse_quantity(nodes.resources.memory) / 2**30
    return {
        "address": "auto", "num_nodes": max(1, nodes.replicas), "workers_per_node": 1,
        "cpus_per_worker": max(1.0, cores - 1), "memory_per_worker_gib": max(0.5, memory_gib * 0.9),
        "node_resource": NODE_RESOURCE,
    }  # fmt: skip


def render(pool: str, namespace: str, nodes: CPUAttentionNodes, image: str, owner: Mapping[str, Any],
           labels: Mapping[str, str]) -> dict[str, Any]:  # fmt: skip
    """The RayCluster body, owner-referenced to the pool's Deployment `owner`."""
    cpu, memory = nodes.resources.cpu, nodes.resources.memory
    cores = max(1, int(parse_quantity(cpu)))
    worker_resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in nodes.tolerations]
    worker_pod: dict[str, Any] = {
        "containers": [{
            "name": "ray-worker", "image": image,
            "resources": worker_resources,
            "env": [{"name": "HOME", "value": "/tmp"}],
        }],
    }  # fmt: skip
    if nodes.node_selector:
        worker_pod["nodeSelector"] = dict(nodes.node_selector)
    if tolerations:
        worker_pod["tolerations"] = tolerations
    head_resources = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "RayCluster",
        "metadata": {
            "name": cluster_name(pool), "namespace": namespace, "labels": dict(labels),
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "headGroupSpec": {
                # num-cpus 0: the head runs no actor; the GCS is all it serves.
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": {"spec": {"containers": [{"name": "ray-head", "image": image,
                                                      "resources": head_resources}]}},
            },
            "workerGroupSpecs": [{
                "groupName": "cpu-attention",
                "replicas": nodes.replicas, "minReplicas": nodes.replicas, "maxReplicas": max(1, nodes.replicas),
                "rayStartParams": {
                    "num-cpus": str(cores),
                    "resources": json.dumps({NODE_RESOURCE: 1}),
                },
                "template": {"spec": worker_pod},
            }],
        },
    }  # fmt: skip


def condition(installed: bool, cluster: Mapping[str, Any] | None, nodes: CPUAttentionNodes) -> Cond:
    """The members' CPUAttentionNodes condition, mirroring the RayCluster's status."""
    if not installed:
        return Cond(CONDITION, FALSE, REASON_NOT_INSTALLED,
                    "cpuAttentionNodes needs the KubeRay operator (CRD rayclusters.ray.io/v1 is not served); BE "
                    "attention stays on the runtime pods' host CPUs")  # fmt: skip
    status = (cluster or {}).get("status") or {}
    available = int(status.get("availableWorkerReplicas") or status.get("readyWorkerReplicas") or 0)
    state = str(status.get("state") or "")
    name = ((cluster or {}).get("metadata") or {}).get("name", "")
    if cluster is None:
        return Cond(CONDITION, FALSE, "RayClusterPending", "RayCluster not created yet")
    if state.lower() == "ready" and available >= nodes.replicas:
        return Cond(CONDITION, TRUE, "RayClusterReady", f"RayCluster {name}: {available}/{nodes.replicas} CPU "
                    "attention workers ready")  # fmt: skip
    reason = str(status.get("reason") or "")
    return Cond(CONDITION, FALSE, "RayClusterNotReady",
                f"RayCluster {name}: state {state or 'unknown'}, {available}/{nodes.replicas} workers ready"
                + (f" ({reason})" if reason else ""))  # fmt: skip
