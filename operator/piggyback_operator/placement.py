"""Which nodes can host a pool: allocatable `nvidia.com/gpu`, labels, taints, and what is still free."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from piggyback_operator.api import Toleration
from piggyback_operator.quantity import parse_quantity

GPU_RESOURCE = "nvidia.com/gpu"
_BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, Any], ...]
    gpus: float
    memory_bytes: float
    cpu_cores: float
    unschedulable: bool = False

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> NodeInfo:
        allocatable = body.get("status", {}).get("allocatable", {}) or {}
        spec = body.get("spec", {}) or {}
        return cls(
            name=body["metadata"]["name"],
            labels=dict(body["metadata"].get("labels") or {}),
            taints=tuple(spec.get("taints") or ()),
            gpus=parse_quantity(allocatable.get(GPU_RESOURCE)),
            memory_bytes=parse_quantity(allocatable.get("memory")),
            cpu_cores=parse_quantity(allocatable.get("cpu")),
            unschedulable=bool(spec.get("unschedulable")),
        )


@dataclass(frozen=True)
class PodUsage:
    """What one scheduled, non-terminated pod takes from its node."""

    node: str
    gpus: float
    memory_bytes: float
    cpu_cores: float

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PodUsage | None:
        node = body.get("spec", {}).get("nodeName")
        if not node or body.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return None
        gpus = memory = cpu = 0.0
        for container in body.get("spec", {}).get("containers", []) or []:
            resources = container.get("resources", {}) or {}
            requests = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
            gpus += parse_quantity(requests.get(GPU_RESOURCE))
            memory += parse_quantity(requests.get("memory"))
            cpu += parse_quantity(requests.get("cpu"))
        return cls(node=node, gpus=gpus, memory_bytes=memory, cpu_cores=cpu)


def tolerates(taint: Mapping[str, Any], tolerations: Iterable[Toleration]) -> bool:
    for t in tolerations:
        if t.effect is not None and t.effect != taint.get("effect"):
            continue
        if t.operator == "Exists" and (t.key is None or t.key == taint.get("key")):
            return True
        if t.operator == "Equal" and t.key == taint.get("key") and (t.value or "") == (taint.get("value") or ""):
            return True
    return False


def matches(
    node: NodeInfo, node_selector: Mapping[str, str], tolerations: Iterable[Toleration], gpus: int
) -> bool:
    """The node has enough allocatable GPUs for one replica and the placement allows it."""
    tolerations = list(tolerations)
    return (
        not node.unschedulable
        and node.gpus >= gpus
        and all(node.labels.get(k) == v for k, v in node_selector.items())
        and all(
            tolerates(taint, tolerations) for taint in node.taints if taint.get("effect") in _BLOCKING_EFFECTS
        )
    )


@dataclass
class NodeRoom:
    """Free capacity of a node: allocatable minus what scheduled pods request."""

    node: NodeInfo
    gpus: float
    memory_bytes: float
    pods_by_pool: dict[str, int] = field(default_factory=dict)


def room(nodes: Iterable[NodeInfo], usages: Iterable[PodUsage]) -> dict[str, NodeRoom]:
    rooms = {n.name: NodeRoom(node=n, gpus=n.gpus, memory_bytes=n.memory_bytes) for n in nodes}
    for usage in usages:
        if usage.node in rooms:
            rooms[usage.node].gpus -= usage.gpus
            rooms[usage.node].memory_bytes -= usage.memory_bytes
    return rooms


# Labels NVIDIA's GPU feature discovery puts on GPU nodes: the product name and each GPU's memory in MiB (for a
# MIG-partitioned GPU in the "single" strategy, the product carries the slice's profile, e.g. -MIG-1g.5gb).
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
# Products whose names carry no size: the memory the driver reports, in MiB.
_GPU_MEMORY_MIB_BY_PRODUCT = {
    "NVIDIA-L4": 23034, "NVIDIA-A10": 23028, "NVIDIA-A10G": 23028, "NVIDIA-L40": 46068, "NVIDIA-L40S": 46068,
    "NVIDIA-H200": 143771, "Tesla-T4": 15360, "Tesla-V100-SXM2-16GB": 16384,
}  # fmt: skip
_SIZE_IN_NAME = re.compile(r"(\d+)GB", re.IGNORECASE)


def gpu_memory_bytes(labels: Mapping[str, str]) -> float | None:
    """One GPU's memory from node labels (or a nodeSelector pinning them); None when they do not say.

    gpu.memory wins; else the size in the product name, as decimal GB (80GB is 80e9 bytes, at or below what such
    a GPU reports, so a figure from a name never overstates the device); else the table above."""
    memory_mib = labels.get(GPU_MEMORY_LABEL, "").strip()
    if memory_mib.isdigit() and int(memory_mib) > 0:
        return int(memory_mib) * 2**20
    product = labels.get(GPU_PRODUCT_LABEL, "").strip()
    if not product:
        return None
    # A MIG slice's size is in its profile (the last size in the name), not the parent GPU's.
    sizes = _SIZE_IN_NAME.findall(product.rsplit("-MIG-", 1)[-1] if "-MIG-" in product else product)
    if sizes:
        return int(sizes[-1]) * 1e9
    mib = _GPU_MEMORY_MIB_BY_PRODUCT.get(product)
    return None if mib is None else mib * 2**20
