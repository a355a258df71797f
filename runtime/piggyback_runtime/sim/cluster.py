"""Several instances of one model behind a router, in simulated time: round-robin, least-loaded, length-aware.

The router is the runtime's own: `router.policy` (candidates, migration_target) and `router.stages`
(plan_stages, refine), fed the instances' loads. What is modelled:

- Each instance runs continuous batching (vLLM-like, LS only): FIFO admission while the batch has a free
  row (max_batch_rows) and the KV cache holds the request's prompt + output tokens (reserved whole at
  admission, so nothing is preempted); chunked prefill with a per-iteration token budget; every admitted
  request past its prefill decodes one token per iteration. This is a simpler engine than `sim.simulator`'s
  (which drives the runtime's Planner and the piggyback BE path on one node): moving running requests between
  Planners is not something the Planner supports, and the question here is placement across instances.
- An iteration lasts `DeviceProfile.iteration_s` (measured Dense timings from Vidur, analytic attention),
  which charges for length heterogeneity in the decode batch. The attention model:
      decode attention time = a · Σ contexts · (1 + p · (1 − mean / max)) (+ launch cost per layer)
  a: seconds per context token read (HBM bandwidth × the GPU's decode efficiency); mean and max over the
  decode batch's contexts; p: the mixing penalty. A homogeneous batch (mean = max) pays nothing extra; a batch
  dominated by one long context among many short ones approaches (1 + p)×. With p = 1 (CLUSTER_MIXING_PENALTY)
  typical mixes land at 1.1–2× the homogeneous time, the range L4 measured (1.1–2.1×) for tiled split-K
  kernels, where streaming multiprocessors that finish the short rows sit idle while the longest row's tiles
  finish.
- Migration (lengthAware crossings, leastLoaded / lengthAware rebalancing): the request stops decoding, its
  KV (context × kv_bytes_per_token) crosses the network at `migration_bandwidth_gb_s` after
  `migration_latency_s`, and it resumes on the target. The target's KV is reserved when the transfer starts;
  the source's is freed when it ends. The policy caps transfers in flight (3).
- The router sees every instance's true, current load (no scrape delay), decides at each arrival, and looks
  for migrations every `router_tick_s`; lengthAware refines its boundaries every `refine_interval_s`.
- SLO: a request attains it when its end-to-end latency is within `slo_scale` × its unloaded latency (alone on
  one instance: its prefill chunks then one decode step per output token). L4 reports attainment at 5× and 20×.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from piggyback_runtime.router.policy import LengthAwarePolicy, ReplicaLoad, RoutingPolicy, make_policy
from piggyback_runtime.router.stages import (
    StagePlan,
    bucket_token_demand,
    exponential_bucket_edges,
    plan_stages,
    refine,
    token_rate_from_step_time,
)
from piggyback_runtime.scheduler.latency_model import StaircaseModel, prefill_chunk_load
from piggyback_runtime.sim.devices import (
    DeviceProfile,
    ModelShape,
    analytic_attention,
    analytic_logits,
    build_gpu_profile,
    resolve_model,
)

CLUSTER_MIXING_PENALTY = 1.0  # p in the attention model above (calibrated to L4's 1.1–2.1×)
DEFAULT_MIGRATION_BANDWIDTH_GB_S = 50.0  # one 400 Gb/s ConnectX-7 link (L4's testbed)
DEFAULT_MIGRATION_LATENCY_S = 2e-3  # setup: connection, block tables, handshake (an assumption)


@dataclass(frozen=True)
class ClusterRequest:
    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class ClusterRecord:
    request: ClusterRequest
    rejected: str | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    migrations: int = 0
    unloaded_latency_s: float = 0.0

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.request.arrival_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.request.arrival_s


@dataclass(eq=False)
class _Live:
    record: ClusterRecord
    instance: _Instance
    prefilled: int = 0
    generated: int = 0
    migrating: bool = False
    finished: bool = False

    @property
    def request(self) -> ClusterRequest:
        return self.record.request

    @property
    def context_tokens(self) -> int:
        return self.prefilled + self.generated

    @property
    def reserved_tokens(self) -> int:
        return self.request.prompt_tokens + self.request.output_tokens


@dataclass(eq=False)
class _Instance:
    name: str
    kv_capacity_tokens: int
    waiting: deque[_Live] = field(default_factory=deque)
    running: list[_Live] = field(default_factory=list)
    kv_used_tokens: int = 0
    iterating: bool = False
    iteration_end_s: float = 0.0
    busy_s: float = 0.0
    iterations: int = 0

    def load(self, max_waiting: int) -> ReplicaLoad:
        free_tokens = self.kv_capacity_tokens - self.kv_used_tokens
        return ReplicaLoad(self.name, len(self.running), len(self.waiting), free_tokens, 0,
                           len(self.waiting) < max_waiting)  # fmt: skip


@dataclass
class ClusterResult:
    router: str
    duration_s: float
    end_s: float
    records: list[ClusterRecord]
    output_tokens_in_window: int
    migrations: int
    migration_bytes: float
    plan: StagePlan | None
    instance_busy_share: list[float]
    slo_scale: float

    def finished(self) -> list[ClusterRecord]:
        return [r for r in self.records if r.finished_s is not None]

    @property
    def mean_latency_s(self) -> float:
        done = [r.latency_s for r in self.finished() if r.latency_s is not None]
        return sum(done) / len(done) if done else math.nan

    def latency_percentile_s(self, q: float) -> float:
        done = sorted(r.latency_s for r in self.finished() if r.latency_s is not None)
        if not done:
            return math.nan
        return done[min(len(done) - 1, max(0, math.ceil(q / 100 * len(done)) - 1))]

    @property
    def throughput_tokens_s(self) -> float:
        """Output tokens produced while requests were arriving, per second."""
        return self.output_tokens_in_window / self.duration_s

    @property
    def slo_attainment(self) -> float:
        """Share of all requests (rejected and unfinished ones are misses) within slo_scale × unloaded latency."""
        if not self.records:
            return 1.0
        hits = sum(1 for r in self.records
                   if r.latency_s is not None and r.latency_s <= self.slo_scale * r.unloaded_latency_s)  # fmt: skip
        return hits / len(self.records)


# --- device and workloads ------------------------------------------------------------------------------------
def h100_llama3_8b_profile(
    mixing_penalty: float = CLUSTER_MIXING_PENALTY, data_dir: str | None = None
) -> DeviceProfile:
    """Llama-3-8B on one H100. The Vidur copy has no Llama-3-8B timings on H100, so Dense is Llama-2-7B's
    measured H100 staircase scaled by the two models' Dense parameter ratio (an approximation, ~1.1×);
    attention, lm_head and the KV size (GQA, 8 KV heads: 128 KiB a token) are Llama-3-8B's own."""
    base = build_gpu_profile("h100", "llama-2-7b", data_dir=data_dir, mixing_penalty=mixing_penalty)
    shape_7b, shape_8b = base.shape, resolve_model("llama-3-8b")

    def dense_params(s: ModelShape) -> float:
        h, i, kv = s.hidden_size, s.intermediate_size, s.num_kv_heads * s.head_dim
        return s.num_layers * (h * h * 2 + 2 * h * kv + 3 * h * i)

    ratio = dense_params(shape_8b) / dense_params(shape_7b)
    model = base.latency_model
    samples = [(rows, seconds * ratio) for rows, seconds in model.dense_samples]
    scaled = replace(model, dense=StaircaseModel.fit(samples, reduce="median"), dense_samples=tuple(samples),
                     attention=analytic_attention(base.gpu, shape_8b, 1),
                     logits=analytic_logits(base.gpu, shape_8b, 1))  # fmt: skip
    return replace(base, shape=shape_8b, latency_model=scaled)


