"""Remote CPU attention nodes, without Ray: the node server runs on a thread of this process (ThreadPlacement
stands in for Ray's actors), the engine and its stream are the real ones.

Exact BE tokens whether a request's attention runs on a local worker or a remote node, including a request
whose node dies mid-run and is prefilled again elsewhere; with retries off, the lost node's requests end with
an error and nothing else does. (tests/runtime/test_remote_ray.py runs the same path on a real Ray cluster.)
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.config import ConfigError, RuntimeConfig
from piggyback_runtime.engine import Engine
from piggyback_runtime.piggyback import be_path
from piggyback_runtime.piggyback.remote import actor as actor_module
from piggyback_runtime.piggyback.remote.node import NodeServer
from piggyback_runtime.piggyback.remote.pool import HybridAttentionPool
from tests.runtime.helpers import (
    assert_matches_reference,
    greedy,
    hf_reference,
    make_request,
    reference_greedy,
    run_to_completion,
    tiny_config,
)

# Engines with CPU worker processes and node servers; a loaded shared machine starts workers slowly.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = [[1, *range(30, 30 + n)] for n in (4, 19, 33, 2, 11, 7)]
MAX_TOKENS = 16


class ThreadPlacement:
    """Placement on threads of this process: one NodeServer per remote worker."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.token = secrets.token_hex(8)
        self.servers: list[NodeServer] = []

    def start(self, index: int) -> NodeServer:
        server = NodeServer(self.token, host="127.0.0.1")
        self.servers.append(server)
        return server

    def address_if_ready(self, actor: NodeServer) -> tuple[str, int, int]:
        return "127.0.0.1", actor.port, os.getpid()

    def kill(self, actor: NodeServer) -> None:
        actor.close()

    def close(self) -> None:
        pass


def remote_config(num_nodes: int = 2, **remote: Any) -> RuntimeConfig:
    return tiny_config(policy="piggyback", max_num_batched_tokens=16, piggyback={
        "max_be_rows_per_layer": 3,
        "remote": {"address": "local", "num_nodes": num_nodes, "memory_per_worker_gib": 0.01,
                   "ready_timeout_s": 600, **remote},
    })  # fmt: skip


@pytest.fixture
def threads_for_ray(monkeypatch: pytest.MonkeyPatch) -> list[ThreadPlacement]:
    made: list[ThreadPlacement] = []

    def fake(config: Any) -> ThreadPlacement:
        made.append(ThreadPlacement(config.num_nodes * config.workers_per_node))
        return made[-1]

    monkeypatch.setattr(actor_module, "RayPlacement", fake)
    return made


@pytest.fixture(scope="module")
def references() -> list[tuple[list[int], list[torch.Tensor]]]:
    engine = Engine(tiny_config())
    try:
        hf = hf_reference(engine.arch, engine.model.state_dict())
        return [reference_greedy(hf, prompt, MAX_TOKENS) for prompt in PROMPTS]
    finally:
        engine.close()


def _submit(engine: Engine, classes: str, tag: str) -> list[Any]:
    requests = [make_request(f"{tag}{i}", p, greedy(MAX_TOKENS), "LS" if c == "L" else "BE")
                for i, (p, c) in enumerate(zip(PROMPTS, classes, strict=True))]  # fmt: skip
    for request in requests:
        engine.add_request(request)
    return requests


@pytest.fixture
def engine(threads_for_ray: list[ThreadPlacement]) -> Iterator[Engine]:
    engine = Engine(remote_config())
    yield engine
    engine.close()


def test_remote_config_is_validated_with_field_names() -> None:
    with pytest.raises((ConfigError, ValueError), match="address"):
        remote_config(address="not an address")
    with pytest.raises((ConfigError, ValueError), match="node_resource"):
        remote_config(node_resource="GPU")
    with pytest.raises((ConfigError, ValueError), match="layer_deadline_ms"):
        remote_config(layer_deadline_ms=0)


T = TypeVar("T")


def _record_registrations(engine: Engine, note: Callable[[str, int], T]) -> dict[str, T]:
    """request id -> `note(request id, worker)` for every BE row the piggyback path registers on a worker, taken
    at registration (wraps the pool's `register`)."""
    pool = engine.piggyback.pool
    recorded: dict[str, T] = {}
    original = pool.register

    def spy(worker: int, slot: int, blocks: list[int]) -> None:
        rid = engine.piggyback.row_by_slot[slot].request.request_id
        recorded[rid] = note(rid, worker)
        original(worker, slot, blocks)

    pool.register = spy  # type: ignore[method-assign]
    return recorded


