"""BE requests on the piggyback path: host KV, CPU attention tasks, the residual store, and row states.

A BE request prefills on the accelerator (its KV is also written to host DRAM, layer by layer), samples its
first token there, then leaves the accelerator. From then on each of its tokens walks the layers:

    ENTER    the token waits to enter layer 0 (embedding -> pre_attention(0))
    WAITING  its attention at `layer` runs on a CPU worker; its layer input waits in the residual store
    READY    the CPU result for `layer` is in its out slot; the engine merges it into post_attention(layer)
             of a later iteration, and the row goes straight on into pre_attention(layer + 1)
    MERGED   in the Dense batch of the current pass (between post_attention(layer) and the next step)

After post_attention of the last layer the row is sampled with the LS rows and its next token re-enters
at layer 0. The engine never waits: a row that is not READY when the engine reaches its layer is simply
picked up in a later iteration.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

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
from piggyback_runtime.request import Request

log = logging.getLogger(__name__)

ENTER, WAITING, READY, MERGED, FAILED = "enter", "waiting", "ready", "merged", "failed"


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


@dataclass(frozen=True)
class PrefillTargets:
    """Where this iteration's BE prefill rows go in host KV: flat batch rows -> host cache slots."""

    rows: torch.Tensor  # [n] int64 on the accelerator
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
        """`host_kv` is the planner's: it reserves at admission, this path frees when a request is done."""
        pb = config.piggyback
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
        threads = share_cores_with_cpu_workers(pb, device)
        self.pool = CPUAttentionPool(self.buffers, pb.num_cpu_workers, threads, 1.0 / arch.head_dim**0.5)
        self.pool.wait_ready()
        self.rows: dict[str, BERow] = {}  # request id -> row, once in decode
        self.row_by_slot: dict[int, BERow] = {}
        self.residuals: dict[tuple[str, int], torch.Tensor] = {}  # (request id, layer) -> layer input
        self.failed: list[tuple[Request, str]] = []
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
        return PrefillTargets(torch.tensor(rows, device=self.device), torch.tensor(slots))

    def write_prefill_kv(self, layer: int, targets: PrefillTargets, k: torch.Tensor, v: torch.Tensor) -> None:
        key = k.index_select(0, targets.rows)
        value = v.index_select(0, targets.rows)
        key_cache, value_cache = self.buffers.key_cache[layer], self.buffers.value_cache[layer]

        def store(key: torch.Tensor = key, value: torch.Tensor = value) -> None:
            write_kv(key_cache, value_cache, targets.host_slots, key, value)

        if self.device.type == "cpu":
            store()
        else:  # copy off the accelerator without stalling it; the store runs once the copy has landed
            key, value, event = _to_host_async(key, value)
            self.pool.after(event, lambda: store(key, value))

    # --- decode rows -----------------------------------------------------------------------------------
    def start_decode(self, request: Request) -> None:
        slot = self.host_kv.slot_of[request.request_id]
        worker = self.pool.least_loaded_worker()
        row = BERow(request, slot, worker, self.host_kv.generation[slot], position=request.num_tokens - 1)
        self.rows[request.request_id] = row
        self.row_by_slot[slot] = row
        self.pool.register(worker, slot, self.host_kv.blocks_of(request.request_id))

    def entering(self) -> list[BERow]:
        cap = self.max_rows_per_layer
        return [row for row in self.rows.values() if row.state == ENTER][:cap]

    def ready(self, layer: int) -> list[BERow]:
        self.collect()
        cap = self.max_rows_per_layer
        return [row for row in self.rows.values() if row.state == READY and row.layer == layer][:cap]

    def submit(self, layer: int, rows: list[BERow], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               hidden: torch.Tensor) -> None:  # fmt: skip
        """Send these rows' layer-`layer` attention to the CPU; keep their layer input until it returns."""
        tasks: dict[int, list[tuple[int, int, int, int]]] = {}
        for index, row in enumerate(rows):
            self.residuals[(row.request.request_id, layer)] = hidden[index]
            row.layer, row.state = layer, WAITING
            tasks.setdefault(row.worker, []).append((row.slot, layer, row.position, row.generation))
        slots = torch.tensor([row.slot for row in rows])
        event = None
        if self.device.type == "cpu":
            host_q, host_k, host_v = q.float(), k.float(), v.float()
        else:
            host_q, host_k, host_v, event = _to_host_async(q.float(), k.float(), v.float())
        buffers = self.buffers

        def stage() -> None:
            buffers.q_in.index_copy_(0, slots, host_q)
            buffers.k_in.index_copy_(0, slots, host_k)
            buffers.v_in.index_copy_(0, slots, host_v)

        if event is None:
            stage()
        else:
            self.pool.after(event, stage)
        self.pool.submit(tasks)

    def take(self, layer: int, rows: list[BERow]) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU attention results and stored layer inputs of READY rows, as accelerator tensors."""
        slots = torch.tensor([row.slot for row in rows])
        attn = self.buffers.out.index_select(0, slots).to(self.device, self.dtype)
        residual = torch.stack([self.residuals.pop((row.request.request_id, layer)) for row in rows])
        for row in rows:
            row.layer, row.state = layer + 1, MERGED
        return attn, residual

    def token_done(self, row: BERow) -> None:
        """The row finished the last layer and was sampled; its next token enters at layer 0."""
        row.state, row.layer = ENTER, 0
        row.position = row.request.num_tokens - 1

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
                row.state = READY
        for death in deaths:
            self.metrics.cpu_worker_restarts.inc()
            for slot in death.slots:
                row = self.row_by_slot.pop(slot, None)
                if row is None:
                    continue
                if not row.released:
                    row.state = FAILED
                    self.failed.append((row.request, f"the CPU attention worker holding this request died "
                                                     f"(exit code {death.exit_code}); its host KV cache is lost"))
                else:
                    self.host_kv.free(row.request.request_id)

    def take_failures(self) -> list[tuple[Request, str]]:
        failed, self.failed = self.failed, []
        return failed

    # --- state for the engine loop and metrics --------------------------------------------------------
    def has_work(self) -> bool:
        # row_by_slot also holds finished rows whose last task is still on a worker: keep polling for them.
        return bool(self.rows or self.row_by_slot)

    def runnable_rows(self) -> int:
        """Rows the accelerator could take now (entering layer 0, or with a CPU result waiting)."""
        return sum(1 for row in self.rows.values() if row.state in (ENTER, READY))

    def has_ready_work(self) -> bool:
        return any(row.state in (ENTER, READY) for row in self.rows.values())

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

    def close(self) -> None:
        self._hold.value = 1
        self.pool.close()


_copy_streams: dict[int, torch.cuda.Stream] = {}


def _to_host_async(*tensors: torch.Tensor) -> tuple:
    """Device-to-host copies into pinned memory on a side stream, so they overlap the next layer's compute.

    Returns the host tensors and an event that completes when they have landed (the sender thread waits on
    it; the engine never does).
    """
    device = tensors[0].device
    stream = _copy_streams.get(device.index or 0)
    if stream is None:
        stream = _copy_streams[device.index or 0] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the copies read what this layer just computed
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    with torch.cuda.stream(stream):
        for dst, src in zip(host, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
            src.record_stream(stream)  # keep the source alive for the copy, whatever the allocator does
        event = torch.cuda.Event()
        event.record(stream)
    return (*host, event)