def skewed_workload(
    rate_per_s: float, duration_s: float, seed: int, min_prompt_tokens: int = 100, max_prompt_tokens: int = 100_000,
    pareto_alpha: float = 0.5, median_output_tokens: int = 256, max_output_tokens: int = 4096,
) -> list[ClusterRequest]:  # fmt: skip
    """Poisson arrivals; prompts from a bounded Pareto on [min, max] (many short, a long tail up to max);
    outputs log-normal around median_output_tokens (σ = 1), capped. α = 0.5 over 100..100K puts the median
    prompt near 400 tokens and ~3% of prompts above 30K, which carry most of the attention work."""
    if rate_per_s <= 0 or duration_s <= 0 or not 0 < min_prompt_tokens < max_prompt_tokens:
        raise ValueError("need rate_per_s > 0, duration_s > 0 and 0 < min_prompt_tokens < max_prompt_tokens")
    rng = random.Random(seed)
    low, high = min_prompt_tokens**-pareto_alpha, max_prompt_tokens**-pareto_alpha
    requests, now = [], 0.0
    for request_id in itertools.count():
        now += rng.expovariate(rate_per_s)
        if now >= duration_s:
            break
        prompt = int((low - rng.random() * (low - high)) ** (-1 / pareto_alpha))
        output = max(16, min(max_output_tokens, int(rng.lognormvariate(math.log(median_output_tokens), 1.0))))
        requests.append(ClusterRequest(request_id, now, min(prompt, max_prompt_tokens), output))
    return requests


