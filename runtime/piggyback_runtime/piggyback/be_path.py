"""BE requests on the piggyback path: host KV, CPU attention tasks, the residual store, and row states.

A BE request prefills on the accelerator (its KV is also written to host DRAM, layer by layer), samples its
first token there, then leaves the accelerator. From then on each of its tokens walks the layers:

    ENTER    the token waits to enter layer 0 (embedding -> pre_attention(0))
    WAITING  its attention at `layer` runs on a CPU worker; its layer input waits in the residual store
             (a device tensor with one row per slot: a row has at most one layer in flight)
    READY    the CPU result for `layer` is in its out slot; the engine merges it into post_attention(layer)
             of a later iteration, and the row goes straight on into pre_attention(layer + 1)
    MERGED   in the Dense batch of the current pass (between post_attention(layer) and the next step)

After post_attention of the last layer the row is sampled with the LS rows and its next token re-enters
at layer 0. The engine never waits: a row that is not READY when the engine reaches its layer is simply
picked up in a later iteration.

Pacing: a layer's tasks are spread over all CPU workers by work (pool.py), not queued behind one worker per
row; rows enter layer 0 at most ceil(rows / layers) per iteration, oldest first, so that rows that arrive
together (a batch of prefills, or of moves) spread over the layers instead of walking them as one cluster and
the CPUs get work all through the pass; READY rows merge oldest first. A row advances as many layers in an
iteration as the CPU serves: the engine looks for results at every layer, so a result back before the engine
reaches the row's next layer carries it on in the same pass.

KV moves (the plan's `be_to_host` / `be_to_gpu`, executed by the engine; the planner decided them and holds
the KV they need): `copy_from_accelerator` copies a request's accelerator blocks into its host blocks layer by
layer (the block sizes may differ: the copy goes token slot by token slot), on a GPU as the prefill offload
does (gathered on the compute stream, so the next pass may reuse the blocks; to pinned memory on a side
stream; stored by the sender thread before any later CPU task). `copy_to_accelerator` writes a row's host KV
into accelerator blocks while the row is between tokens, once a CPU task of it has come back (the host KV
stores queued before that task, a move's or a prefill's, have then landed). Nothing is recomputed: a moved
request produces the tokens it produces unmoved.

Nothing here reads a device value on the host. q/k/v leave the device by non-blocking copies into pinned
memory on a side stream, ordered by a CUDA event that only the sender thread waits on (it then stages them
into the workers' shared slots). Results come straight from the shared `out` buffer, which is registered
with the CUDA driver (cudaHostRegister): the slot range of the READY rows goes up in one non-blocking DMA
and the rows are picked on the device; their indices, slots and positions go up in one pinned buffer
(`HostStaging`). Residuals are kept and gathered on the device by slot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.attention.cpu_attention import write_kv
from piggyback_runtime.config import PiggybackConfig, RuntimeConfig
from piggyback_runtime.kv.allocator import flat_slot
from piggyback_runtime.kv.cache import kv_block_bytes
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.model.arch import ModelArch
from piggyback_runtime.piggyback.pool import CPUAttentionPool, default_threads_per_worker
from piggyback_runtime.piggyback.worker import SharedBuffers
from piggyback_runtime.remote_capacity import ATTENTION_B_S_PER_CORE, bytes_per_be_token_per_layer, node_tiers
from piggyback_runtime.request import Request
from piggyback_runtime.scheduler.be_mode import HostPathCapacity
from piggyback_runtime.scheduler.remote_tier import RemoteTier, TierCosts
from piggyback_runtime.staging import (
    HostStaging,
    register_host_memory,
    to_host_async,
    unregister_host_memory,
)

if TYPE_CHECKING:  # imported at run time only with remote nodes (it starts Ray)
    from piggyback_runtime.piggyback.remote.pool import HybridAttentionPool

log = logging.getLogger(__name__)

ENTER, WAITING, READY, MERGED, FAILED = "enter", "waiting", "ready", "merged", "failed"
LOST = -2  # tensor parallelism: a rank's verdict on a row its CPU worker took down with it (the minimum wins)


@dataclass(eq=False)
class BERow:
    request: Request
    slot: int
    worker: int
    generation: int
    position: int = 0  # position of the token walking the layers
    layer: int = 0
    state: str = ENTER
    released: bool = False  # finished while its task was in flight: free the slot when the result lands
    since: int = 0  # when it last became ENTER or READY (a counter): rows take their turn oldest first
    # A CPU task of it has come back: the host KV stores queued before that task (its prefill's or its move's
    # KV, stored by the sender thread) have all landed, so its host KV may be copied out.
    host_kv_landed: bool = False
    # Tensor parallelism: this rank lost the row (its CPU worker died); it fails on every rank at the next
    # agreement that covers it (`entering`, `ready`), so that the ranks' rows stay in step.
    lost: str | None = None
    # A remote node's row whose prefill KV has all been shipped to its node: its host KV blocks are freed (it
    # keeps its slot), so it can no longer fall back to a local worker or move to the accelerator.
    host_kv_released: bool = False
    # Two sub-batches (IterationPlan.split_at): the one it rides with, 0 (A) or 1 (B), alternating by the order
    # rows enter the path, kept across layers and iterations; in a one-batch iteration it does not matter.
    sub_batch: int = 0


@dataclass(frozen=True)
class PrefillTargets:
    """Where this iteration's BE prefill rows go in host KV: flat batch rows -> host cache slots."""

    rows: list[int]  # flat batch rows (the model runner uploads them with the step's metadata)
    host_slots: torch.Tensor  # [n] int64 on the host


