"""Where a tensor-parallel rank's CPU attention workers run: on the NUMA node nearest the rank's GPU.

A rank's host KV shard and the workers that read it should sit on the memory node the GPU's PCIe root hangs
off: the BE rows' q/k/v and results cross PCIe to and from there, and the workers' DRAM reads stay local. The
rank process pins itself before it starts its workers (they inherit the affinity). On a host with one node
(or where /sys does not say) nothing changes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SYS_NODES = Path("/sys/devices/system/node")
SYS_PCI = Path("/sys/bus/pci/devices")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def read_nodes(root: Path = SYS_NODES) -> dict[int, list[int]]:
    """NUMA node -> its CPUs, from /sys (empty where the kernel exposes no nodes)."""
    nodes: dict[int, list[int]] = {}
    for path in sorted(root.glob("node[0-9]*")):
        try:
            nodes[int(path.name.removeprefix("node"))] = parse_cpulist((path / "cpulist").read_text())
        except (OSError, ValueError):
            continue
    return nodes


def read_pci_numa_node(pci_bus_id: str, root: Path = SYS_PCI) -> int | None:
    """The NUMA node of a PCI device ('0000:3b:00.0'), or None where unknown (-1 in /sys: a single node)."""
    try:
        node = int((root / pci_bus_id.lower() / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def choose_worker_cpus(gpu_node: int | None, nodes: dict[int, list[int]], allowed: set[int]) -> list[int] | None:
    """The CPUs a rank (and its workers) should run on: those of its GPU's node that this process may use.
    None (leave the affinity alone) with one node or none, an unknown GPU node, or no allowed CPU there."""
    if len(nodes) < 2 or gpu_node is None or gpu_node not in nodes:
        return None
    cpus = sorted(set(nodes[gpu_node]) & allowed)
    return cpus or None


def pin_near_gpu(pci_bus_id: str | None) -> list[int] | None:
    """Pin this process to the CPUs of the NUMA node nearest its GPU (see `choose_worker_cpus`)."""
    if pci_bus_id is None or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = choose_worker_cpus(read_pci_numa_node(pci_bus_id), read_nodes(), set(os.sched_getaffinity(0)))
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
        log.info("pinned to the %d CPUs of the NUMA node nearest GPU %s", len(cpus), pci_bus_id)
    return cpus