def bimodal_workload(
    rate_per_s: float, duration_s: float, seed: int, short_tokens: int, long_tokens: int, long_share: float,
    output_tokens: int,
) -> list[ClusterRequest]:  # fmt: skip
    """Poisson arrivals, each prompt either short_tokens or long_tokens (long with probability long_share)."""
    rng = random.Random(seed)
    requests, now = [], 0.0
    for request_id in itertools.count():
        now += rng.expovariate(rate_per_s)
        if now >= duration_s:
            break
        prompt = long_tokens if rng.random() < long_share else short_tokens
        requests.append(ClusterRequest(request_id, now, prompt, output_tokens))
    return requests


# --- planning from a workload sample ----------------------------------------------------------------------------
def plan_for_workload(
    device: DeviceProfile, replicas: Sequence[str], sample: Sequence[ClusterRequest], kv_capacity_tokens: int,
    max_batch_rows: int, max_prefill_tokens: int, max_context_tokens: int,
) -> StagePlan:  # fmt: skip
    """The DP's plan for the length distribution of `sample` (not the trace that will run).

    Demand per bucket: the decode tokens/s produced at its lengths, plus each prompt's prefill converted into
    the decode tokens a replica of that bucket could have produced meanwhile (prefill seconds × its rate):
    long prompts are costly to prefill, and the stage that takes them needs the replicas for it."""
    edges = exponential_bucket_edges(max_context_tokens)
    window_s = max(r.arrival_s for r in sample) if sample else 1.0
    demand = bucket_token_demand([(r.prompt_tokens, r.output_tokens) for r in sample], edges, window_s)
    rate = token_rate_from_step_time(lambda contexts: device.iteration_s(len(contexts), 0.0, contexts, len(contexts)),
                                     kv_capacity_tokens, max_batch_rows)  # fmt: skip
    inner = edges[1:-1]
    for r in sample:
        b = bisect.bisect_right(inner, r.prompt_tokens)
        demand[b] += prefill_s(device, r.prompt_tokens, max_prefill_tokens) * rate(edges[b], edges[b + 1]) / window_s
    return plan_stages(replicas, edges, demand, rate)


def prefill_s(device: DeviceProfile, prompt_tokens: int, max_prefill_tokens: int) -> float:
    seconds, done = 0.0, 0
    while done < prompt_tokens:
        chunk = min(max_prefill_tokens, prompt_tokens - done)
        seconds += device.iteration_s(chunk, prefill_chunk_load(done, chunk), (), 1)
        done += chunk
    return seconds