def share_cores_with_cpu_workers(pb: PiggybackConfig, device: torch.device) -> int:
    """Threads per CPU worker. Where the accelerator is the CPU too, torch gets the cores the workers leave:
    OpenMP teams that share cores spin against each other. The engine calls this before profiling, so the
    latency model is measured with the threads the forward pass will have."""
    threads = pb.cpu_threads_per_worker or default_threads_per_worker(pb.num_cpu_workers)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - threads * pb.num_cpu_workers))
    return threads


class PiggybackPath:
    def __init__(
        self, config: RuntimeConfig, arch: ModelArch, dtype: torch.dtype, device: torch.device, host_kv: HostKV,
        metrics: m.RuntimeMetrics,
    ) -> None:  # fmt: skip
        """`host_kv` is the planner's: it reserves (as a prefill fills it, or for a move), this path frees when a
        request is done or moves to the accelerator."""
        pb = config.piggyback
        self.config = config
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.metrics = metrics
        self.host_kv = host_kv
        self.block_size = host_kv.block_size  # host KV blocks (the accelerator's may differ)
        self.block_bytes = kv_block_bytes(arch, self.block_size, dtype)
        self.max_rows_per_layer = 0  # the engine sets it from each iteration's plan before the forward pass
        import multiprocessing as mp

        self._hold = mp.get_context("spawn").RawValue("b", 1)
        self.buffers = SharedBuffers.allocate(
            arch.num_hidden_layers, host_kv.num_blocks, self.block_size, arch.num_key_value_heads,
            arch.num_attention_heads, arch.head_dim, host_kv.max_requests, dtype, self._hold,
        )  # fmt: skip
        self._registered = device.type == "cuda"
        if self._registered:
            register_host_memory(self.buffers.out)
        threads = share_cores_with_cpu_workers(pb, device)
        self.pool = CPUAttentionPool(self.buffers, pb.num_cpu_workers, threads, 1.0 / arch.head_dim**0.5)
        self.retry_on_worker_loss = pb.remote is not None and pb.remote.retry_on_worker_loss
        # The pool again when it has remote nodes (their placement, capacity and staging), else None.
        self.remote_pool: HybridAttentionPool | None = None
        if pb.remote is not None:  # remote CPU nodes on Ray: more workers behind the same interface
            from piggyback_runtime.piggyback.remote import hybrid_pool

            self.pool = self.remote_pool = hybrid_pool(self.pool, self.buffers, pb.remote, arch, dtype, threads,
                                                       metrics)  # fmt: skip
        self.pool.wait_ready()
        # Hybrid placement with remote nodes: where the planner put each row's KV (a remote worker's index, None
        # for the host); the engine sets it (`remote_tier`). Unset: rows go to the least loaded worker of all.
        self.node_of: Callable[[str], int | None] | None = None
        self._threads = threads
        self.rows: dict[str, BERow] = {}  # request id -> row, once in decode
        self.row_by_slot: dict[int, BERow] = {}
        # Layer inputs of rows whose CPU attention is in flight, one device row per slot; `residuals` says which
        # entries are live: (request id, layer) -> slot.
        self.residual_store = torch.zeros((host_kv.max_requests, arch.hidden_size), dtype=dtype, device=device)
        self.residuals: dict[tuple[str, int], int] = {}
        self.failed: list[tuple[Request, str]] = []
        self.num_layers = arch.num_hidden_layers
        self._tick = 0
        self._rows_started = 0  # rows that entered the path so far: every other one rides in sub-batch B
        # Tensor parallelism: the element-wise minimum over ranks of each rank's verdicts (distributed.py).
        self.agree: Callable[[list[int]], list[int]] | None = None
        self.retries: list[Request] = []  # lost with their worker, to be prefilled again (retry_on_worker_loss)
        log.info("piggyback path: %d host KV blocks (%.2f GiB), %d CPU workers × %d threads", host_kv.num_blocks,
                 host_kv.num_blocks * self.block_bytes / 2**30, pb.num_cpu_workers, threads)  # fmt: skip

    # --- release ---------------------------------------------------------------------------------------
    def release(self, request: Request) -> None:
        """Free everything the request holds on this path (deferred while a CPU task is in flight)."""
        row = self.rows.pop(request.request_id, None)
        if row is not None:
            self.residuals.pop((request.request_id, row.layer), None)
            if row.state == WAITING:
                row.released = True  # the worker still writes to its slot and blocks; free when it reports
                return
            self._free(row)
        else:
            self.host_kv.free(request.request_id)

    def _free(self, row: BERow) -> None:
        self.row_by_slot.pop(row.slot, None)
        self.pool.forget(row.worker, row.slot)
        self.host_kv.free(row.request.request_id)

    # --- prefill: KV to host as it is computed -------------------------------------------------------
    def prefill_targets(self, chunks: list[tuple[Request, int, int, int]]) -> PrefillTargets | None:
        """chunks: (request, first flat row, first position, count) of BE prefill rows in this iteration."""
        rows: list[int] = []
        slots: list[int] = []
        for request, row, start, count in chunks:
            blocks = self.host_kv.blocks_of(request.request_id)
            for offset in range(count):
                position = start + offset
                rows.append(row + offset)
                slots.append(flat_slot(blocks, position, self.block_size))
        if not rows:
            return None
        return PrefillTargets(rows, torch.tensor(slots))

    def write_prefill_kv(
        self, layer: int, targets: PrefillTargets, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Copy the BE prefill rows' k/v (rows: `targets.rows` on the device) of one layer to host KV."""
        key = k.index_select(0, rows)
        value = v.index_select(0, rows)
        key_cache, value_cache = self.buffers.key_cache[layer], self.buffers.value_cache[layer]
        # Off the accelerator without stalling it; the store runs on the sender thread once the copy landed.
        (host_key, host_value), event = to_host_async(key, value)

        def store() -> None:
            write_kv(key_cache, value_cache, targets.host_slots, host_key, host_value)

        if event is None:
            store()
        else:
            self.pool.after(event, store)

    # --- decode rows -----------------------------------------------------------------------------------
    def start_decode(self, request: Request) -> None:
        slot = self.host_kv.slot_of[request.request_id]
        worker = self._worker_for(request)
        if worker is None:
            self.failed.append((request, "the remote attention node it was placed on is down and its host KV is "
                                         "no longer staged on this host"))  # fmt: skip
            return
        row = BERow(request, slot, worker, self.host_kv.generation[slot], position=request.num_tokens - 1,
                    sub_batch=self._rows_started % 2)  # fmt: skip
        self._rows_started += 1
        self.rows[request.request_id] = row
        self.row_by_slot[slot] = row
        self.pool.register(worker, slot, self.host_kv.blocks_of(request.request_id))
        self.mark_entering(row, row.position)

    def _worker_for(self, request: Request) -> int | None:
        """The worker that holds a new row: the remote node the planner placed it on, or a local worker where it
        placed it on the host; without placement, the least loaded of all. A node that went down since the
        placement leaves the row on a local worker while its KV is staged in host KV at full length (the planner
        reserved it; a row's staging is freed only after it decoded on its node, see `collect`); None (the row
        fails) if not."""
        remote = self.remote_pool
        if self.node_of is None or remote is None:
            return self.pool.least_loaded_worker()
        node = self.node_of(request.request_id)
        if node is not None and remote.remote_worker_ready(node):
            return node
        if node is not None:
            staged = len(self.host_kv.blocks_of(request.request_id)) * self.block_size
            if staged < request.max_num_tokens:
                return None
            log.warning("remote attention worker %d, where %s was placed, is down: it decodes on the host",
                        node, request.request_id)  # fmt: skip
        return remote.least_loaded_local_worker()

    def host_capacity(self) -> HostPathCapacity:
        """This host's CPU attention as hybrid placement weighs it (scheduler/be_mode.py): the workers' estimated
        KV read bandwidth (ATTENTION_B_S_PER_CORE per thread), over a token's KV in every layer."""
        workers = self.config.piggyback.num_cpu_workers
        return HostPathCapacity(ATTENTION_B_S_PER_CORE * self._threads * workers, self.block_bytes / self.block_size)

    def remote_tier(self) -> RemoteTier | None:
        """Remote nodes as hybrid placement's third tier (scheduler/remote_tier.py), from the pool's live
        capacity; None without remote nodes. A remote row's KV is staged in host KV (the pool ships it to its
        node from there, layer by layer), so placing it on a node needs host room for the staging too; that host
        KV is freed once shipped (`collect`), the row keeping only its slot."""
        if self.remote_pool is None:
            return None
        pb = self.config.piggyback
        assert pb.remote is not None
        arch = self.arch
        sent, received = bytes_per_be_token_per_layer(arch.num_attention_heads, arch.num_key_value_heads,
                                                      arch.head_dim)  # fmt: skip
        costs = TierCosts(self.block_bytes / self.block_size / arch.num_hidden_layers, sent, received)
        tier = RemoteTier(self.host_capacity().attention_b_s, [], costs, host_stages_remote_kv=True)
        self.refresh_remote_tier(tier)
        return tier

    def refresh_remote_tier(self, tier: RemoteTier) -> None:
        """The nodes as the pool has them now: one that died leaves, its replacement joins once it answered."""
        pb = self.config.piggyback
        assert pb.remote is not None and self.remote_pool is not None
        per_worker_b_s = ATTENTION_B_S_PER_CORE * max(1, int(pb.remote.cpus_per_worker))
        tier.update_nodes(node_tiers(self.remote_pool.remote_capacity(), self.block_size, per_worker_b_s))

    def mark_entering(self, row: BERow, position: int) -> None:
        """The row's next token (at `position`) waits for layer 0, behind the rows that waited before it."""
        self._tick += 1
        row.state, row.layer, row.position, row.since = ENTER, 0, position, self._tick

    def entering(self) -> list[BERow]:
        """Rows whose next token enters layer 0 now: oldest first, at most the layer cap and at most
        ceil(rows / layers), so that rows that arrived together spread over the layers. Under tensor parallelism
        the ranks first agree on which of them still exist: a CPU worker that died between tokens loses its rows
        on its rank only."""
        waiting = sorted((row for row in self.rows.values() if row.state == ENTER), key=lambda row: row.since)
        if self.agree is not None and waiting:
            waiting = self._agreed(waiting, [LOST if row.lost else 1 for row in waiting])
        spread = -(-len(self.rows) // self.num_layers)
        return waiting[: min(self.max_rows_per_layer, spread)]

    def ready(self, layer: int, sub_batch: int | None = None, limit: int | None = None) -> list[BERow]:
        """The rows whose layer-`layer` CPU result is in, to merge into post_attention(layer): oldest first, at
        most `limit` (default: the layer cap); `sub_batch` keeps those of one sub-batch (after the cap, so that
        rows take their turn by age whichever sub-batch they ride in). Every rank picks the same rows."""
        self.collect()
        ready = self._ready_among([row for row in self.rows.values() if row.layer == layer])
        ready = sorted(ready, key=lambda row: row.since)[: self.max_rows_per_layer if limit is None else limit]
        return ready if sub_batch is None else [row for row in ready if row.sub_batch == sub_batch]

    def merge_schedule(self) -> tuple[list[BERow], dict[int, list[BERow]]]:
        """For a step whose merge points are fixed when it starts (a graphed step, cuda_graphs.py): the rows
        entering layer 0, and per layer the rows whose CPU result merges there. A result landing during the
        step merges in the next one. Under tensor parallelism: two agreements in all, not one per layer."""
        self.collect()
        entering = self.entering()
        by_layer: dict[int, list[BERow]] = {}
        for row in sorted(self._ready_among(list(self.rows.values())), key=lambda row: row.since):
            # No entry for a layer that merges nothing (a cap of 0): it would run eager for no row.
            if len(by_layer.get(row.layer, ())) < self.max_rows_per_layer:
                by_layer.setdefault(row.layer, []).append(row)
        return entering, by_layer

    def _ready_among(self, rows: list[BERow]) -> list[BERow]:
        """Those of `rows` whose CPU result is in. Under tensor parallelism each rank's workers hold its KV heads:
        a row merges once its result is back on every rank (1 ready, 0 waiting, -1 failed, -2 lost on some rank).
        The rows in flight are the same on every rank, in the same order (rank 0's changes are replayed, and a
        rank that loses a row keeps its state until the ranks agree), so the verdict lists line up."""
        if self.agree is None:
            return [row for row in rows if row.state == READY]
        rows = [row for row in rows if row.state in (WAITING, READY, FAILED)]
        if not rows:
            return []
        return self._agreed(rows, [LOST if row.lost else {READY: 1, WAITING: 0}.get(row.state, -1) for row in rows])

    def _agreed(self, rows: list[BERow], verdicts: list[int]) -> list[BERow]:
        """The element-wise minimum of every rank's verdicts: rows failed or lost anywhere fail on every rank
        (rank 0 ends them with an error event); the rows every rank has ready (> 0) are returned."""
        assert self.agree is not None
        agreed = self.agree(verdicts)
        for row, verdict in zip(rows, agreed, strict=True):
            if verdict < 0 and row.state != FAILED:
                row.state = FAILED
                elsewhere = ("the CPU attention worker holding this request died on another tensor-parallel rank; "
                             "that rank's shard of its host KV cache is lost") if verdict == LOST else (
                             "CPU attention failed for this request on another tensor-parallel rank")  # fmt: skip
                self.failed.append((row.request, row.lost or elsewhere))
        return [row for row, verdict in zip(rows, agreed, strict=True) if verdict > 0]

    def submit(self, layer: int, rows: list[BERow], slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, hidden: torch.Tensor) -> None:  # fmt: skip
        """Send these rows' layer-`layer` attention to the CPU; keep their layer input until it returns.

        `slots` [n] int64 on the device holds the rows' slots (uploaded by the caller: no host read here).
        """
        tasks: list[tuple[int, int, int, int]] = []
        for row in rows:
            self.residuals[(row.request.request_id, layer)] = row.slot
            row.layer, row.state = layer, WAITING
            tasks.append((row.slot, layer, row.position, row.generation))
        self.residual_store.index_copy_(0, slots, hidden)
        host_slots = torch.tensor([row.slot for row in rows])
        q_width, kv_width = q[0].numel(), k[0].numel()
        # One packed copy instead of three: q | k | v per row, float32 (what the CPU kernel reads).
        packed = torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1).float()
        (host_packed,), event = to_host_async(packed)
        buffers = self.buffers

        def stage() -> None:
            host_q, host_k, host_v = host_packed.split((q_width, kv_width, kv_width), dim=1)
            buffers.q_in.index_copy_(0, host_slots, host_q.view(-1, *buffers.q_in.shape[1:]))
            buffers.k_in.index_copy_(0, host_slots, host_k.view(-1, *buffers.k_in.shape[1:]))
            buffers.v_in.index_copy_(0, host_slots, host_v.view(-1, *buffers.v_in.shape[1:]))

        if event is None:
            stage()
        else:
            self.pool.after(event, stage)
        for slot, worker in self.pool.submit(tasks).items():
            self.row_by_slot[slot].worker = worker

    def take(self, layer: int, rows: list[BERow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """READY rows' CPU attention results [n, Hq, D] and stored layer inputs [n, H] on the device, with their
        slots and token positions [n] int64 on the device (for the next layer's submit and RoPE).

        The results go up from the shared `out` buffer in one non-blocking copy of the rows' slot range (the
        engine thread copies nothing on the host); the rows are picked from it on the device. Other slots in
        the range may be mid-write by a worker: their values are never used. These rows' own slots are not
        written again until their next task, which is sent only after this pass's later copies (ordered
        after this one on the stream) have completed.
        """
        slots = [row.slot for row in rows]
        first, last = min(slots), max(slots)
        staging = HostStaging(self.device)
        staging.add("rows", torch.tensor([slot - first for slot in slots]))
        staging.add("slots", torch.tensor(slots))
        staging.add("positions", torch.tensor([row.position for row in rows]))
        uploaded = staging.upload()
        window = self.buffers.out[first : last + 1]
        if self.device.type != "cpu":
            window = window.to(self.device, non_blocking=True)
        attn = window.index_select(0, uploaded["rows"]).to(self.dtype)
        for row in rows:
            self.residuals.pop((row.request.request_id, layer))
            row.layer, row.state = layer + 1, MERGED
        residual = self.residual_store.index_select(0, uploaded["slots"])
        return attn, residual, uploaded["slots"], uploaded["positions"]

    def token_done(self, row: BERow) -> None:
        """The row finished the last layer and was sampled; its next token enters at layer 0."""
        self.mark_entering(row, row.request.num_tokens - 1)

    def collect(self) -> None:
        completions, deaths = self.pool.poll()
        for done in completions:
            row = self.row_by_slot.get(done.slot)
            if row is None or row.generation != done.generation or row.layer != done.layer or row.state != WAITING:
                continue  # stale: the slot's request is gone
            if row.released:
                self._free(row)
            elif done.error:
                row.state = FAILED
                reason = done.error.strip().splitlines()[-1]
                self.failed.append((row.request, f"CPU attention failed for this request: {reason}"))
            else:
                row.state, row.host_kv_landed = READY, True
                self._tick += 1
                row.since = self._tick
                if done.layer == self.num_layers - 1 and not row.host_kv_released:
                    self._release_shipped_staging(row)
        for death in deaths:
            self.metrics.cpu_worker_restarts.inc()
            for slot in death.slots:
                row = self.row_by_slot.pop(slot, None)
                if row is None:
                    continue
                if not row.released:
                    reason = (f"the CPU attention worker holding this request died (exit code {death.exit_code}); "
                              "its host KV cache is lost")  # fmt: skip
                    if self.agree is not None:
                        row.lost = reason  # failed on every rank at the next agreement (no retry: see README)
                    elif row.host_kv_released and not self._restage(row):
                        row.state = FAILED
                        self.failed.append((row.request, f"{reason}; retrying needs host KV for its new prefill "
                                                         "and there is none free"))  # fmt: skip
                    elif self.retry_on_worker_loss:
                        # Its KV on the worker is gone; the host reservation stays for the new prefill.
                        self.rows.pop(row.request.request_id, None)
                        self.residuals.pop((row.request.request_id, row.layer), None)
                        self.retries.append(row.request)
                    else:
                        row.state = FAILED
                        self.failed.append((row.request, reason))
                else:
                    self.host_kv.free(row.request.request_id)

    def on_remote_node(self, row: BERow) -> bool:
        """Whether the row's KV lives on a remote node (decode K/V is written there only, not in host KV)."""
        return self.remote_pool is not None and row.worker >= self.remote_pool.num_local

    def _release_shipped_staging(self, row: BERow) -> None:
        """A remote row's task of the last layer is back, so every layer's prefill KV has been read from host KV
        and sent to its node (the pool ships a layer before the row's first task of it) and decode writes its
        new K/V on the node only: free its host blocks now, keeping its slot (the row's identity in the shared
        buffers and the residual store). On the engine thread: the planner's bookkeeping is single-threaded."""
        if self.remote_pool is not None and self.remote_pool.release_staging(row.worker, row.slot):
            self.host_kv.release_blocks(row.request.request_id)
            row.host_kv_released = True

    def _restage(self, row: BERow) -> bool:
        """A released remote row lost with its node and to be prefilled again: take host KV for it at full length
        again (its new prefill writes there); False when the host has none free (the row then fails)."""
        if not self.retry_on_worker_loss:
            return True  # it fails with the worker's reason, as any lost row without retries
        request = row.request
        return self.host_kv.hold_blocks(request.request_id, request.max_num_tokens)

    def take_failures(self) -> list[tuple[Request, str]]:
        failed, self.failed = self.failed, []
        return failed

    def take_retries(self) -> list[Request]:
        """Requests whose worker was lost and that are to be prefilled again (their host KV is still held)."""
        retries, self.retries = self.retries, []
        return retries

    # --- state for the engine loop and metrics --------------------------------------------------------
    def has_work(self) -> bool:
        # row_by_slot also holds finished rows whose last task is still on a worker: keep polling for them.
        return bool(self.rows or self.row_by_slot)

    def runnable_rows(self) -> int:
        """Rows the accelerator could take now (entering layer 0, or with a CPU result waiting)."""
        return sum(1 for row in self.rows.values() if row.state in (ENTER, READY))

    def has_ready_work(self) -> bool:
        """Rows a pass can move on; a lost row too (the pass's agreement fails it on every rank)."""
        return any(row.state in (ENTER, READY) or row.lost for row in self.rows.values())

    def rows_between_tokens(self) -> list[Request]:
        """Requests whose row has no token walking the layers (nothing in flight, nothing in the residual
        store) and whose host KV is complete: the ones hybrid placement may move back to the accelerator."""
        return [row.request for row in self.rows.values() if row.state == ENTER and row.host_kv_landed]

    # --- KV moves between accelerator KV and host KV (the planner decided them) --------------------------
    def copy_from_accelerator(self, request: Request, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              blocks: list[int], num_tokens: int) -> None:  # fmt: skip
        """Copy the request's first `num_tokens` tokens of KV from accelerator blocks (`key_cache`/`value_cache`:
        [layers, blocks, block_size, kv_heads, head_dim]) into the host blocks the planner reserved for it,
        layer by layer. Never blocks: on a GPU each layer is gathered on the compute stream (so a later pass may
        reuse the blocks at once), copied to pinned memory on a side stream, and stored into host KV by the
        sender thread once its event completes, ahead of any CPU task sent after this call."""
        host_blocks = self.host_kv.blocks_of(request.request_id)
        if len(host_blocks) * self.block_size < num_tokens:
            raise RuntimeError(f"BE request {request.request_id} moves {num_tokens} tokens of KV to the host but "
                               f"holds {len(host_blocks)} host blocks of {self.block_size}")  # fmt: skip
        accelerator_block_size = key_cache.shape[2]
        staging = HostStaging(self.device)
        staging.add("source", torch.tensor([flat_slot(blocks, p, accelerator_block_size) for p in range(num_tokens)]))
        source = staging.upload()["source"]
        host_slots = torch.tensor([flat_slot(host_blocks, p, self.block_size) for p in range(num_tokens)])
        for layer in range(self.num_layers):
            key = key_cache[layer].flatten(0, 1).index_select(0, source)
            value = value_cache[layer].flatten(0, 1).index_select(0, source)
            (host_key, host_value), event = to_host_async(key, value)

            def store(layer: int = layer, key: torch.Tensor = host_key, value: torch.Tensor = host_value) -> None:
                write_kv(self.buffers.key_cache[layer], self.buffers.value_cache[layer], host_slots, key, value)

            if event is None:
                store()
            else:
                self.pool.after(event, store)

    def copy_to_accelerator(self, request: Request, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            blocks: list[int], num_tokens: int) -> None:  # fmt: skip
        """Copy the first `num_tokens` tokens of a row's host KV into accelerator blocks, layer by layer. The row
        must be between tokens with a CPU task of it back: its host KV is then complete."""
        row = self.rows.get(request.request_id)
        if row is None or row.state != ENTER or not row.host_kv_landed:
            raise RuntimeError(f"BE request {request.request_id} moves to the accelerator but is not between "
                               f"tokens on the CPU path (state {row.state if row else 'gone'})")  # fmt: skip
        if row.host_kv_released:
            raise RuntimeError(f"BE request {request.request_id} keeps its KV on remote attention node {row.worker}, "
                               "not in host KV: it cannot move to the accelerator")  # fmt: skip
        accelerator_block_size = key_cache.shape[2]
        host_blocks = self.host_kv.blocks_of(request.request_id)
        index = torch.arange(num_tokens)
        host_block = torch.tensor(host_blocks, dtype=torch.long)[index // self.block_size]
        offset = index % self.block_size
        staging = HostStaging(self.device)
        staging.add("target", torch.tensor([flat_slot(blocks, p, accelerator_block_size) for p in range(num_tokens)]))
        target = staging.upload()["target"]
        for layer in range(self.num_layers):
            key = self.buffers.key_cache[layer][host_block, offset]
            value = self.buffers.value_cache[layer][host_block, offset]
            if self.device.type != "cpu":  # pinned, so that the upload does not wait for the device
                key = key.pin_memory().to(self.device, non_blocking=True)
                value = value.pin_memory().to(self.device, non_blocking=True)
            key_cache[layer].flatten(0, 1).index_copy_(0, target, key.to(key_cache.dtype))
            value_cache[layer].flatten(0, 1).index_copy_(0, target, value.to(value_cache.dtype))

    def idle_wait(self, timeout_s: float) -> None:
        self.pool.wait(timeout_s)

    def hold(self) -> None:
        """Tests: workers take no new task until `release_hold` (the engine must keep running)."""
        self._hold.value = 0

    def release_hold(self) -> None:
        self._hold.value = 1

    def update_gauges(self) -> None:
        self.metrics.cpu_attention_queue_depth.set(sum(1 for r in self.rows.values() if r.state == WAITING))
        self.metrics.host_kv_usage.set(self.host_kv.usage())
        self.metrics.host_kv_free_bytes.set(self.host_kv.allocator.num_free * self.block_bytes)
        if hasattr(self.pool, "update_gauges"):  # remote workers
            self.pool.update_gauges(self.block_bytes)

    def close(self) -> None:
        self._hold.value = 1
        self.pool.close()
        if self._registered:
            self._registered = False
            unregister_host_memory(self.buffers.out)

