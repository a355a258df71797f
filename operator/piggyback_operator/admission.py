"""Admission of an LLMService into its pool: a pure function of the pool, the nodes and the runtime figures.

LS: joins only while every admitted LS service of the pool meets its attainment target and the runtimes'
predicted headroom covers the newcomer's expected request rate; otherwise the pool grows by one replica
within `scaling` if a matching GPU node has a free GPU, else the service waits (InsufficientSLOHeadroom or
NoGPUNode). BE: joins only while host memory for its KV fits on the nodes that serve (or would serve) the pool.
BE rows never delay LS work (the runtime gives LS priority), so BE members need no protection from LS ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from piggyback_operator import pools
from piggyback_operator.placement import NodeRoom, matches
from piggyback_operator.quantity import format_bytes, parse_quantity
from piggyback_operator.scrape import PoolFigures

ADMITTED = "Admitted"
NO_GPU_NODE = "NoGPUNode"
INSUFFICIENT_SLO_HEADROOM = "InsufficientSLOHeadroom"
INSUFFICIENT_HOST_MEMORY = "InsufficientHostMemory"
SCALING_UP = "ScalingUp"
WAITING_FOR_METRICS = "WaitingForMetrics"
PLACEMENT_CONFLICT = "PlacementConflict"


@dataclass(frozen=True)
class PoolState:
    name: str
    admitted: Sequence[pools.Member]  # members already in the rendered pool (not the candidate)
    replicas: int  # the Deployment's current spec.replicas (0 when it does not exist yet)
    ready_endpoints: Sequence[str]
    serving_nodes: Mapping[str, int]  # node -> runtime pods of this pool on it
    figures: PoolFigures | None


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: str
    message: str
    scale_to: int | None = None  # grow the pool's Deployment to this many replicas
    permanent: bool = False  # nothing changes until the spec does

    @property
    def outcome(self) -> str:
        return "admitted" if self.admitted else "scaling" if self.scale_to else "rejected"


def decide(candidate: pools.Member, pool: PoolState, rooms: Mapping[str, NodeRoom]) -> Decision:
    everyone = [*pool.admitted, candidate]
    selector, conflicts = pools.merged_node_selector(everyone)
    if conflicts:
        return Decision(False, PLACEMENT_CONFLICT, (
            f"placement.nodeSelector conflicts with the pool {pool.name}: {', '.join(conflicts)}; "
            "use the same selector or another placement.pool"), permanent=True)  # fmt: skip
    tolerations = pools.merged_tolerations(everyone)
    gpus = pools.gpus_per_replica(everyone)
    matching = [r for r in rooms.values() if matches(r.node, selector, tolerations, gpus)]
    if not matching:
        return Decision(False, NO_GPU_NODE, _no_gpu_message(selector, gpus, len(rooms)))
    if candidate.service_class == "BE":
        return _decide_be(candidate, pool, matching)
    return _decide_ls(candidate, pool, matching, gpus)




def _no_gpu_message(selector: Mapping[str, str], gpus: int, nodes: int) -> str:
    where = f" matching nodeSelector {dict(selector)}" if selector else ""
    return (
        f"no schedulable node{where} has {gpus} allocatable nvidia.com/gpu (and tolerated taints) "
        f"among {nodes} nodes; add a GPU node or relax spec.placement; retrying"
    )


def _decide_be(candidate: pools.Member, pool: PoolState, matching: Sequence[NodeRoom]) -> Decision:
    need = parse_quantity(candidate.spec.resources.host_memory)
    if pool.serving_nodes:
        short = []
        for r in matching:
            replicas_here = pool.serving_nodes.get(r.node.name, 0)
            if replicas_here and r.memory_bytes < need * replicas_here:
                short.append(f"{r.node.name} has {format_bytes(max(r.memory_bytes, 0))} free")
        served = [r for r in matching if r.node.name in pool.serving_nodes]
        if short or not served:
            return Decision(False, INSUFFICIENT_HOST_MEMORY, (
                f"BE KV cache needs {format_bytes(need)} host memory per replica on the pool's nodes, but "
                f"{'; '.join(short) or 'the serving nodes are not schedulable'}; retrying"))  # fmt: skip
        return Decision(True, ADMITTED, (
            f"host memory for BE KV ({format_bytes(need)} per replica) fits on "
            f"{', '.join(sorted(pool.serving_nodes))}"))  # fmt: skip
    per_replica = pools.memory_per_replica([*pool.admitted, candidate])
    if not any(r.memory_bytes >= per_replica for r in matching):
        best = max(r.memory_bytes for r in matching)
        return Decision(False, INSUFFICIENT_HOST_MEMORY, (
            f"a replica of pool {pool.name} with this BE service needs {format_bytes(per_replica)} host memory; "
            f"the matching GPU node with most room has {format_bytes(max(best, 0))} free; retrying"))  # fmt: skip
    return Decision(True, ADMITTED, f"host memory for BE KV ({format_bytes(need)} per replica) fits on a GPU node")


def _decide_ls(candidate: pools.Member, pool: PoolState, matching: Sequence[NodeRoom], gpus: int) -> Decision:
    protected = [m for m in pool.admitted if m.service_class == "LS"]
    if not protected:
        return Decision(True, ADMITTED, f"first LS service of pool {pool.name}: no LS SLO to protect")
    figures = pool.figures
    if not pool.ready_endpoints or figures is None or figures.pods == 0:
        return Decision(False, WAITING_FOR_METRICS, (
            f"pool {pool.name} has no ready runtime to measure SLO attainment and headroom; retrying"))
    missing: list[str] = []
    for m in protected:
        f = figures.service(m.name)
        assert m.spec.slo is not None
        measured = f is not None and f.attainment is not None and bool(f.window_requests)
        if measured and f is not None and f.attainment is not None and f.attainment < m.spec.slo.attainment_target:
            missing.append(f"{m.name} attains {f.attainment:.3f} < target {m.spec.slo.attainment_target}")
    load = candidate.spec.expected_load.requests_per_second
    headroom = figures.headroom_rps
    if not missing and headroom is None:
        return Decision(True, ADMITTED, (
            f"LS attainment of pool {pool.name} meets every target; the runtime exports no headroom "
            f"prediction, so admitted on measured attainment only (expected load {load:g} req/s)"))  # fmt: skip
    if not missing and headroom is not None and headroom >= load:
        return Decision(True, ADMITTED, (
            f"predicted headroom {headroom:g} req/s covers expected load {load:g} req/s and LS attainment "
            f"of pool {pool.name} meets every target"))  # fmt: skip
    why = "; ".join(missing) if missing else f"predicted headroom {headroom:g} req/s < expected load {load:g} req/s"
    ceiling = max(m.spec.max_replicas for m in [*pool.admitted, candidate])
    if len(pool.ready_endpoints) < pool.replicas:
        return Decision(False, SCALING_UP, (
            f"{why}; waiting for pool {pool.name} to have {pool.replicas} ready replicas "
            f"({len(pool.ready_endpoints)} now); retrying"))  # fmt: skip
    if pool.replicas < ceiling:
        if any(r.gpus >= gpus for r in matching):
            return Decision(False, SCALING_UP, (
                f"{why}; scaling pool {pool.name} from {pool.replicas} to {pool.replicas + 1} replicas "
                f"(max {ceiling}); retrying"), scale_to=pool.replicas + 1)  # fmt: skip
        return Decision(False, NO_GPU_NODE, (
            f"{why}; no matching GPU node has {gpus} free nvidia.com/gpu to add a replica to pool "
            f"{pool.name}; retrying"))  # fmt: skip
    return Decision(False, INSUFFICIENT_SLO_HEADROOM, (
        f"{why}; pool {pool.name} is at its maximum of {ceiling} replicas (raise spec.scaling.maxReplicas, "
        "lower spec.expectedLoad, or use another placement.pool); retrying"))  # fmt: skip