def unloaded_latency_s(device: DeviceProfile, request: ClusterRequest, max_prefill_tokens: int) -> float:
    mid_context = request.prompt_tokens + request.output_tokens // 2
    step = device.iteration_s(1, 0.0, (mid_context,), 1)
    return prefill_s(device, request.prompt_tokens, max_prefill_tokens) + (request.output_tokens - 1) * step


# --- the simulator ----------------------------------------------------------------------------------------------
class ClusterSimulator:
    def __init__(
        self,
        device: DeviceProfile,
        num_instances: int,
        policy: RoutingPolicy,
        requests: Sequence[ClusterRequest],
        duration_s: float,
        drain_s: float = 600.0,
        kv_capacity_tokens: int | None = None,
        max_batch_rows: int = 256,
        max_prefill_tokens: int = 8192,
        max_waiting: int = 256,
        router_tick_s: float = 0.1,
        refine_interval_s: float = 5.0,
        migration_bandwidth_gb_s: float = DEFAULT_MIGRATION_BANDWIDTH_GB_S,
        migration_latency_s: float = DEFAULT_MIGRATION_LATENCY_S,
        slo_scale: float = 5.0,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        if max_batch_rows < 1 or max_prefill_tokens < 1 or router_tick_s <= 0 or migration_bandwidth_gb_s <= 0:
            raise ValueError("max_batch_rows, max_prefill_tokens, router_tick_s and migration_bandwidth_gb_s "
                             "must be > 0")  # fmt: skip
        self.device = device
        self.policy = policy
        self.duration_s = duration_s
        self.drain_s = drain_s
        capacity = kv_capacity_tokens or device.gpu_kv_capacity_tokens()
        self.instances = [_Instance(f"replica-{i}", capacity) for i in range(num_instances)]
        self._by_name = {x.name: x for x in self.instances}
        if isinstance(policy, LengthAwarePolicy) and set(policy.plan.replicas) != set(self._by_name):
            raise ValueError(f"the stage plan's replicas {sorted(policy.plan.replicas)} are not the cluster's "
                             f"{sorted(self._by_name)}")  # fmt: skip
        self.max_batch_rows = max_batch_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self.router_tick_s = router_tick_s
        self.refine_interval_s = refine_interval_s
        self.migration_b_s = migration_bandwidth_gb_s * 1e9
        self.migration_latency_s = migration_latency_s
        self.slo_scale = slo_scale
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.records = [ClusterRecord(r, unloaded_latency_s=unloaded_latency_s(device, r, max_prefill_tokens))
                        for r in self.requests]  # fmt: skip
        self.now = 0.0
        self._events: list[tuple[float, int, str, object]] = []
        self._sequence = itertools.count()
        self._in_flight = 0
        self.migrations = 0
        self.migration_bytes = 0.0
        self.output_tokens_in_window = 0

    def _push(self, at_s: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (at_s, next(self._sequence), kind, payload))

    def loads(self) -> list[ReplicaLoad]:
        return [x.load(self.max_waiting) for x in self.instances]

    # -- requests --------------------------------------------------------------------------------------------
    def _arrive(self, record: ClusterRecord) -> None:
        request = record.request
        needed = request.prompt_tokens + request.output_tokens
        loads = self.loads()
        for name in self.policy.candidates(request.prompt_tokens, "LS", loads):
            instance = self._by_name[name]
            if len(instance.waiting) < self.max_waiting and needed <= instance.kv_capacity_tokens:
                instance.waiting.append(_Live(record, instance))
                self._kick(instance)
                return
        record.rejected = "no replica admits it" if needed <= self.instances[0].kv_capacity_tokens else "too long"

    def _admit(self, instance: _Instance) -> None:
        while instance.waiting and len(instance.running) < self.max_batch_rows:
            live = instance.waiting[0]
            if instance.kv_used_tokens + live.reserved_tokens > instance.kv_capacity_tokens:
                break  # FIFO: the head waits for KV rather than being overtaken
            instance.waiting.popleft()
            instance.kv_used_tokens += live.reserved_tokens
            instance.running.append(live)

    def _kick(self, instance: _Instance) -> None:
        if instance.iterating:
            return
        self._admit(instance)
        if not instance.running:
            return
        budget = self.max_prefill_tokens
        chunks: list[tuple[_Live, int]] = []
        decodes: list[_Live] = []
        prefill_load = 0.0
        for live in instance.running:
            remaining = live.request.prompt_tokens - live.prefilled
            if remaining > 0:
                if budget > 0:
                    chunk = min(budget, remaining)
                    chunks.append((live, chunk))
                    prefill_load += prefill_chunk_load(live.prefilled, chunk)
                    budget -= chunk
            else:
                decodes.append(live)
        completing = sum(1 for live, chunk in chunks if live.prefilled + chunk >= live.request.prompt_tokens)
        dense_rows = sum(c for _, c in chunks) + len(decodes)
        seconds = self.device.iteration_s(dense_rows, prefill_load, [x.context_tokens for x in decodes],
                                          len(decodes) + completing)  # fmt: skip
        instance.iterating = True
        instance.iteration_end_s = self.now + seconds
        instance.busy_s += seconds
        instance.iterations += 1
        self._push(self.now + seconds, "iteration", (instance, chunks, decodes))

    def _token(self, live: _Live) -> None:
        live.generated += 1
        if self.now <= self.duration_s:
            self.output_tokens_in_window += 1
        if live.generated == 1:
            live.record.first_token_s = self.now
        if live.generated >= live.request.output_tokens:
            live.finished = True
            live.record.finished_s = self.now
            instance = live.instance
            if not live.migrating:
                instance.running.remove(live)
                instance.kv_used_tokens -= live.reserved_tokens
            # a migrating request is no longer in the source's batch; its KV is freed when the transfer ends

    def _iteration_done(self, instance: _Instance, chunks: list[tuple[_Live, int]], decodes: list[_Live]) -> None:
        instance.iterating = False
        for live, chunk in chunks:
            live.prefilled += chunk
            if live.prefilled >= live.request.prompt_tokens:
                self._token(live)
        for live in decodes:
            if not live.finished:
                self._token(live)
        self._kick(instance)

    # -- migration and refinement ----------------------------------------------------------------------------
    def _router_tick(self) -> None:
        loads = self.loads()
        index = {x.replica: i for i, x in enumerate(loads)}
        for instance in self.instances:
            if self._in_flight >= self.policy.max_in_flight_migrations:
                break
            for live in sorted(instance.running, key=lambda x: -x.context_tokens):
                if self._in_flight >= self.policy.max_in_flight_migrations:
                    break
                if live.prefilled < live.request.prompt_tokens or live.finished:
                    continue  # only decoding requests move (a prefill in progress has no complete KV to send)
                target_name = self.policy.migration_target(live.context_tokens, instance.name, loads, self._in_flight)
                if target_name is None or target_name == instance.name:
                    continue
                target = self._by_name[target_name]
                if target.kv_used_tokens + live.reserved_tokens > target.kv_capacity_tokens:
                    continue
                self._start_migration(live, instance, target)
                loads[index[instance.name]] = instance.load(self.max_waiting)
                loads[index[target.name]] = target.load(self.max_waiting)
        if self.now < self.duration_s + self.drain_s and self._work_left():
            self._push(self.now + self.router_tick_s, "tick", None)

    def _start_migration(self, live: _Live, source: _Instance, target: _Instance) -> None:
        source.running.remove(live)  # paused: it decodes no more on the source (an in-flight step still lands)
        target.kv_used_tokens += live.reserved_tokens
        live.migrating = True
        kv_bytes = live.context_tokens * self.device.shape.kv_bytes_per_token()
        self._in_flight += 1
        self.migrations += 1
        self.migration_bytes += kv_bytes
        live.record.migrations += 1
        # The transfer starts once the source's step in flight (which may include this request) has landed.
        start_s = source.iteration_end_s if source.iterating else self.now
        self._push(start_s + self.migration_latency_s + kv_bytes / self.migration_b_s, "migrated", (live, target))
        self._kick(source)

    def _migration_done(self, live: _Live, target: _Instance) -> None:
        self._in_flight -= 1
        source = live.instance
        source.kv_used_tokens -= live.reserved_tokens
        live.migrating = False
        if live.finished:  # its last token came from the source's step in flight when the transfer started
            target.kv_used_tokens -= live.reserved_tokens
        else:
            live.instance = target
            target.running.append(live)
        self._kick(source)
        self._kick(target)

    def _refine(self) -> None:
        policy = self.policy
        assert isinstance(policy, LengthAwarePolicy)
        lengths = [max(live.context_tokens, live.request.prompt_tokens)
                   for x in self.instances for live in itertools.chain(x.running, x.waiting)]  # fmt: skip
        policy.plan = refine(policy.plan, lengths)
        if self.now < self.duration_s and self._work_left():
            self._push(self.now + self.refine_interval_s, "refine", None)

    def _work_left(self) -> bool:
        return bool(self._next_arrival < len(self.records) or self._in_flight
                    or any(x.running or x.waiting for x in self.instances))  # fmt: skip

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> ClusterResult:
        self._next_arrival = 0
        for i, record in enumerate(self.records):
            self._push(record.request.arrival_s, "arrival", i)
        self._push(self.router_tick_s, "tick", None)
        if isinstance(self.policy, LengthAwarePolicy) and self.refine_interval_s > 0:
            self._push(self.refine_interval_s, "refine", None)
        end_s = self.duration_s + self.drain_s
        last_report = 0.0
        while self._events:
            at_s, _, kind, payload = heapq.heappop(self._events)
            if at_s > end_s:
                break
            self.now = at_s
            if kind == "arrival":
                self._next_arrival += 1
                self._arrive(self.records[payload])  # type: ignore[index]
            elif kind == "iteration":
                self._iteration_done(*payload)  # type: ignore[misc]
            elif kind == "tick":
                self._router_tick()
            elif kind == "migrated":
                self._migration_done(*payload)  # type: ignore[misc]
            elif kind == "refine":
                self._refine()
            if progress is not None and self.now - last_report >= 10.0:
                progress(self.now)
                last_report = self.now
        plan = self.policy.plan if isinstance(self.policy, LengthAwarePolicy) else None
        end = max(self.now, 1e-9)
        return ClusterResult(self.policy.name, self.duration_s, end, self.records, self.output_tokens_in_window,
                             self.migrations, self.migration_bytes, plan,
                             [x.busy_s / end for x in self.instances], self.slo_scale)  # fmt: skip


def run_router(
    router: str, device: DeviceProfile, num_instances: int, requests: Sequence[ClusterRequest], duration_s: float,
    plan_sample: Sequence[ClusterRequest] | None = None, max_context_tokens: int = 131_072, **options: float,
) -> ClusterResult:  # fmt: skip
    """One router over one trace. lengthAware plans its stages from plan_sample (default: the trace itself)."""
    names = [f"replica-{i}" for i in range(num_instances)]
    plan = None
    if router == "lengthAware":
        capacity = int(options.get("kv_capacity_tokens") or device.gpu_kv_capacity_tokens())
        plan = plan_for_workload(device, names, plan_sample or requests, capacity,
                                 int(options.get("max_batch_rows", 256)), int(options.get("max_prefill_tokens", 8192)),
                                 max_context_tokens)  # fmt: skip
    policy = make_policy(router, plan)
    return ClusterSimulator(device, num_instances, policy, requests, duration_s, **options).run()  # type: ignore[arg-type]