def test_be_tokens_are_exact_on_local_workers_and_remote_nodes(engine: Engine, references) -> None:
    pool = engine.piggyback.pool
    assert isinstance(pool, HybridAttentionPool) and all(w.ready for w in pool.remote)
    placed = _record_registrations(engine, lambda rid, worker: worker)
    mixed = _submit(engine, "BLBBBB", "mix")
    run_to_completion(engine)
    for request, (ref, logits) in zip(mixed, references, strict=True):
        assert request.finish_reason == "length", request.error
        assert_matches_reference(request.output_token_ids, ref, logits)
    assert set(placed.values()) >= {0, 1, 2}, f"BE rows should land on the local worker and both nodes: {placed}"
    for worker in ("1", "2"):
        assert engine.metrics.remote_be_rows.labels(worker)._value.get() > 0
        assert engine.metrics.remote_bytes_sent.labels(worker)._value.get() > 0
    assert pool.remote_capacity().rows == 0, "remote rows leaked"
    assert engine.piggyback.host_kv.allocator.num_used == 0


def test_a_node_row_s_host_kv_is_freed_once_shipped_and_it_keeps_decoding_on_its_node(engine: Engine,
                                                                                        references) -> None:
    # Its prefill KV is staged in host KV and shipped to its node layer by layer with its first token's tasks;
    # once the last layer's task is back the host blocks are free (the slot stays: the row's identity in the
    # shared buffers), and every later token's K/V is written on the node only.
    pb = engine.piggyback
    host = pb.host_kv
    requests = _submit(engine, "BLBBBB", "ship")
    be = [r for r in requests if not r.is_ls]
    tokens_at_release: dict[str, int] = {}
    staged_blocks: dict[str, int] = {}  # host blocks a node row held when it was registered on its node
    original = pb.pool.register

    def spy(worker: int, slot: int, blocks: list[int]) -> None:
        if worker >= pb.pool.num_local:
            staged_blocks[pb.row_by_slot[slot].request.request_id] = len(blocks)
        original(worker, slot, blocks)

    pb.pool.register = spy  # type: ignore[method-assign]
    for _ in range(5_000):
        if not engine.has_work():
            break
        engine.step()
        for row in pb.rows.values():
            rid = row.request.request_id
            if not row.host_kv_released:
                continue
            assert pb.on_remote_node(row), f"{rid} released host KV on a local worker"
            assert host.blocks_of(rid) == [] and host.slot_of[rid] == row.slot
            tokens_at_release.setdefault(rid, len(row.request.output_token_ids))
        # The usage gauge reads the allocator: the released rows' blocks are out of it.
        assert engine.metrics.host_kv_usage._value.get() == host.allocator.num_used / host.num_blocks
    assert not engine.has_work()
    for request, (ref, logits) in zip(requests, references, strict=True):
        assert request.finish_reason == "length", request.error
        assert_matches_reference(request.output_token_ids, ref, logits)
    assert tokens_at_release, "no row on a node had its host KV freed"
    for rid, tokens in tokens_at_release.items():
        full_length = len(PROMPTS[int(rid.removeprefix("ship"))]) + MAX_TOKENS
        assert staged_blocks[rid] == host.allocator.blocks_for_tokens(full_length), "staged at full length"
        assert tokens < MAX_TOKENS, f"{rid} was released only at its end"
        assert len(next(r for r in be if r.request_id == rid).output_token_ids) == MAX_TOKENS
    assert host.allocator.num_used == 0 and not host.slot_of


def _kill_node_mid_run(engine: Engine, placement: ThreadPlacement, tag: str) -> tuple[list[Any], list[Any], int]:
    pb = engine.piggyback
    pool = pb.pool
    requests = _submit(engine, "BLBBBB", tag)
    be = [r for r in requests if not r.is_ls]
    for _ in range(2_000):
        engine.step()
        on_node = [r for r in be if (row := pb.rows.get(r.request_id)) is not None and row.worker == 1
                   and len(r.output_token_ids) >= 3]  # fmt: skip
        if on_node:
            break
    else:
        pytest.fail("no BE request reached remote node 1")
    lost = sum(1 for r in be if (row := pb.rows.get(r.request_id)) is not None and row.worker == 1)
    placement.servers[0].close()  # the node dies: its stream breaks
    outputs = []
    deadline = time.monotonic() + 60
    while engine.has_work() and time.monotonic() < deadline:
        outputs += engine.step()
    assert not engine.has_work(), "the engine hung after a node died"
    assert pool.restarts == 1
    return requests, outputs, lost


