"""Discrete-event simulator: the runtime's own planner in simulated time, the forward pass replaced by timings.

What is the runtime's, unchanged: `scheduler.planner.Planner` (batching, chunked prefill, preemption, the
policy object, the SLO controller's BE share and LS admission, host-KV reservation and the BE queue), fed
`Request` objects and a clock that reads simulated time. An iteration is the engine's three calls,
`planner.schedule`, then a timing from the model below in place of the forward pass, then `planner.update`
with what it produced; the statistics the results report come from the planner's stats recorder.

What is modelled (`sim/devices.py` gives the figures):
- The accelerator runs one iteration at a time. An iteration's duration is the device profile's
  (`DeviceProfile.iteration_s`), spread evenly over the layers; a BE row merged at a layer adds what one more
  Dense row costs there (f_D(n + m) − f_D(n), per layer).
- The piggyback path as the runtime runs it (`piggyback/be_path.py`, `model_runner.py`): a BE token enters at
  layer 0; its attention for layer l goes to a CPU worker when the accelerator passes layer l; the row is
  merged into layer l's Dense batch at the first pass over layer l after its CPU result is back (at most
  `be_rows_per_layer` rows a layer, the planner's bound), and in the same pass goes on to layer l + 1. A row
  whose result comes back within a layer's GPU time advances several layers in one iteration; one whose
  result is late waits for the next pass. This per-layer lag is what sets BE throughput.
- CPU workers are FIFO servers at the host's attention bandwidth (KV bytes / bandwidth + a fixed cost per
  task); BE q/k/v go over PCIe and results come back over it. Remote CPU-only nodes are more servers behind
  the network's latency and bandwidth. BE prefill KV is copied to host DRAM over PCIe; a row starts decoding
  once its copy has landed.
- `neo`: the accelerator waits, layer by layer, for the CPU attention of every row it carries.

Time is in seconds from the start of the scenario. LS attainment follows DESIGN.md (a rejection is a miss);
BE throughput counts BE output tokens produced before `duration_s`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.metrics import RequestTiming, slo_attained
from piggyback_runtime.remote_capacity import KV_SHARE_OF_DRAM, CPUTier
from piggyback_runtime.request import Request, SamplingParams
from piggyback_runtime.scheduler.batching import IterationPlan
from piggyback_runtime.scheduler.be_mode import HostPathCapacity
from piggyback_runtime.scheduler.latency_model import LatencyModel, prefill_chunk_load
from piggyback_runtime.scheduler.outputs import IterationOutputs, TokenEvent, sampling_requests
from piggyback_runtime.scheduler.planner import Planner
from piggyback_runtime.scheduler.policies import policy_class
from piggyback_runtime.scheduler.remote_tier import RemoteTier, TierCosts
from piggyback_runtime.scheduler.stats import StatsRecorder
from piggyback_runtime.sim.devices import DeviceProfile
from piggyback_runtime.sim.workload import SimRequest

# Cache sizes of a simulation whose config sets none and whose scenario names no GPU to size them from.
UNSIZED_KV_CACHE_GIB = 1.0
UNSIZED_HOST_KV_GIB = 4.0


def uses_remote_tier(config: RuntimeConfig, device: DeviceProfile) -> bool:
    """Whether the planner places BE KV on the device's remote nodes as a tier of their own (hybrid placement
    with remote nodes); else their DRAM counts as host KV and the simulator spreads rows over all CPUs."""
    engine = config.engine
    return device.remote is not None and policy_class(engine.policy).hybrid_placement and engine.hybrid_placement


def remote_tier_of(device: DeviceProfile) -> RemoteTier:
    """The planner's remote tier from the device's figures: each node's KV (80 % of its DRAM), its attention
    bandwidth and its link; the host's attention bandwidth (the same figures the simulated workers serve at)."""
    remote = device.remote
    assert remote is not None
    node = remote.node()
    kv_tokens = int(node.dram_gib * 2**30 * KV_SHARE_OF_DRAM // device.shape.kv_bytes_per_token())
    per_node_b_s = device.remote_bandwidth_b_s() / remote.count
    nodes = [CPUTier(i, kv_tokens, per_node_b_s, node) for i in range(remote.count)]
    costs = TierCosts(device.shape.kv_bytes_per_token_per_layer(), device.be_qkv_bytes_per_layer(),
                      device.be_attention_out_bytes_per_layer())  # fmt: skip
    return RemoteTier(device.host_attention_bandwidth_b_s(), nodes, costs)


@dataclass
class _Worker:
    """One CPU attention server: local (PCIe to the accelerator) or remote (network)."""

    bandwidth_b_s: float
    transfer_s: Callable[[float], float]  # one-way latency + transfer time for a number of bytes
    remote: bool = False
    free_at: float = 0.0  # paced: when its deadline-bound tasks are done
    background_free_at: float = 0.0  # paced: when its late tasks (served in spare time) are done
    rows: int = 0
    busy_s: float = 0.0
    # The submission its last task came in (when, layer): the runtime sends a worker one message per submission
    # and runs each layer's rows in one kernel call (piggyback/pool.py, worker.py), so the fixed cost of a task
    # is paid once per worker and submission, not once per row.
    batch: tuple[float, int] | None = None


@dataclass(eq=False)
class _Node:
    """Where a host-path row's KV lives: the GPU host's DRAM (served by the local workers) or one remote CPU
    node. Paced (piggyback.paced_cpu_attention): a task goes to whichever of the node's workers frees first."""

    workers: list[_Worker]
    rows: int = 0

    @property
    def bandwidth_b_s(self) -> float:
        return sum(w.bandwidth_b_s for w in self.workers)


@dataclass(eq=False)
class _Row:
    """A host-path request between tokens: which layer it needs next, and when that layer's result is back."""

    request: Request
    worker: _Worker  # unpaced: the one FIFO worker of this row; paced: the worker of its latest task
    node: _Node
    layer: int = 0
    ready_at: float = 0.0
    sub_batch: int = 0  # A (0) or B (1) in iterations that run two sub-batches: alternating as rows start


@dataclass
class RequestRecord:
    service: str
    service_class: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    rejected: str | None = None  # the rejection reason
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    tokens_out: int = 0
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None

    def timing(self) -> RequestTiming:
        return RequestTiming(self.arrival_s, None, self.first_token_s, self.last_token_s, self.tokens_out)

    @property
    def ttft_s(self) -> float | None:
        return self.timing().ttft_s

    @property
    def tpot_s(self) -> float | None:
        return self.timing().tpot_s

    @property
    def attained(self) -> bool:
        """DESIGN.md's definition (metrics.slo_attained), finished; a rejected or unfinished request is a miss."""
        if self.rejected or self.finished_s is None or self.ttft_slo_s is None or self.tpot_slo_s is None:
            return False
        return all(slo_attained(self.timing(), self.ttft_slo_s, self.tpot_slo_s))


@dataclass
class SimResult:
    policy: str
    duration_s: float
    end_s: float  # when the simulation stopped (after draining LS work)
    records: list[RequestRecord]
    be_tokens: int  # BE output tokens produced before duration_s
    gpu_busy_s: float
    iterations: int
    host_bytes_read: float
    host_kv_usage_mean: float
    host_kv_usage_peak: float
    be_rows_merged: int
    cpu_busy_share: float  # mean over CPU workers of the time they spent on attention
    notes: list[str] = field(default_factory=list)
    # Host DRAM bandwidth the CPU attention can use (all sockets × DRAM bandwidth × attention efficiency, remote
    # nodes included), and (time, KV bytes read so far, host-resident rows) at the end of every iteration.
    host_effective_bandwidth_b_s: float = 0.0
    host_read_series: list[tuple[float, float, int]] = field(default_factory=list)
    moves_to_host: int = 0
    moves_to_gpu: int = 0
    cpu_be_tokens: int = 0  # of be_tokens, those decoded on the CPU path (host or remote nodes)
    # (time, the LS headroom gauge) every slo_control.headroom_interval_s, as the runtime exports it
    # (`Planner.headroom_rps`: the same function); empty without SLO control or before an LS request finished.
    ls_headroom_series: list[tuple[float, float]] = field(default_factory=list)

    def host_bandwidth_share(self, from_s: float, to_s: float) -> float:
        """Host DRAM bandwidth used over [from_s, to_s] as a share of the effective bandwidth:
        (KV bytes CPU attention read in the window) / ((to_s − from_s) × host_effective_bandwidth_b_s)."""
        series = self.host_read_series
        start = next((b for t, b, _ in series if t >= from_s), 0.0)
        end = next((b for t, b, _ in reversed(series) if t <= to_s), start)
        return (end - start) / ((to_s - from_s) * self.host_effective_bandwidth_b_s)

    def of(self, service_class: str) -> list[RequestRecord]:
        return [r for r in self.records if r.service_class == service_class]

    @property
    def be_tokens_per_s(self) -> float:
        return self.be_tokens / self.duration_s

    @property
    def ls_attainment(self) -> float:
        ls = self.of("LS")
        return sum(r.attained for r in ls) / len(ls) if ls else 1.0

    @property
    def gpu_busy_share(self) -> float:
        return self.gpu_busy_s / self.end_s if self.end_s > 0 else 0.0

    @property
    def host_bandwidth_b_s(self) -> float:
        return self.host_bytes_read / self.end_s if self.end_s > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Simulator:
    def __init__(
        self,
        config: RuntimeConfig,
        device: DeviceProfile,
        requests: Sequence[SimRequest],
        duration_s: float,
        drain_s: float = 60.0,
        num_kv_blocks: int | None = None,
        num_host_kv_blocks: int | None = None,
        progress: Callable[[float], None] | None = None,
        planner_latency_model: LatencyModel | None = None,
    ) -> None:
        """`num_kv_blocks` / `num_host_kv_blocks`: the caches' sizes in blocks (the scenario decides them
        from the config and the device); `progress(simulated_s)` is called now and then;
        `planner_latency_model`: what the planner believes, where it differs from the device's true timings
        (default: the device's own model, as a runtime that profiled its device exactly)."""
        unknown = sorted({r.service for r in requests} - {s.name for s in config.services})
        if unknown:
            raise ValueError(f"the workload names services the runtime config does not define: {', '.join(unknown)}")
        self.config = config
        self.device = device
        self.duration_s = duration_s
        self.drain_s = drain_s
        self.progress = progress
        self.now = 0.0
        shape = device.shape
        self.num_layers = shape.num_layers
        pb = config.piggyback
        host_gib = pb.host_kv_memory_gib or UNSIZED_HOST_KV_GIB
        host_blocks = num_host_kv_blocks or pb.num_host_kv_blocks or max(
            1, int(host_gib * 2**30) // (pb.host_block_size * shape.kv_bytes_per_token()))
        self.host_kv = HostKV(host_blocks, pb.host_block_size, pb.max_be_requests)
        engine = config.engine
        kv_gib = engine.kv_cache_memory_gib or UNSIZED_KV_CACHE_GIB
        blocks = num_kv_blocks or engine.num_kv_blocks or max(
            1, int(kv_gib * 2**30) // (engine.block_size * shape.kv_bytes_per_token()))
        # BE throughput counts the tokens out by the workload's end, not those of the drain after it.
        self.stats = StatsRecorder(horizon_s=duration_s)
        # Hybrid placement with remote nodes: the planner places BE KV on the host or a node (remote_tier.py).
        tier = remote_tier_of(device) if uses_remote_tier(config, device) else None
        self.planner = Planner(config, blocks, self.host_kv, planner_latency_model or device.latency_model,
                               clock=lambda: self.now, stats=self.stats, kv_moves=True, remote_tier=tier)  # fmt: skip
        self.remote_tier = self.planner.remote_tier
        self.planner.host_capacity = HostPathCapacity(device.host_attention_bandwidth_b_s(), shape.kv_bytes_per_token())
        self.policy = self.planner.policy
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.records: dict[str, RequestRecord] = {}
        # Host-path rows: entering at layer 0 (FIFO, once their prefill KV copy landed), and per layer the rows
        # whose CPU attention for that layer is in flight or back, as a heap on ready time.
        self._pending_entry: list[tuple[float, int, _Row]] = []
        self._entering: deque[_Row] = deque()
        # Per sub-batch (A, B), per layer: the rows whose attention for it is in flight or back.
        self._waiting: tuple[list[list[tuple[float, int, _Row]]], ...] = tuple(
            [[] for _ in range(self.num_layers)] for _ in range(2))
        self._rows_started = 0
        self._ready_times: list[float] = []  # every waiting row's ready time, sorted (for counting)
        self._seq = itertools.count()
        self._offload_free_at = 0.0
        self._offload_done: dict[str, float] = {}
        self.paced = config.piggyback.paced_cpu_attention
        self.workers, self.nodes = self._make_workers()
        self.moved_bytes = 0.0  # KV moved over PCIe by hybrid placement (both ways)
        self._read_series: list[tuple[float, float, int]] = []
        lm = device.latency_model
        self._dense = lm.dense.predict
        self._logits = lm.logits.predict if lm.logits is not None else (lambda rows: 0.0)
        self._overhead_s = lm.overhead_s
        self._kv_per_token_layer = shape.kv_bytes_per_token_per_layer()
        self._qkv_bytes = device.be_qkv_bytes_per_layer()
        self._out_bytes = device.be_attention_out_bytes_per_layer()
        # Statistics of the modelled CPU path (the iterations' own are in `self.stats`).
        self.host_bytes = 0.0
        self.be_rows_merged = 0  # rows merged with a CPU result back, summed over layers (entering rows not counted)
        self.cpu_be_tokens = 0  # BE tokens the CPU path turned out before duration_s
        self._kv_usage_area = 0.0
        self._kv_usage_peak = 0.0

    # --- CPU side --------------------------------------------------------------------------------------
    def _make_workers(self) -> tuple[list[_Worker], list[_Node]]:
        device = self.device
        count = self.config.piggyback.num_cpu_workers
        local_bw = device.host_attention_bandwidth_b_s() / count
        local = [_Worker(local_bw, device.pcie_s) for _ in range(count)]
        nodes = [_Node(local)]
        remote = device.remote
        if remote is not None:
            per_node = device.remote_bandwidth_b_s() / remote.count
            nodes += [_Node([_Worker(per_node, device.network_s, remote=True)]) for _ in range(remote.count)]
        return [w for n in nodes for w in n.workers], nodes

    def _submit(self, row: _Row, layer: int, at_s: float, merge_s: float = math.inf) -> None:
        """Send a row's layer-`layer` attention to a worker at `at_s`; schedule when its result is back.

        Paced (piggyback.paced_cpu_attention): the row's node serves tasks by deadline, two classes on each
        worker with preemptive priority: a task that can be back by its merge point (`merge_s`, while the
        accelerator is at that layer) goes to the worker that frees first and runs ahead of everything else;
        one that cannot runs in the workers' spare time (its row merges at the accelerator's next pass over
        the layer). So rows that entered together spread over all workers instead of queueing behind one,
        those that can keep pace with the accelerator ride with it layer after layer, and the late ones keep
        the workers busy instead of idling them: with a backlog of host-resident rows, host DRAM bandwidth,
        not the per-layer lag, bounds their decode. Unpaced: the row's own FIFO worker (the earlier model)."""
        context = row.request.num_tokens  # tokens in its KV once this token's K/V is written
        num_bytes = context * self._kv_per_token_layer
        if self.paced:
            worker = min(row.node.workers, key=lambda w: w.free_at)
            busy = self._task_s(row, worker, at_s, layer)
            arrive = at_s + worker.transfer_s(self._qkv_bytes)
            done = max(arrive, worker.free_at) + busy
            if done + worker.transfer_s(self._out_bytes) <= merge_s:
                worker.free_at = done
                if worker.background_free_at > arrive:  # the background task running is preempted
                    worker.background_free_at += busy
            else:
                worker = min(row.node.workers, key=lambda w: max(w.background_free_at, w.free_at))
                busy = self._task_s(row, worker, at_s, layer)
                done = max(arrive, worker.background_free_at, worker.free_at) + busy
                worker.background_free_at = done
        else:
            worker = row.worker
            arrive = at_s + worker.transfer_s(self._qkv_bytes)
            busy = self._task_s(row, worker, at_s, layer)
            done = max(arrive, worker.free_at) + busy
            worker.free_at = done
        row.worker = worker
        worker.batch = (at_s, layer)
        worker.busy_s += busy
        self.host_bytes += num_bytes
        row.layer = layer
        row.ready_at = done + worker.transfer_s(self._out_bytes)
        heapq.heappush(self._waiting[row.sub_batch][layer], (row.ready_at, next(self._seq), row))
        bisect.insort(self._ready_times, row.ready_at)

    def _take_ready(self, layer: int, by_s: float, cap: int, sub_batches: tuple[int, ...] = (0, 1)) -> list[_Row]:
        """Rows of these sub-batches whose layer-`layer` result is back by `by_s`, earliest first, at most `cap`."""
        heaps = [self._waiting[sub][layer] for sub in sub_batches]
        taken: list[_Row] = []
        while len(taken) < cap:
            heap = min((h for h in heaps if h and h[0][0] <= by_s), key=lambda h: (h[0][0], h[0][1]), default=None)
            if heap is None:
                break
            ready_at, _, row = heapq.heappop(heap)
            del self._ready_times[bisect.bisect_left(self._ready_times, ready_at)]
            taken.append(row)
        return taken

    def _task_s(self, row: _Row, worker: _Worker, at_s: float, layer: int) -> float:
        """One layer of one row's CPU attention on `worker` (its KV once this token's K/V is written), sent at
        `at_s`: the task's fixed cost only for the first row of that submission on that worker."""
        num_bytes = row.request.num_tokens * self._kv_per_token_layer
        overhead = 0.0 if worker.batch == (at_s, layer) else self.device.host_task_overhead_s
        return overhead + num_bytes / worker.bandwidth_b_s

    def _runnable_rows(self, at_s: float) -> int:
        self._promote_entries(at_s)
        return len(self._entering) + bisect.bisect_right(self._ready_times, at_s)

    def _promote_entries(self, at_s: float) -> None:
        while self._pending_entry and self._pending_entry[0][0] <= at_s:
            self._entering.append(heapq.heappop(self._pending_entry)[2])

    def _start_decode(self, request: Request, at_s: float) -> None:
        tier = self.remote_tier
        if tier is not None:  # the planner placed it: the host (node 0 here) or remote node i (node i + 1)
            placed = tier.node_of(request.request_id)
            node = self.nodes[0 if placed is None else placed + 1]
            worker = node.workers[0]
        elif self.paced:
            node = min(self.nodes, key=lambda n: (n.rows + 1) / n.bandwidth_b_s)
            worker = node.workers[0]
        else:
            worker = min(self.workers, key=lambda w: (w.rows + 1) / w.bandwidth_b_s)
            node = next(n for n in self.nodes if worker in n.workers)
        if not self.paced:  # paced rows have no worker of their own: each task goes where it is served first
            worker = min(node.workers, key=lambda w: (w.rows + 1) / w.bandwidth_b_s)
            worker.rows += 1
        node.rows += 1
        row = _Row(request, worker, node, sub_batch=self._rows_started % 2)
        self._rows_started += 1
        enter_s = max(at_s, self._offload_done.pop(request.request_id, at_s))
        heapq.heappush(self._pending_entry, (enter_s, next(self._seq), row))

    def _release_row(self, row: _Row) -> None:
        if not self.paced:
            row.worker.rows -= 1
        row.node.rows -= 1

    # --- hybrid placement: KV moves over PCIe ------------------------------------------------------------------
    def _move_to_gpu(self, plan: IterationPlan) -> None:
        """Host-resident rows the planner moved back to HBM: off the CPU path; host KV freed (the copy runs
        during this iteration, before the request's next decode, which the planner plans from the next one)."""
        if not plan.be_to_gpu:
            return
        moving = {r.request_id for r in plan.be_to_gpu}
        kept: deque[_Row] = deque()
        for row in self._entering:
            if row.request.request_id in moving:
                self._release_row(row)
                self.host_kv.free(row.request.request_id)
                self.moved_bytes += row.request.num_tokens * self.device.shape.kv_bytes_per_token()
            else:
                kept.append(row)
        self._entering = kept

    def _move_to_host(self, plan: IterationPlan, end: float) -> None:
        """HBM-resident BE requests the planner moved to host KV: copied over PCIe after the offload queue, then
        they enter the CPU path (never recomputed)."""
        for request in plan.be_to_host:
            if request.finish_reason is not None:
                continue
            num_bytes = request.num_tokens * self.device.shape.kv_bytes_per_token()
            self.moved_bytes += num_bytes
            self._offload_free_at = max(self._offload_free_at, end) + self.device.pcie_s(num_bytes)
            landed = self._offload_free_at
            if self.remote_tier is not None and self.remote_tier.node_of(request.request_id) is not None:
                landed += self.device.network_s(num_bytes)  # on to its node over the link
            self._offload_done[request.request_id] = landed
            self._start_decode(request, end)

    # --- requests ----------------------------------------------------------------------------------------
    def _arrive(self, sim: SimRequest) -> None:
        # The engine takes requests between iterations: one that arrives while an iteration runs is admitted
        # when it ends (the clock then reads the iteration's end), as tests/runtime/test_fidelity_gate.py holds.
        self.now = max(self.now, sim.arrival_s)
        request = Request(sim.request_id, sim.service, sim.service_class, [0] * sim.prompt_tokens,
                          SamplingParams(max_tokens=sim.output_tokens, temperature=0.0, ignore_eos=True),
                          arrival_s=sim.arrival_s)  # fmt: skip
        record = RequestRecord(sim.service, sim.service_class, sim.arrival_s, sim.prompt_tokens, sim.output_tokens)
        self.records[sim.request_id] = record
        rejection = self.planner.admission(request)
        if request.slo is not None:
            record.ttft_slo_s, record.tpot_slo_s = request.slo.ttft_s, request.slo.tpot_s
        if rejection is not None:
            record.rejected = rejection.reason
            return
        self.planner.add(request)

    def _token(self, event: TokenEvent) -> None:
        """A token the planner took: into its request's record; a finished host-path request frees its host KV."""
        request = event.request
        record = self.records[request.request_id]
        record.first_token_s, record.last_token_s = request.first_token_s, request.last_token_s
        record.tokens_out += 1
        if event.finish_reason is not None:
            record.finished_s = request.last_token_s
            if self.planner.on_host_path(request):
                self.host_kv.free(request.request_id)

    # --- one iteration -------------------------------------------------------------------------------------
    def _iterate(self, t: float) -> float | None:
        """Run one iteration starting at `t`; its end time, or None when there was nothing to run."""
        self.now = t
        idle = [row.request for row in self._entering] if self.planner.hybrid else ()
        plan = self.planner.schedule(be_rows_ready=self._runnable_rows(t), host_rows_idle=idle)
        self._move_to_gpu(plan)
        rows_waiting = bool(self._entering) or bool(self._ready_times)
        if not plan and not (self._entering or (self._ready_times and self._ready_times[0] <= t)):
            if plan.be_to_host or plan.be_to_gpu:  # moves only: book them, no GPU time
                self.planner.settle_moves(plan)
                self._move_to_host(plan, t)
            return None
        sampling = sampling_requests(plan)
        n = plan.num_tokens
        prefill_load = sum(prefill_chunk_load(c.start, c.num_tokens) for c in plan.prefills)
        base = self.device.iteration_s(n, prefill_load, [c.start + 1 for c in plan.decodes], len(sampling))
        if plan.split_at:  # two sub-batches: the Dense layers run once on each half (the second weight pass)
            base += self._dense(plan.split_at) + self._dense(n - plan.split_at) - self._dense(n)
        done_rows: list[_Row] = []
        end = t + base
        merged_before = self.be_rows_merged
        if rows_waiting:
            end, done_rows = self._layer_walk(t, base, n, plan)
            if done_rows:
                end += self._logits(len(sampling) + len(done_rows)) - self._logits(len(sampling))
        self._copy_prefill_kv(plan, end)
        self.now = end  # the planner's clock: its update measures the iteration from `started_s` to here
        outputs = IterationOutputs(
            started_s=t,
            plan_token_ids=[0] * len(sampling),
            host_path_tokens=[(row.request, 0) for row in done_rows],
            be_rows_merged=self.be_rows_merged - merged_before,
            num_layers=self.num_layers,
        )
        events = self.planner.update(plan, outputs, end)
        self._move_to_host(plan, end)
        self._account_host_kv(end - t)
        self._read_series.append((end, self.host_bytes, sum(n.rows for n in self.nodes)))
        for event in events[: len(sampling)]:
            self._token(event)
            if event.left_for_host_path:
                self._start_decode(event.request, end)
        if end <= self.duration_s:
            self.cpu_be_tokens += sum(not row.request.is_ls for row in done_rows)
        for row, event in zip(done_rows, events[len(sampling) :], strict=True):
            self._token(event)
            if event.finish_reason is not None:
                self._release_row(row)
            else:
                self._entering.append(row)
        return end

    def _layer_walk(self, t: float, base: float, n: int, plan: IterationPlan) -> tuple[float, list[_Row]]:
        """The accelerator's pass over the layers with host-path rows merged where their results are back.

        One batch: a row submitted as the accelerator reaches layer l merges into post_attention(l) if its result
        is back by the middle of the layer. Two sub-batches (`plan.split_at`, model_runner.py's order A.pre(l),
        B.post(l-1), B.pre(l), A.post(l)): A's rows have the first half of the layer, while B's Dense work runs,
        and B's rows the second half, while A's runs; each sub-batch's merged rows cost its own Dense increment.
        The layer's row cap is shared, A's merge point first."""
        cap = plan.be_rows_per_layer
        sync = self.policy.synchronous_cpu_attention
        layers = self.num_layers
        halves = (plan.split_at, n - plan.split_at) if plan.split_at else (n,)
        dense_of = [self._dense(h) if h else 0.0 for h in halves]
        per_layer = (base - self._overhead_s) / layers
        half = per_layer / 2
        clock = t + self._overhead_s
        carry = [self._entering.popleft() for _ in range(min(cap, len(self._entering)))]
        entered = len(carry)
        for layer in range(layers):
            if len(halves) == 1:
                for row in carry:
                    self._submit(row, layer, clock, clock + half)
                if sync:
                    ready = self._take_ready(layer, math.inf, len(carry)) if carry else []
                else:  # merged at post_attention(layer): a result must be back by the middle of the layer
                    ready = self._take_ready(layer, clock + half, cap)
                merged = [len(ready) + (entered if layer == 0 else 0)]
                taken = ready
            else:
                for row in carry:
                    start = clock + half * row.sub_batch
                    self._submit(row, layer, start, start + half)
                ready_a = self._take_ready(layer, clock + half, cap, (0,))
                ready_b = self._take_ready(layer, clock + per_layer, cap - len(ready_a), (1,))
                merged = [len(ready_a), len(ready_b)]
                if layer == 0:
                    entered_b = sum(row.sub_batch for row in carry)
                    merged = [merged[0] + entered - entered_b, merged[1] + entered_b]
                taken = ready_a + ready_b
            step = per_layer
            for h, extra, dense_h in zip(halves, merged, dense_of, strict=True):
                if extra:
                    step += (self._dense(h + extra) - dense_h) / layers
            self.be_rows_merged += len(taken)
            clock += step
            if sync and taken:
                clock = max(clock, max(row.ready_at for row in taken))
            carry = taken
        return clock, carry

    def _copy_prefill_kv(self, plan: IterationPlan, end: float) -> None:
        """BE prefill KV goes to host DRAM over PCIe, one copy after another, once computed."""
        for chunk in plan.prefills:
            if self.planner.on_host_path(chunk.request):
                num_bytes = chunk.num_tokens * self.device.shape.kv_bytes_per_token()
                self._offload_free_at = max(self._offload_free_at, end) + self.device.pcie_s(num_bytes)
                self._offload_done[chunk.request.request_id] = self._offload_free_at

    def _account_host_kv(self, span_s: float) -> None:
        usage = self.host_kv.usage()
        tier = self.remote_tier
        if tier is not None:  # the host's and the nodes' BE KV together
            host_cap = self.host_kv.capacity_tokens()
            node_cap = sum(n.kv_tokens for n in tier.nodes.values())
            usage = (usage * host_cap + sum(t for _, t in tier.held.values())) / (host_cap + node_cap)
        self._kv_usage_area += usage * span_s
        self._kv_usage_peak = max(self._kv_usage_peak, usage)

    def _next_event(self, arrival_s: float) -> float:
        candidates = [arrival_s]
        if self._ready_times:
            candidates.append(self._ready_times[0])
        if self._pending_entry:
            candidates.append(self._pending_entry[0][0])
        return min(candidates)

    # --- the run -----------------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        requests = self.requests
        index = 0
        t = 0.0
        stop_s = self.duration_s + self.drain_s
        last_report = 0.0
        headroom: list[tuple[float, float]] = []
        headroom_interval_s = self.config.slo_control.headroom_interval_s
        next_headroom_s = headroom_interval_s if self.planner.slo is not None else math.inf
        while t < stop_s:
            while t >= next_headroom_s and next_headroom_s <= self.duration_s:
                if (value := self.planner.headroom_rps()) is not None:
                    headroom.append((next_headroom_s, value))
                next_headroom_s += headroom_interval_s
            while index < len(requests) and requests[index].arrival_s <= t:
                self._arrive(requests[index])
                index += 1
            if t >= self.duration_s and not self._ls_held():
                break
            end = self._iterate(t)
            if end is None:
                next_arrival = requests[index].arrival_s if index < len(requests) else math.inf
                following = self._next_event(next_arrival)
                if following == math.inf:
                    break
                self._account_host_kv(following - t)
                t = max(following, t + 1e-9)
            else:
                t = end
            if self.progress is not None and t - last_report >= 10.0:
                last_report = t
                self.progress(t)
        self.now = t
        cpu_busy = sum(w.busy_s for w in self.workers) / (len(self.workers) * t) if t > 0 else 0.0
        return SimResult(
            policy=self.policy.name, duration_s=self.duration_s, end_s=t, records=list(self.records.values()),
            be_tokens=self.stats.be_tokens, gpu_busy_s=self.stats.busy_s, iterations=self.stats.iterations,
            host_bytes_read=self.host_bytes, host_kv_usage_mean=self._kv_usage_area / t if t > 0 else 0.0,
            host_kv_usage_peak=self._kv_usage_peak, be_rows_merged=self.stats.be_rows_merged,
            cpu_busy_share=cpu_busy,
            host_effective_bandwidth_b_s=self.device.host_attention_bandwidth_b_s()
            + self.device.remote_bandwidth_b_s(),
            host_read_series=self._read_series, moves_to_host=self.planner.moves_to_host,
            moves_to_gpu=self.planner.moves_to_gpu, cpu_be_tokens=self.cpu_be_tokens,
            ls_headroom_series=headroom,
        )  # fmt: skip

    def _ls_held(self) -> bool:
        """LS work still to finish (requests that arrived before the horizon are drained, up to drain_s)."""
        return any(r.is_ls for r in (*self.planner.scheduler.running, *self.planner.scheduler.waiting)) or any(
            r.request.is_ls for r in self._all_rows())

    def _all_rows(self) -> list[_Row]:
        rows = list(self._entering) + [entry[2] for entry in self._pending_entry]
        for heap in (h for heaps in self._waiting for h in heaps):
            rows += [entry[2] for entry in heap]
        return rows
