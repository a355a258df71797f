"""The Ray side: attention actors placed on CPU-only nodes by a SPREAD placement group.

Ray does placement, lifecycle and failure detection only; per-layer traffic goes over each actor's own TCP
stream (node.py). Ray's defaults stay: no actor restarts and no task retries, because an attention call
that appends KV is not idempotent. A dead actor is replaced by a new one in the same bundle (Ray re-places
the bundle when its node is gone), and its capacity returns when the new actor answers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from typing import Any

from piggyback_runtime.config import RemoteNodesConfig

GIB = 1 << 30


class AttentionNodeActor:
    """Runs a NodeServer inside a Ray worker process on a CPU-only node."""

    def __init__(self, token: str) -> None:
        from piggyback_runtime.attention.cpu_attention import native_available
        from piggyback_runtime.piggyback.remote.node import NodeServer

        # Build or load the native kernel before saying where to connect: "up" must mean ready to serve at
        # speed, or the first layer's batch pays the load and can miss the layer deadline.
        native_available()
        self.server = NodeServer(token)

    def address(self) -> tuple[str, int, int]:
        """(IP, port, pid): where the engine connects, and the process (for logs and tests)."""
        import ray

        return ray.util.get_node_ip_address(), self.server.port, os.getpid()

    def ping(self, payload: bytes) -> int:
        """An actor call carrying `payload` (benchmarks/remote_nodes.py: Ray's per-call cost)."""
        return len(payload)


@dataclass
class ActorHandle:
    """One started actor: its Ray handle and the pending `address()` call that says it is up."""

    handle: Any
    ready_ref: Any


class RayPlacement:
    """Connects to Ray, reserves one bundle per remote worker (SPREAD over nodes with the custom resource) and
    starts / kills the actors. All Ray calls of the runtime are here."""

    def __init__(self, config: RemoteNodesConfig) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.config = config
        self.token = secrets.token_hex(16)
        if not ray.is_initialized():
            ray.init(address=config.address, namespace=config.namespace, log_to_driver=False,
                     ignore_reinit_error=True)  # fmt: skip
        bundle: dict[str, float] = {"CPU": float(config.cpus_per_worker), config.node_resource: 1.0,
                                    "memory": float(config.memory_per_worker_gib * GIB)}  # fmt: skip
        self.num_workers = config.num_nodes * config.workers_per_node
        self.group = placement_group([dict(bundle) for _ in range(self.num_workers)], strategy="SPREAD")
        self._actor_class = ray.remote(num_cpus=config.cpus_per_worker, memory=config.memory_per_worker_gib * GIB,
                                       resources={config.node_resource: 1})(AttentionNodeActor)  # fmt: skip

    def start(self, index: int) -> ActorHandle:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)
        handle = self._actor_class.options(scheduling_strategy=strategy, name=None).remote(self.token)
        return ActorHandle(handle, handle.address.remote())

    @staticmethod
    def address_if_ready(actor: ActorHandle) -> tuple[str, int, int] | None:
        """The actor's address once it is up; None while it is still being placed. Raises if it died."""
        import ray

        ready, _ = ray.wait([actor.ready_ref], timeout=0)
        if not ready:
            return None
        return tuple(ray.get(actor.ready_ref))  # type: ignore[return-value]

    @staticmethod
    def kill(actor: ActorHandle) -> None:
        import ray

        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor.handle, no_restart=True)

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):  # Ray already shut down
            remove_placement_group(self.group)