def test_a_dead_node_s_requests_are_prefilled_again_elsewhere_and_stay_exact(
    engine: Engine, threads_for_ray: list[ThreadPlacement], references
) -> None:
    requests, _, lost = _kill_node_mid_run(engine, threads_for_ray[0], "retry")
    for request, (ref, logits) in zip(requests, references, strict=True):
        assert request.finish_reason == "length", request.error
        assert_matches_reference(request.output_token_ids, ref, logits)
    assert engine.metrics.remote_be_retries._value.get() >= lost
    assert engine.piggyback.host_kv.allocator.num_used == 0


def test_without_retries_a_dead_node_fails_only_its_own_requests(threads_for_ray: list[ThreadPlacement]) -> None:
    engine = Engine(remote_config(retry_on_worker_loss=False))
    try:
        requests, outputs, lost = _kill_node_mid_run(engine, threads_for_ray[0], "noretry")
        failed = {o.request_id for o in outputs if o.finished and o.finish_reason == "error"}
        assert len(failed) == lost
        assert all(r.finish_reason == "length" for r in requests if r.request_id not in failed)
        assert all(r.is_ls is False for r in requests if r.request_id in failed)
        assert engine.metrics.requests.labels("batch", "BE", m.OUTCOME_FAILED)._value.get() == lost
        # The replacement node registers with no BE request in flight (the engine no longer polls).
        pool = engine.piggyback.pool
        assert not engine.has_work()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(w.ready for w in pool.remote):
            time.sleep(0.05)
        assert all(w.ready and not w.dead for w in pool.remote), "the replacement node never registered"
        assert engine.metrics.remote_worker_up.labels("1")._value.get() == 1
    finally:
        engine.close()


def test_under_hybrid_placement_rows_go_where_the_planner_placed_them_and_stay_exact(
    threads_for_ray: list[ThreadPlacement], references, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small HBM (24 blocks of 4 tokens): BE requests leave it for the host or a node, where the planner's tier
    # model (remote_tier.py) says; the CPU path registers each row on that worker. The host's one worker thread
    # against a node's 4 cores, at a per-core bandwidth so low that the KV each tier reads per layer, not the
    # link's 20 µs, decides (a tiny model's rows are a few KB): the second row already goes to a node.
    monkeypatch.setattr(be_path, "ATTENTION_B_S_PER_CORE", 1e3)
    config = tiny_config(policy="hybrid", max_num_batched_tokens=16, num_kv_blocks=24, hbm_reserve_horizon_s=0.0,
                         slo_control={"enabled": False}, piggyback={
                             "max_be_rows_per_layer": 3, "num_cpu_workers": 1, "cpu_threads_per_worker": 1,
                             "remote": {"address": "local", "num_nodes": 2, "memory_per_worker_gib": 0.01,
                                        "ready_timeout_s": 600}})  # fmt: skip
    engine = Engine(config)
    try:
        tier = engine.planner.remote_tier
        pool = engine.piggyback.pool
        assert tier is not None and isinstance(pool, HybridAttentionPool)
        assert sorted(tier.nodes) == [w.index for w in pool.remote]
        # request id -> (worker, the planner's node for it when it was registered)
        placed = _record_registrations(engine, lambda rid, worker: (worker, tier.node_of(rid)))
        requests = _submit(engine, "BLBBBB", "hyb")
        run_to_completion(engine)
        for request, (ref, logits) in zip(requests, references, strict=True):
            assert request.finish_reason == "length", request.error
            assert_matches_reference(request.output_token_ids, ref, logits)
        assert placed, "no BE request left HBM"
        for rid, (worker, node) in placed.items():
            assert worker == node if node is not None else worker < pool.num_local, (rid, worker, node)
        assert any(node is not None for _, node in placed.values()), f"no row was placed on a node: {placed}"
        assert tier.held == {} and pool.remote_capacity().rows == 0, "remote reservations leaked"
        assert engine.piggyback.host_kv.allocator.num_used == 0
    finally:
        engine.close()
