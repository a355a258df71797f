"""Remote attention nodes behind the local pool's interface: to be_path they are just more workers.

`HybridAttentionPool` fronts the host's CPUAttentionPool (workers 0..L-1) and the remote workers (L..L+R-1)
with the same calls be_path makes (register, forget, submit, after, poll, wait, least_loaded_worker). Every
remote send goes through the local pool's sender thread, so it is ordered after the q/k/v staging and host KV
stores queued before it, and never runs on the engine thread:

- a remote row's prefill KV goes to its node once, layer by layer: just before the row's first task of a
  layer, that layer's KV is read from the host staging cache and sent (`kv` frame); once its task of the last
  layer is back, be_path frees those host blocks (`release_staging`): the row keeps only its slot on the host;
- each layer's tasks for one node go out as one `run` frame (q/k/v of its rows); a receiver thread per node
  writes the outputs into the shared `out` slots and reports the completions, as a local worker does.

Failure: a node whose stream breaks, whose actor dies (Ray), or whose oldest batch is older than
`layer_deadline_ms` is dropped: its rows are reported as a WorkerDeath (be_path re-prefills or fails them),
the actor is killed, and a new actor is started in the same placement-group bundle. It takes rows again once
it has answered and connected.

Registration (waiting for an actor to come up, connecting, the hello handshake) runs on its own thread, not in
`poll()`: the engine polls only while it has work, and a replacement that came up after the last BE request
finished would otherwise never register (its capacity would stay out until the next BE request, and
`piggyback_remote_worker_up` at 0). The handshake's connect also never blocks the engine thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_any
from typing import Any, Protocol

import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.config import RemoteNodesConfig
from piggyback_runtime.piggyback.pool import Completion, CPUAttentionPool, WorkerDeath
from piggyback_runtime.piggyback.remote import wire
from piggyback_runtime.piggyback.worker import SharedBuffers
from piggyback_runtime.remote_capacity import KV_SHARE_OF_DRAM, RemoteCapacity, RemoteNodeCapacity

log = logging.getLogger(__name__)

GIB = 1 << 30


class Placement(Protocol):
    """Starts and kills the processes that serve remote attention (Ray in production: actor.RayPlacement)."""

    num_workers: int

    def start(self, index: int) -> Any: ...
    def address_if_ready(self, actor: Any) -> tuple[str, int, int] | None: ...
    def kill(self, actor: Any) -> None: ...
    def close(self) -> None: ...

    token: str


@dataclass
class RemoteWorker:
    index: int  # global worker index (after the local workers)
    actor: Any
    sock: socket.socket | None = None
    pid: int | None = None
    ready: bool = False
    dead: bool = False  # the stream broke: poll() replaces it
    kv_blocks: int = 0
    slots: dict[int, int] = field(default_factory=dict)  # slot -> blocks it holds there
    tables: dict[int, list[int]] = field(default_factory=dict)  # slot -> host staging block table
    shipped: dict[int, set[int]] = field(default_factory=dict)  # slot -> layers whose prefill KV is on the node
    in_flight: dict[int, float] = field(default_factory=dict)  # batch id -> when it was sent (monotonic)
    started_s: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HybridAttentionPool:
    """Local CPU workers plus remote attention workers, with CPUAttentionPool's interface."""

    def __init__(self, local: CPUAttentionPool, buffers: SharedBuffers, config: RemoteNodesConfig,
                 placement: Placement, layout: dict[str, Any], metrics: m.RuntimeMetrics) -> None:  # fmt: skip
        self.local = local
        self.buffers = buffers
        self.config = config
        self.placement = placement
        self.layout = layout  # the hello frame's model fields (layers, heads, dtype, block_size, scale, threads)
        self.metrics = metrics
        self.num_local = len(local.workers)
        self.remote = [RemoteWorker(self.num_local + i, placement.start(i)) for i in range(placement.num_workers)]
        self.deadline_s = config.layer_deadline_ms / 1000.0
        self._completions: queue.SimpleQueue[Completion] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._batch_ids = iter(range(1 << 62))
        self.restarts = 0
        self._closed = False
        # Guards self.remote's entries and a worker's ready/dead flags between the engine thread (_replace) and
        # the registrar thread (_connect_new); the slow calls (Ray, connect, handshake) run outside it.
        self._lock = threading.Lock()
        self._registrar_wake = threading.Event()
        self._registrar = threading.Thread(target=self._registrar_loop, daemon=True, name="piggyback-remote-registrar")
        self._registrar.start()

    # --- lifecycle -------------------------------------------------------------------------------------
    @property
    def workers(self) -> list[Any]:
        return [*self.local.workers, *self.remote]

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block (at engine start only) until the local workers and every remote worker answered, or until
        `ready_timeout_s`: the engine starts with the remote workers that did (the rest join when up). The local
        workers get the longer of the two (a loaded host can take minutes to start them)."""
        self.local.wait_ready(max(timeout_s, self.config.ready_timeout_s))
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline and not all(w.ready for w in self.remote):
            time.sleep(0.05)  # the registrar thread connects them
        missing = [w.index for w in self.remote if not w.ready]
        if missing:
            log.warning("remote attention workers %s not up after %.0fs; starting without them",
                        missing, self.config.ready_timeout_s)  # fmt: skip

    def close(self) -> None:
        self._closed = True
        self._registrar_wake.set()
        self._registrar.join(timeout=15)
        self.local.close()
        for worker in self.remote:
            if worker.sock is not None:
                with contextlib.suppress(OSError):
                    worker.sock.close()
            self.placement.kill(worker.actor)
        self.placement.close()
        self._wake_read.close()
        self._wake_write.close()

    def _registrar_loop(self) -> None:
        """Connects workers whose actor has come up, at start and after every replacement, whether or not the
        engine is iterating; keeps `piggyback_remote_worker_up` current meanwhile."""
        while not self._closed:
            try:
                self._connect_new()
            except Exception:  # a bug here must not end registration for good
                log.exception("remote attention registrar")
            for w in list(self.remote):
                self.metrics.remote_worker_up.labels(str(w.index)).set(1 if w.ready and not w.dead else 0)
            self._registrar_wake.wait(0.05)
            self._registrar_wake.clear()

    def _connect_new(self) -> None:
        """Connect to remote workers whose actor has come up (start-up and replacements). Registrar thread only."""
        for position, worker in enumerate(list(self.remote)):
            if worker.ready or worker.dead or self._closed:
                continue
            try:
                address = self.placement.address_if_ready(worker.actor)
            except Exception as exc:
                log.error("remote attention worker %d failed to start: %s", worker.index, exc)
                worker.dead = True  # poll() replaces it
                with contextlib.suppress(OSError):
                    self._wake_write.send(b"\0")
                continue
            if address is None:
                continue
            host, port, pid = address
            try:
                sock = socket.create_connection((host, port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                wire.send(sock, {"kind": "hello", "token": self.placement.token,
                                 "kv_bytes": int(self.config.memory_per_worker_gib * GIB * KV_SHARE_OF_DRAM),
                                 **self.layout})  # fmt: skip
                header, _, _ = wire.recv(sock)
                sock.settimeout(None)
            except OSError as exc:
                log.error("remote attention worker %d at %s:%d did not answer: %s", worker.index, host, port, exc)
                worker.dead = True
                continue
            with self._lock:
                current = self.remote[position] is worker and not worker.dead and not self._closed
                if current:
                    worker.sock, worker.pid, worker.kv_blocks = sock, pid, int(header["blocks"])
                    worker.ready = True
            if not current:  # replaced or closed while connecting
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            threading.Thread(target=self._receive_loop, args=(worker, sock), daemon=True,
                             name=f"piggyback-remote-recv-{worker.index}").start()  # fmt: skip
            log.info("remote attention worker %d up at %s:%d (pid %d, %d KV blocks)", worker.index, host, port,
                     pid, worker.kv_blocks)  # fmt: skip

    def least_loaded_worker(self) -> int:
        candidates: list[tuple[int, int]] = [(len(w.slots), w.index) for w in self.local.workers]
        candidates += [(len(w.slots), w.index) for w in self.remote if w.ready and not w.dead]
        return min(candidates)[1]

    def least_loaded_local_worker(self) -> int:
        """A local worker for a row whose KV the planner placed on the host (hybrid placement's tiers)."""
        return self.local.least_loaded_worker()

    def remote_worker_ready(self, worker_index: int) -> bool:
        """Whether this remote worker answered and takes rows (not dead, not being replaced)."""
        worker = self._remote(worker_index)
        return worker is not None and worker.ready and not worker.dead

    def _remote(self, worker_index: int) -> RemoteWorker | None:
        return self.remote[worker_index - self.num_local] if worker_index >= self.num_local else None

    # --- sending (all on the local pool's sender thread) --------------------------------------------------
    def after(self, event: torch.cuda.Event | None, action: Callable[[], None]) -> None:
        self.local.after(event, action)

    def _send(self, worker: RemoteWorker, header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> None:  # type: ignore[assignment]
        sock = worker.sock
        if sock is None or worker.dead:
            return
        try:
            sent = wire.send(sock, header, tensors)
        except OSError:
            self._stream_broke(worker)
            return
        self.metrics.remote_bytes_sent.labels(str(worker.index)).inc(sent)

    def register(self, worker_index: int, slot: int, block_ids: list[int]) -> None:
        worker = self._remote(worker_index)
        if worker is None:
            self.local.register(worker_index, slot, block_ids)
            return
        worker.slots[slot] = len(block_ids)
        worker.tables[slot] = list(block_ids)
        worker.shipped[slot] = set()
        generation = 0  # the node checks nothing by generation; be_path does, on the completions

        def send() -> None:
            self._send(worker, {"kind": "register", "slot": slot, "gen": generation, "blocks": len(block_ids)})

        self.local.after(None, send)

    def release_staging(self, worker_index: int, slot: int) -> bool:
        """Engine thread, once the row's task of the last layer came back: every layer's prefill KV has left the
        host (each is read and sent before the layer's first `run` frame), so its host staging blocks may be
        freed and reused. True for a remote row (the caller frees them), False for a local worker's row."""
        worker = self._remote(worker_index)
        if worker is None:
            return False
        worker.tables.pop(slot, None)  # nothing reads them again: every layer is in `shipped`
        return True

    def forget(self, worker_index: int, slot: int) -> None:
        worker = self._remote(worker_index)
        if worker is None:
            self.local.forget(worker_index, slot)
            return
        worker.slots.pop(slot, None)
        worker.tables.pop(slot, None)
        worker.shipped.pop(slot, None)
        self.local.after(None, lambda: self._send(worker, {"kind": "forget", "slot": slot}))

    def submit(self, tasks: list[tuple[int, int, int, int]]) -> dict[int, int]:
        """Queue attention tasks (slot, layer, position, generation). A row registered on a remote node goes to
        that node, which holds its KV; the local workers share the host KV, so the local pool spreads the other
        rows over them by work. Returns slot -> worker index."""
        node_of = {slot: worker for worker in self.remote for slot in worker.slots}
        local_tasks = [task for task in tasks if task[0] not in node_of]
        assigned = self.local.submit(local_tasks) if local_tasks else {}
        by_node: dict[int, list[tuple[int, int, int, int]]] = {}
        for task in tasks:
            if task[0] in node_of:
                by_node.setdefault(node_of[task[0]].index, []).append(task)
                assigned[task[0]] = node_of[task[0]].index
        for worker_index, node_tasks in by_node.items():
            worker = self._remote(worker_index)
            assert worker is not None
            batch = next(self._batch_ids)
            self.local.after(None, lambda w=worker, t=node_tasks, b=batch: self._send_run(w, t, b))
        return assigned

    def busy_seconds(self) -> float:
        """The local workers' busy seconds (remote nodes report theirs in their own metrics)."""
        return self.local.busy_seconds()

    def _send_run(self, worker: RemoteWorker, tasks: list[tuple[int, int, int, int]], batch: int) -> None:
        """One node's tasks of one pass (grouped by layer: one `run` frame each), with any prefill KV first."""
        by_layer: dict[int, list[tuple[int, int, int, int]]] = {}
        for task in tasks:
            by_layer.setdefault(task[1], []).append(task)
        buffers = self.buffers
        for layer, group in by_layer.items():
            for slot, _, position, _ in group:
                shipped = worker.shipped.get(slot)
                if shipped is not None and layer not in shipped:
                    self._ship_prefill_kv(worker, slot, layer, position)
                    shipped.add(layer)
            slots = torch.tensor([t[0] for t in group], dtype=torch.long)
            with worker.lock:
                worker.in_flight[(batch << 16) | layer] = time.monotonic()
            self._send(worker, {"kind": "run", "layer": layer, "batch": (batch << 16) | layer,
                                "rows": [[s, p, g] for s, _, p, g in group]},
                       [buffers.q_in[slots], buffers.k_in[slots], buffers.v_in[slots]])  # fmt: skip

    def _ship_prefill_kv(self, worker: RemoteWorker, slot: int, layer: int, tokens: int) -> None:
        """The row's KV of positions [0, tokens) of one layer, from the host staging cache to its node."""
        table = worker.tables.get(slot)
        if table is None:
            return
        block_size = self.buffers.key_cache.shape[2]
        positions = torch.arange(tokens)
        blocks = torch.tensor(table, dtype=torch.long)[positions // block_size]
        offsets = positions % block_size
        key = self.buffers.key_cache[layer][blocks, offsets]
        value = self.buffers.value_cache[layer][blocks, offsets]
        self._send(worker, {"kind": "kv", "slot": slot, "layer": layer, "tokens": tokens}, [key, value])

    # --- receiving ---------------------------------------------------------------------------------------
    def _receive_loop(self, worker: RemoteWorker, sock: socket.socket) -> None:
        label = str(worker.index)
        while True:
            try:
                header, tensors, size = wire.recv(sock)
            except (OSError, wire.WireError):
                if sock is worker.sock:
                    self._stream_broke(worker)
                return
            self.metrics.remote_bytes_received.labels(label).inc(size)
            batch = header.get("batch")
            with worker.lock:
                sent_s = worker.in_flight.pop(batch, None) if batch is not None else None
            if sent_s is not None:
                self.metrics.remote_round_trip_seconds.labels(label).observe(time.monotonic() - sent_s)
            layer = int(header["layer"])
            if header["kind"] == "done":
                slots = torch.tensor([s for s, _ in header["rows"]], dtype=torch.long)
                self.buffers.out.index_copy_(0, slots, tensors[0])
                self.metrics.remote_be_rows.labels(label).inc(len(header["rows"]))
                for slot, gen in header["rows"]:
                    self._completions.put(Completion(int(slot), layer, int(gen)))
            else:
                log.error("remote attention worker %d failed a batch:\n%s", worker.index, header["message"])
                for slot, gen in header["rows"]:
                    self._completions.put(Completion(int(slot), layer, int(gen), error=header["message"]))
            with contextlib.suppress(OSError):
                self._wake_write.send(b"\0")

    def _stream_broke(self, worker: RemoteWorker) -> None:
        if not worker.dead:
            worker.dead = True
            with contextlib.suppress(OSError):
                self._wake_write.send(b"\0")

    def poll(self) -> tuple[list[Completion], list[WorkerDeath]]:
        done, deaths = self.local.poll()
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_read.recv(4096):
                pass
        while True:
            try:
                done.append(self._completions.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        for worker in self.remote:
            if worker.ready and not worker.dead:
                with worker.lock:
                    oldest = min(worker.in_flight.values(), default=None)
                if oldest is not None and now - oldest > self.deadline_s:
                    log.error("remote attention worker %d missed the layer deadline (%.0f ms): dropping it",
                              worker.index, self.config.layer_deadline_ms)  # fmt: skip
                    self.metrics.remote_deadline_misses.labels(str(worker.index)).inc()
                    worker.dead = True
            if worker.dead:
                deaths.append(self._replace(worker))
        return done, deaths

    def wait(self, timeout_s: float) -> None:
        wait_for_any([*(w.conn for w in self.local.workers), self._wake_read], timeout=timeout_s)

    def _replace(self, dead: RemoteWorker) -> WorkerDeath:
        log.error("remote attention worker %d (pid %s) lost; its %d BE rows end, a new actor is started",
                  dead.index, dead.pid, len(dead.slots))  # fmt: skip
        death = WorkerDeath(dead.index, None, sorted(dead.slots))
        if dead.sock is not None:
            sock, dead.sock = dead.sock, None
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.placement.kill(dead.actor)
        position = dead.index - self.num_local
        replacement = RemoteWorker(dead.index, self.placement.start(position))
        with self._lock:
            self.remote[position] = replacement
        self.restarts += 1
        self._registrar_wake.set()
        return death

    def pids(self) -> list[int | None]:
        return [*self.local.pids(), *(w.pid for w in self.remote)]

    # --- what the planner reads ---------------------------------------------------------------------------
    def remote_capacity(self) -> RemoteCapacity:
        gb_s = self.config.network_gbps / 8
        return RemoteCapacity(tuple(
            RemoteNodeCapacity(w.index, w.ready and not w.dead, w.kv_blocks, w.kv_blocks - sum(w.slots.values()),
                               len(w.slots), gb_s, None)
            for w in self.remote
        ))  # fmt: skip

    def update_gauges(self, kv_block_bytes: int) -> None:
        for w in self.remote:
            self.metrics.remote_kv_bytes.labels(str(w.index)).set(sum(w.slots.values()) * kv_block_bytes)
            self.metrics.remote_worker_up.labels(str(w.index)).set(1 if w.ready and not w.dead else 0)
