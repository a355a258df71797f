"""The planner: every decision of the runtime in one object, pure Python, driven by a clock.

Input: requests (lengths, classes, SLOs, arrival times), the BE rows the CPU path could merge now, and a
clock. Output: admission decisions and the iteration plan (LS and BE tokens, BE rows allowed per layer).
The engine runs it against the wall clock and a real model; the simulator (sim/) runs the same object in
simulated time with a latency model in place of the forward pass. Both drive it the same way, an iteration at
a time: `plan = planner.schedule()`, run it (or time it), `planner.update(plan, outputs, now)`; the update
does every piece of bookkeeping that follows an iteration (see `update`), and `planner.stats` records it.

It owns the accelerator's continuous batching (`BatchScheduler`), the policy, the SLO controller (BE share
per iteration and LS admission), and the BE side of admission: host-KV reservation and the queue of BE
requests waiting for host KV. Rows already decoding on the CPU path belong to whoever runs that path (the
model runner's `PiggybackPath`, or the simulator's model of it); they free their host KV in `HostKV`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from piggyback_runtime.config import RuntimeConfig, check_hbm_reserve
from piggyback_runtime.kv.allocator import BlockAllocator
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.request import FINISH_LENGTH, FINISH_STOP, Request, RequestStatus, SamplingParams, SLOTarget
from piggyback_runtime.scheduler.batching import BatchScheduler, IterationPlan
from piggyback_runtime.scheduler.be_mode import (
    MODE_MIN_BE_REQUESTS,
    MODE_PERIOD_S,
    SUPPLY_SMOOTHING_S,
    HostPathCapacity,
    be_decode_supply_tokens_s,
    host_only_mode,
)
from piggyback_runtime.scheduler.latency_model import IterationShape, LatencyModel, prefill_chunk_load, regime_of
from piggyback_runtime.scheduler.outputs import (
    IterationOutputs,
    TokenEvent,
    append_until_max_tokens,
    sampling_requests,
)
from piggyback_runtime.scheduler.policies import Policy, make_policy
from piggyback_runtime.scheduler.remote_tier import RemoteTier
from piggyback_runtime.scheduler.slo_control import (
    AdmissionDecision,
    BEAllowance,
    IterationDemand,
    LSMix,
    LSRequestState,
    NewLSRequest,
    PrefillChunk,
    SLOController,
    largest_fitting,
)
from piggyback_runtime.scheduler.stats import StatsRecorder

REASON_BE_QUEUE_FULL = "BEQueueFull"
ITERATION_TRACE_ENV = "PIGGYBACK_ITERATION_TRACE"
# Hybrid placement, while HBM-resident BE decodes fill their share and the host path does not keep pace (below):
# the most of an iteration's token budget spent on BE prompts that will decode on the host path.
# (benchmarks/results/hybrid_decomposition.md: 0.1 of 0, 0.1, 0.25, 0.5, 0.75 gave the most BE tokens; more feeds
# rows that wait for the accelerator's next pass and lengthens the iterations the HBM-resident decodes share.)
HOST_FEED_SHARE = 0.1
# The host path keeps pace while its rows number at most this many per host token an iteration recently produced
# (a riding row gives about one a pass) plus a few to start from: then BE prompts that will decode on the host fill
# the budget. Beyond it rows wait a pass per missed layer, and a prompt fed there decodes slowly.
HOST_PACE_FACTOR = 1.0
HOST_PACE_MIN_ROWS = 4
HOST_TOKENS_EWMA_ALPHA = 0.1  # per iteration: the recent host tokens/iteration forget over ~10 iterations
# The LS headroom gauge subtracts the LS rate admitted over this many seconds (long enough to count tens of
# arrivals at the rates a gauge is read at, short enough to follow a change of load within a few readings).
ADMITTED_RATE_WINDOW_S = 5.0


@dataclass(frozen=True)
class Rejection:
    """Why a request is refused at arrival (HTTP 429), and when a retry may succeed."""

    reason: str
    message: str
    retry_after_s: float
    decision: AdmissionDecision | None = None  # the SLO prediction, for LS rejections


def iteration_shape(plan: IterationPlan, merged_rows_per_layer: float, logit_rows: int,
                    model: LatencyModel | None = None) -> IterationShape:  # fmt: skip
    """The latency model's view of an iteration that ran `plan` and merged BE rows at this rate per layer
    (decode load counted as `model`'s attention kernel pays it; the sum of contexts without a model)."""
    contexts = [c.start + 1 for c in plan.decodes]
    total = float(sum(contexts))
    return IterationShape(
        dense_rows=plan.num_tokens + merged_rows_per_layer,
        prefill_attention_load=sum(prefill_chunk_load(c.start, c.num_tokens) for c in plan.prefills),
        decode_attention_load=model.decode_load(len(contexts), total, max(contexts, default=0)) if model else total,
        logit_rows=logit_rows,
        be_rows_per_layer=merged_rows_per_layer,
        sub_batches=2 if plan.split_at else 1,
    )


class Planner:
    def __init__(
        self,
        config: RuntimeConfig,
        num_kv_blocks: int,
        host_kv: HostKV | None = None,
        latency_model: LatencyModel | Callable[[], LatencyModel] | None = None,
        clock: Callable[[], float] = time.monotonic,
        append_token: Callable[[Request, int], str | None] = append_until_max_tokens,
        stats: StatsRecorder | None = None,
        kv_moves: bool = False,
        remote_tier: RemoteTier | None = None,
    ) -> None:
        """`latency_model`: the model itself, or a function that makes it (profiling is only paid for when
        the policy is SLO-controlled). `host_kv` is required when the policy uses the host path.
        `append_token(request, token)` adds a sampled token to a request and returns its finish reason when
        it is done (the engine detokenises and checks stop strings; the default ends at max_tokens).
        `kv_moves`: the caller executes the plans' KV moves (`be_to_host`, `be_to_gpu`); without it, hybrid
        placement is off and every BE request decodes on the host path, as under `piggyback`.
        `remote_tier`: remote CPU nodes as hybrid placement's third tier (remote_tier.py); a BE request that
        leaves HBM goes to the host or a node, where it decodes fastest (used under hybrid placement only)."""
        engine = config.engine
        self.config = config
        self.clock = clock
        self.append_token = append_token
        self.stats = stats or StatsRecorder()
        self.policy: Policy = make_policy(engine.policy, engine.headroom_be_kv_share,
                                          config.piggyback.max_be_requests)  # fmt: skip
        if kv_moves:  # hybrid placement runs: the cache's size is known here when the engine sized it from memory
            check_hbm_reserve(engine, num_kv_blocks)
        self.allocator = BlockAllocator(num_kv_blocks, engine.block_size)
        self.scheduler = BatchScheduler(self.allocator, engine.max_num_seqs, engine.max_num_batched_tokens,
                                        engine.enable_chunked_prefill, self.policy, clock)  # fmt: skip
        if self.policy.uses_host_path and host_kv is None:
            raise ValueError(f"policy {self.policy.name!r} decodes on the host path and needs host KV")
        self.host_kv = host_kv if self.policy.uses_host_path else None
        self.host_kv_waiting: deque[Request] = deque()  # host-path requests waiting for host KV
        self.services = {s.name: s for s in config.services}
        self.slo: SLOController | None = None
        if self.policy.slo_controlled and config.slo_control.enabled:
            if latency_model is None:
                raise ValueError(f"policy {self.policy.name!r} with slo_control.enabled needs a latency model")
            model = latency_model() if callable(latency_model) else latency_model
            self.slo = SLOController(
                model,
                safety_margin=config.slo_control.safety_margin,
                ls_chunk_tokens=engine.max_num_batched_tokens,
                max_be_rows_per_layer=config.piggyback.max_be_rows_per_layer,
                max_be_prefill_tokens=engine.max_num_batched_tokens,
                # Admission keeps the same margin: a queue admitted up to a prediction exactly at the SLO
                # finishes around the SLO, and then misses it about half the time.
                admission_margin=config.slo_control.safety_margin,
                slo_token_budget=engine.slo_token_budget,
                min_token_budget=engine.min_num_batched_tokens or 1,
                be_rows_first=self.policy.uses_host_path,
            )
        self.static_rows_per_layer = self.policy.rows_per_layer(config.piggyback.max_be_rows_per_layer)
        self.last_allowance: BEAllowance | None = None
        self._finished_ls_lengths: deque[tuple[int, int]] = deque(maxlen=200)
        # Hybrid placement (policy `hybrid` with engine.hybrid_placement): BE KV in spare HBM, host beyond.
        self.hybrid = self.policy.hybrid_placement and engine.hybrid_placement and kv_moves
        self._to_host_next: list[Request] = []  # BE requests the next plan moves to host KV
        self.remote_tier = remote_tier if self.hybrid else None
        self._ls_arrivals: deque[tuple[float, int]] = deque(maxlen=256)  # LS arrival time, prompt tokens
        self._ls_admitted_s: deque[float] = deque()  # when admitted LS requests arrived (the last window's)
        self._first_ls_admitted_s: float | None = None
        # The LS work as it will be once the running iteration ends (`publish_admission_view`), numbered:
        # swapped whole, so another thread may read it while the engine thread plans.
        self.admission_view: tuple[int, tuple[LSRequestState, ...]] = (0, ())
        # What `refuse_early` let through since the view it last read (only its caller's thread touches these).
        self._forwarded_on: int = -1
        self._forwarded: list[LSRequestState] = []
        self.moves_to_host = 0
        self.moves_to_gpu = 0
        self.last_hbm_reserve_blocks = 0
        self.slo_budget = self.slo is not None and engine.slo_token_budget
        # Hybrid placement's mode (scheduler/be_mode.py): host-only (every BE decode on the host path) where the
        # host's DRAM carries all the BE decode the accelerator's prefill feeds, else HBM-first. The caller sets
        # `host_capacity` (the host path's attention bandwidth); without it hybrid placement stays HBM-first.
        self.host_capacity: HostPathCapacity | None = None
        self.be_host_only = False
        self.be_mode_switches = 0
        self._be_mode_due_s = -math.inf
        self._be_lengths_seen: deque[tuple[int, int]] = deque(maxlen=200)  # recent BE prompt tokens, max_tokens
        self.last_be_supply_tokens_s = 0.0
        self._be_work = (0.0, 0.0)  # BE tokens the iterations carried, and their seconds, since the last pick
        self.last_host_decode_tokens_s = 0.0
        # Two sub-batches half a layer apart where CPU rows ride next to a prefill (piggyback.sub_batches), for
        # BE decodes that all run on the CPU path (`_cpu_rows_ride` says why not next to HBM decodes).
        self.sub_batches = (config.piggyback.sub_batches if self.policy.uses_host_path
                            and not self.policy.synchronous_cpu_attention else 1)  # fmt: skip
        # Debugging the latency model on a real engine: one JSON line per iteration (shape, prediction,
        # measurement) appended to this file (benchmarks/iteration_trace.py reads it).
        trace_path = os.environ.get(ITERATION_TRACE_ENV)
        self._trace = open(trace_path, "a", buffering=1) if trace_path else None  # noqa: SIM115 - lives with the planner
        self._planned_s = 0.0
        self._be_rows_ready = 0
        self.host_tokens_per_iteration = 0.0  # host-path tokens an iteration produced lately (EWMA)

    # --- requests in ---------------------------------------------------------------------------------
    def on_host_path(self, request: Request) -> bool:
        """Whether the request decodes with its KV in host DRAM and its attention on the CPU (now: under hybrid
        placement a BE request moves between the two, `request.placement` says where it is)."""
        if self.hybrid:
            return request.placement == "host"
        return self.policy.on_host_path(request.service_class)

    def _placed_by_hybrid(self, request: Request) -> bool:
        return self.hybrid and not request.is_ls

    def admission(self, request: Request) -> Rejection | None:
        """Decide on a new request (its service's SLO is filled in if it brings none); None: admitted."""
        request.slo = self._slo_of(request)
        if request.is_ls:
            self._ls_arrivals.append((request.arrival_s, len(request.prompt_token_ids)))
        decision = self._decide_ls(request, request.slo, self.ls_state)
        if decision is not None and not decision.admitted:
            return Rejection(decision.reason, decision.message, decision.retry_after_s, decision)
        if self._queues_for_batching(request) and len(self.host_kv_waiting) >= self.config.slo_control.max_be_queue:
            return Rejection(REASON_BE_QUEUE_FULL, f"{len(self.host_kv_waiting)} requests already wait for host "
                             "KV memory (slo_control.max_be_queue); retry later", 5.0)  # fmt: skip
        if request.is_ls:
            if self._first_ls_admitted_s is None:
                self._first_ls_admitted_s = request.arrival_s
            self._ls_admitted_s.append(request.arrival_s)
            self._forget_admitted_before(request.arrival_s - ADMITTED_RATE_WINDOW_S)
        return None

    def _slo_of(self, request: Request) -> SLOTarget | None:
        """The request's own SLO, else its service's (None: the service has none)."""
        service = self.services[request.service]
        if request.slo is None and service.slo is not None:
            return SLOTarget(service.slo.ttft_s, service.slo.tpot_s)
        return request.slo

    def _decide_ls(self, request: Request, slo: SLOTarget | None,
                   held: Callable[[], Sequence[LSRequestState]]) -> AdmissionDecision | None:  # fmt: skip
        """The SLO controller's admission decision for an LS request with `slo` next to the LS work `held()`
        names; None where admission does not apply (no SLO control, not LS, no SLO, admission off)."""
        if self.slo is None or not request.is_ls or slo is None or not self.config.slo_control.admission:
            return None
        return self.slo.admit_ls(NewLSRequest(len(request.prompt_token_ids), slo.ttft_s, slo.tpot_s, request.arrival_s),
                                 held(), IterationDemand(), self.clock())  # fmt: skip

    def _held_ls(self) -> list[Request]:
        """The LS requests with an SLO that batching holds, in arrival order."""
        held = [r for r in (*self.scheduler.running, *self.scheduler.waiting) if r.is_ls and r.slo is not None]
        held.sort(key=lambda r: r.arrival_s)
        return held

    def publish_admission_view(self, plan: IterationPlan) -> None:
        """The LS requests as they will be once `plan` ran (its chunks computed, a prompt whose last chunk it
        holds decoding, a decode that reaches max_tokens gone): what `refuse_early` decides against."""
        planned = {c.request.request_id: c for c in plan.chunks}
        view: list[LSRequestState] = []
        for r in self._held_ls():
            slo = r.slo
            assert slo is not None
            chunk = planned.get(r.request_id)
            samples = chunk is not None and chunk.samples
            if r.output_token_ids or samples:
                if samples and len(r.output_token_ids) + 1 >= r.params.max_tokens:
                    continue  # its last token comes out of this plan
                view.append(LSRequestState(slo.tpot_s, None, 0, r.num_tokens + samples))
            else:
                remaining = r.num_remaining_tokens - (chunk.num_tokens if chunk is not None else 0)
                view.append(LSRequestState(slo.tpot_s, r.arrival_s + slo.ttft_s, remaining, r.num_tokens))
        self.admission_view = (self.admission_view[0] + 1, tuple(view))

    def refuse_early(self, request: Request, *, forwarding: bool = True) -> Rejection | None:
        """An LS refusal decided off the engine thread (one caller thread: the HTTP event loop), at arrival:
        a Rejection when `admit_ls` refuses the request against the LS work the running iteration leaves
        (`admission_view`) plus the LS requests this let through since that view was published, queued as if
        admitted; None: the request goes to the engine, which decides (`admission`). The engine decides an
        iteration later (the request has waited the rest of this one) against that work and what it admitted
        meanwhile: a longer predicted TTFT, so a request refused here is one it would refuse too, unless one let
        through before it is refused there (a longer prompt, or one that had waited longer).
        `forwarding=False`: the caller only asks; a request not refused reaches the engine some other way (and
        asks again there), so it is not yet queued as let through."""
        slo = self._slo_of(request)
        version, view = self.admission_view
        if version != self._forwarded_on:
            self._forwarded_on, self._forwarded = version, []
        decision = self._decide_ls(request, slo, lambda: (*view, *self._forwarded))
        if decision is None:
            return None
        if decision.admitted:
            assert slo is not None
            if forwarding:
                prompt = len(request.prompt_token_ids)
                self._forwarded.append(LSRequestState(slo.tpot_s, request.arrival_s + slo.ttft_s, prompt, prompt))
            return None
        request.slo = slo
        return Rejection(decision.reason, decision.message, decision.retry_after_s, decision)

    def refuses_every_prompt(self, service: str, slo: SLOTarget | None = None) -> bool:
        """Whether `refuse_early` would refuse even the shortest prompt (one token) of this LS service arriving
        now, with `slo` (None: the service's). A longer prompt only lengthens the predicted TTFT and the
        prefill iteration, so then it refuses every prompt: the HTTP layer asks this before it tokenises.
        Records nothing; False for a service that is not LS (or not hosted)."""
        hosted = self.services.get(service)
        if hosted is None or hosted.service_class != "LS":
            return False
        probe = Request("refusal-probe", service, "LS", [0], SamplingParams(max_tokens=1), slo=slo,
                        arrival_s=self.clock())  # fmt: skip
        return self.refuse_early(probe, forwarding=False) is not None

    def note_refused_early(self, request: Request) -> None:
        """On the engine thread: an LS arrival `refuse_early` refused joins the arrivals the planner counts."""
        self._ls_arrivals.append((request.arrival_s, len(request.prompt_token_ids)))

    def _forget_admitted_before(self, since_s: float) -> None:
        while self._ls_admitted_s and self._ls_admitted_s[0] < since_s:
            self._ls_admitted_s.popleft()

    def admitted_ls_rps(self) -> float:
        """LS requests admitted per second over the last `ADMITTED_RATE_WINDOW_S` (by arrival time), or since
        the first was admitted when that is more recent."""
        now = self.clock()
        self._forget_admitted_before(now - ADMITTED_RATE_WINDOW_S)
        if self._first_ls_admitted_s is None:
            return 0.0
        span = min(ADMITTED_RATE_WINDOW_S, max(1.0, now - self._first_ls_admitted_s))  # ≥ 1 s: no spike at the start
        return len(self._ls_admitted_s) / span

    def _queues_for_batching(self, request: Request) -> bool:
        """Host-path requests (and BE under hybrid placement) wait in `host_kv_waiting` until `_admit_be`
        lets them into batching: a few at a time, so that host KV is taken only by requests about to prefill."""
        return self._placed_by_hybrid(request) or (not self.hybrid and self.policy.on_host_path(request.service_class))

    def add(self, request: Request) -> None:
        """Hold an admitted request: host-path requests queue for host KV, the rest go to batching."""
        if not self.hybrid and self.policy.on_host_path(request.service_class):
            request.placement = "host"
        if not request.is_ls:
            self._be_lengths_seen.append((len(request.prompt_token_ids), request.params.max_tokens))
        if self._queues_for_batching(request):
            waiting = self.host_kv_waiting
            if request.is_ls:  # (neo) LS queues ahead of every BE request: BE never holds LS back
                position = next((i for i, r in enumerate(waiting) if not r.is_ls), len(waiting))
                waiting.insert(position, request)
            else:
                waiting.append(request)
            self._admit_be()
        else:
            self.scheduler.add(request)

    def _admit_be(self) -> None:
        """Move queued requests to batching, in arrival order, while they can be served soon.

        Host KV is not reserved here (a request waiting for its GPU prefill holds none): only as many enter
        batching as two token budgets can prefill, and, for requests that decode on the host path, only while
        host KV and slots cover every host-path request already in batching at its full length (prompt +
        max_tokens): their blocks are taken as their prefill fills them (`_reserve_host_kv`), so the
        reservation that completes at the end of prefill never fails."""
        host = self.host_kv
        if host is None:
            return
        queued_prompt = sum(len(r.prompt_token_ids) for r in self.scheduler.waiting if not r.is_ls)
        promised, holders = self._host_kv_promised()
        while self.host_kv_waiting:
            request = self.host_kv_waiting[0]
            if self.be_host_only and not request.is_ls and not request.num_computed_tokens:
                request.placement = "host"  # prefilled into host KV, as under `piggyback`
            if queued_prompt >= 2 * self.scheduler.max_num_batched_tokens and not request.is_ls:
                break
            if request.placement == "host":
                need = request.max_num_tokens
                blocks = host.allocator.blocks_for_tokens(need)
                if promised + blocks > host.allocator.num_free or holders >= len(host.free_slots):
                    break
                promised += blocks
                holders += 1
            queued_prompt += len(request.prompt_token_ids) if not request.is_ls else 0
            self.scheduler.add(self.host_kv_waiting.popleft())

    def _host_kv_promised(self) -> tuple[int, int]:
        """Host KV blocks (and slots) that host-path requests in batching will still take: full length less
        what they hold."""
        host = self.host_kv
        assert host is not None
        blocks = slots = 0
        for r in (*self.scheduler.running, *self.scheduler.waiting):
            if r.placement == "host":
                full = host.allocator.blocks_for_tokens(r.max_num_tokens)
                held = host.blocks_of(r.request_id)
                blocks += max(0, full - len(held))
                slots += r.request_id not in host.slot_of
        return blocks, slots

    def _reserve_host_kv(self, plan: IterationPlan) -> None:
        """Host-path prefill chunks take host KV block by block as they fill it (the CPU path writes each
        chunk's KV there); the chunk that ends the prompt reserves the rest of the request's length, so decode
        never runs out. `_admit_be` promised these blocks, so they are free."""
        host = self.host_kv
        if host is None:
            return
        for chunk in plan.prefills:
            request = chunk.request
            if request.placement != "host":
                continue
            tokens = chunk.start + chunk.num_tokens
            if chunk.samples:
                tokens = request.max_num_tokens
            if request.request_id not in host.slot_of:
                if not host.reserve(request.request_id, tokens):
                    raise RuntimeError(f"host KV promised to {request.request_id} is not free")
            else:
                host.allocator.ensure(request.request_id, tokens)

    # --- one iteration -------------------------------------------------------------------------------
    def schedule(self, be_rows_ready: int = 0, host_rows_idle: Sequence[Request] = ()) -> IterationPlan:
        """Plan one iteration; `be_rows_ready` is what the CPU path could merge now (entering or with a
        CPU result back), the demand the SLO controller sizes the BE share against; `host_rows_idle`: the
        host-resident BE requests between tokens (no CPU task in flight), which hybrid placement may move back
        to HBM."""
        if self.hybrid:
            self._choose_be_mode()
        self._admit_be()
        to_host: list[Request] = []
        if self.hybrid:
            to_host = self._plan_to_host()
        limit = decode_limit = None
        budget = None
        splits = self._cpu_rows_ride(be_rows_ready)
        if self.slo is not None:
            def limit(ls_plan: IterationPlan) -> int:
                return self._be_allowance(ls_plan, be_rows_ready, splits)

            def decode_limit(ls_plan: IterationPlan) -> int:
                return self._be_gpu_decode_rows(ls_plan)

            if self.slo_budget:
                budget = self._slo_token_budget()
        else:
            self.last_allowance = None
        plan = self.scheduler.schedule(be_prefill_limit=limit, token_budget=budget, be_decode_limit=decode_limit)
        plan.be_to_host = to_host
        if self.hybrid:
            plan.be_to_gpu = self._plan_to_gpu(host_rows_idle)
        self._reserve_host_kv(plan)
        if self.slo is not None and self.slo.latency_model.sub_batches_of(
                plan.num_tokens, bool(plan.prefills), 2 if splits else 1) == 2:  # fmt: skip
            plan.split_at = plan.num_tokens // 2
        plan.be_rows_per_layer = (self.last_allowance.be_rows_per_layer if self.last_allowance is not None
                                  else self.static_rows_per_layer)  # fmt: skip
        self.stats.planned(plan.num_tokens, plan.preempted,
                           plan.be_rows_per_layer if self.last_allowance is not None else None)  # fmt: skip
        if self._trace is not None:
            self._planned_s, self._be_rows_ready = self.clock(), be_rows_ready
        return plan

    def _cpu_rows_ride(self, be_rows_ready: int) -> bool:
        """Whether this iteration runs as two sub-batches if it prefills (and the split is cheap: the latency
        model's `sub_batches_of`): sub_batches is 2 where BE decodes all run on the CPU path (`piggyback`, or
        `hybrid` with its placement off), CPU-path rows ride (some can merge now, or some hold host KV) and the
        CPU path is behind (`host_path_keeps_pace`: more rows than one merge window per layer carries). A split
        costs a second pass over the weights and pays where a backlog of CPU rows fills the second window
        (`piggyback` on 70B-H100x4 at a 2048-token budget, DailyMail-like BE: 1.7x BE tokens). Under hybrid
        placement it lost, even split only while no BE request decoded in HBM: it slows the HBM-resident decodes
        and shrinks the SLO-sized budget for a few more CPU rows (HBM for 80K tokens of KV, 34B-A100x2: 210 ->
        195 BE tok/s, 205 with that restriction), so hybrid placement splits only in host-only mode
        (scheduler/be_mode.py) once no BE request decodes in HBM. A decode-only iteration is never split (its Dense
        work reads weights, and it replays CUDA graphs)."""
        if self.sub_batches < 2 or self.host_path_keeps_pace():
            return False
        if self.hybrid and (not self.be_host_only or self._gpu_be_decoders()):
            return False
        return be_rows_ready > 0 or (self.host_kv is not None and bool(self.host_kv.slot_of))

    def _be_allowance(self, ls_plan: IterationPlan, be_rows_ready: int, splits: bool = False) -> int:
        """SLO control: given the work planned (LS, and BE decodes on the accelerator), how many BE prefill
        tokens and BE rows per layer fit."""
        assert self.slo is not None
        be_waiting = [r for r in (*self.scheduler.running, *self.scheduler.waiting) if not r.is_ls and not r.in_decode]
        demand = IterationDemand(
            ls_decode_rows=len(ls_plan.decodes),
            ls_decode_attention_load=float(sum(c.start + 1 for c in ls_plan.decodes)),
            ls_decode_longest_context=max((c.start + 1 for c in ls_plan.decodes), default=0),
            ls_prefill_chunks=[PrefillChunk(c.num_tokens, prefill_chunk_load(c.start, c.num_tokens))
                               for c in ls_plan.prefills],
            be_prefill_tokens_available=min(ls_plan.token_budget - ls_plan.num_tokens,
                                            sum(r.num_remaining_tokens for r in be_waiting)),
            be_prefill_context_start=be_waiting[0].num_computed_tokens if be_waiting else 0,
            be_decode_rows_ready=be_rows_ready,
            token_budget=ls_plan.token_budget,
            sub_batches=2 if splits else 1,
        )  # fmt: skip
        self.last_allowance = self.slo.choose(demand, self.ls_state(), self.clock())
        tokens = self.last_allowance.be_prefill_tokens
        if (self.hybrid and not self.be_host_only and self._hbm_decode_room_full()
                and not self.host_path_keeps_pace()):  # fmt: skip
            # Prompts prefilled now will decode on a host path already behind, whose rows advance a few layers
            # per pass and pay back over minutes; the accelerator's own BE decodes would lose that time now.
            # While the host keeps pace its rows are worth as much as HBM-resident ones: the budget feeds both.
            tokens = min(tokens, max(1, int(HOST_FEED_SHARE * ls_plan.token_budget)))
        return tokens

    def host_path_keeps_pace(self) -> bool:
        """Whether the CPU-path BE rows (holding host or remote-node KV) are few enough for the CPU path to carry
        them at about a token an iteration: at most HOST_PACE_FACTOR × the host tokens an iteration produced
        lately, plus HOST_PACE_MIN_ROWS (so that the first rows can start and show the pace)."""
        host = self.host_kv
        if host is None:
            return False
        # The tokens counted are every CPU-path row's, so the rows are too: a remote node's rows hold no host KV
        # in the simulator, and in the runtime they are staged there as well (a set, so none counts twice).
        rows = set(host.slot_of) | (set(self.remote_tier.held) if self.remote_tier is not None else set())
        return len(rows) <= HOST_PACE_FACTOR * self.host_tokens_per_iteration + HOST_PACE_MIN_ROWS

    def _hbm_decode_room_full(self) -> bool:
        """Whether HBM-resident BE decodes fill their share (a BE prompt finishing now would go to the host)."""
        _, decode_limit = self._be_hbm_split()
        prefilling = [r for r in (*self.scheduler.running, *self.scheduler.waiting)
                      if not r.is_ls and not r.output_token_ids]  # fmt: skip
        next_blocks = self._projected_blocks(prefilling[0]) if prefilling else 0
        return sum(self._projected_blocks(r) for r in self._gpu_be_decoders()) + next_blocks > decode_limit

    # --- the token budget and BE decodes on the accelerator (SLO control) -----------------------------------
    def _tpot_limit_s(self) -> float:
        """The tightest TPOT SLO among decoding LS requests, less the safety margin; inf when none decodes."""
        tpot = min((s.tpot_s for s in self.ls_state() if s.decoding), default=math.inf)
        return tpot * (1 - self.config.slo_control.safety_margin)

    def _slo_token_budget(self) -> int:
        """The SLO-sized token budget: the LS decode rows plus the most prefill tokens whose predicted iteration
        keeps the tightest decoding LS request's TPOT, less the margin; at most engine.max_num_batched_tokens,
        never below engine.min_num_batched_tokens nor the LS decode rows. The prefill tokens are costed where
        batching will put them: the LS prompts' next chunks in the order it takes them, each from its own
        position (a late chunk of a long prompt attends to all before it), then a BE chunk from position 0
        (whose real load `SLOController.choose` fits the BE share to). Admission predicts with this same
        budget (`SLOController.predict_ls_arrival`), so an admitted LS request meets the TTFT it was promised."""
        slo = self.slo
        assert slo is not None
        engine = self.config.engine
        upper = engine.max_num_batched_tokens
        limit = self._tpot_limit_s()
        if limit == math.inf:
            return upper
        decoding = [r for r in self.scheduler.running if r.is_ls and r.in_decode]
        rows = len(decoding)
        contexts = [r.num_tokens for r in decoding]
        decode_load = slo.latency_model.decode_load(rows, float(sum(contexts)), max(contexts, default=0))
        floor = max(rows, engine.min_num_batched_tokens or 1)
        # (position, tokens left) of each LS prefill, running ones first (batching's order).
        queue = [(r.num_computed_tokens, r.num_remaining_tokens) for r in self.scheduler.running
                 if r.is_ls and not r.in_decode]  # fmt: skip
        queue += [(r.num_computed_tokens, r.num_remaining_tokens) for r in self.scheduler.waiting if r.is_ls]

        def chunk_load(tokens: int) -> float:
            load = 0.0
            for start, left in queue:
                if tokens <= 0:
                    break
                take = min(tokens, left)
                load += prefill_chunk_load(start, take)
                tokens -= take
            return load + (prefill_chunk_load(0, tokens) if tokens > 0 else 0.0)

        chunk = slo.largest_ls_chunk(rows, decode_load, limit, upper - rows, chunk_load)
        # Kept at the floor: below it the iteration is over the TPOT anyway (the LS decodes must run).
        return min(upper, max(floor, rows + chunk))

    def _be_gpu_decode_rows(self, ls_plan: IterationPlan) -> int:
        """How many BE decodes on the accelerator fit next to the LS work planned (their rows and their
        attention) within the tightest TPOT, less the margin: all of them when no LS request decodes."""
        assert self.slo is not None
        candidates = [r for r in self.scheduler.running if not r.is_ls and r.in_decode]
        if not candidates:
            return 0
        limit = self._tpot_limit_s()
        if limit == math.inf:
            return len(candidates)
        ls_rows = ls_plan.num_tokens
        contexts = [c.start + 1 for c in ls_plan.decodes]
        prefill_load = sum(prefill_chunk_load(c.start, c.num_tokens) for c in ls_plan.prefills)
        logits = len(ls_plan.decodes) + len(ls_plan.prefills)
        mean_be = sum(r.num_tokens for r in candidates) / len(candidates)
        longest = max([*contexts, *(r.num_tokens for r in candidates)])
        model = self.slo.latency_model

        def fits(rows: int) -> bool:
            load = model.decode_load(len(contexts) + rows, sum(contexts) + rows * mean_be, longest)
            return self.slo.predict_parts(ls_rows + rows, prefill_load, load, logits + rows) <= limit  # type: ignore[union-attr]

        return largest_fitting(fits, len(candidates))

    # --- hybrid placement: BE KV in spare HBM, host beyond ------------------------------------------------------
    def ls_arrival_rate(self) -> float:
        """LS requests per second over the recent arrivals the planner saw (0 before two)."""
        arrivals = self._ls_arrivals
        if len(arrivals) < 2:
            return 0.0
        span = max(self.clock(), arrivals[-1][0]) - arrivals[0][0]
        return (len(arrivals) - 1) / span if span > 0 else 0.0

    def _choose_be_mode(self) -> None:
        """Every MODE_PERIOD_S: host-only or HBM-first (scheduler/be_mode.py), once MODE_MIN_BE_REQUESTS BE
        prompts were seen. Remote nodes keep HBM-first: a row reaches a node only through a move out of HBM
        (`_reserve_cpu_tier`), and the rule weighs this host's DRAM alone."""
        now = self.clock()
        if now < self._be_mode_due_s or self.host_capacity is None or self.remote_tier is not None:
            return
        self._be_mode_due_s = now + MODE_PERIOD_S
        if len(self._be_lengths_seen) < MODE_MIN_BE_REQUESTS or self.slo is None:
            return
        prompt, output = self._be_lengths()
        be_tokens, seconds = self._be_work
        self._be_work = (0.0, 0.0)  # each pick measures the period since the last
        measured = be_decode_supply_tokens_s(be_tokens, seconds, prompt, output)
        if measured <= 0:
            return
        weight = 1.0 if self.last_be_supply_tokens_s <= 0 else 1 - math.exp(-MODE_PERIOD_S / SUPPLY_SMOOTHING_S)
        supply = self.last_be_supply_tokens_s + weight * (measured - self.last_be_supply_tokens_s)
        host = self.host_capacity.decode_tokens_s(prompt + output / 2)
        self.last_be_supply_tokens_s, self.last_host_decode_tokens_s = supply, host
        host_only = host_only_mode(host, supply, self.be_host_only)
        if host_only != self.be_host_only:
            self.be_host_only = host_only
            self.be_mode_switches += 1

    def _be_lengths(self) -> tuple[float, float]:
        """Mean prompt tokens and max_tokens of recent BE requests. max_tokens bounds an output from above (the
        finished ones' outputs would be biased short: short requests finish first): it errs toward HBM-first,
        whose decodes never wait for the host."""
        prompts, outputs = zip(*self._be_lengths_seen, strict=True)
        return sum(prompts) / len(prompts), sum(outputs) / len(outputs)

    def hbm_reserve_blocks(self) -> int:
        """The accelerator KV blocks hybrid placement keeps free for LS: the LS KV forecast within
        engine.hbm_reserve_horizon_s (arrival rate × horizon × mean LS prompt + output tokens), plus what
        held LS requests will still grow to (queued prompts, outputs up to the mean), at least
        engine.hbm_reserve_min_tokens."""
        engine = self.config.engine
        prompts = [p for _, p in self._ls_arrivals]
        mean_prompt = sum(prompts) / len(prompts) if prompts else 0.0
        outputs = [o for _, o in self._finished_ls_lengths]
        held_ls = [r for r in (*self.scheduler.running, *self.scheduler.waiting) if r.is_ls]
        mean_output = (sum(outputs) / len(outputs) if outputs else
                       sum(r.params.max_tokens for r in held_ls) / len(held_ls) if held_ls else 0.0)  # fmt: skip
        forecast = self.ls_arrival_rate() * engine.hbm_reserve_horizon_s * (mean_prompt + mean_output)
        growth = 0.0
        for r in held_ls:
            held = len(self.allocator.blocks_of(r.request_id)) * engine.block_size
            expected = len(r.prompt_token_ids) + max(len(r.output_token_ids) + 1, min(mean_output, r.params.max_tokens))
            growth += max(0.0, expected - held)
        tokens = max(forecast + growth, float(engine.hbm_reserve_min_tokens))
        self.last_hbm_reserve_blocks = self.allocator.blocks_for_tokens(math.ceil(tokens))
        return self.last_hbm_reserve_blocks

    def _be_hbm_split(self) -> tuple[int, int]:
        """(blocks BE may hold in HBM now, of which BE decodes may hold): free HBM less the LS reserve, and
        that less the room of the BE prompts batching holds (so prefill keeps flowing)."""
        ls_held = sum(len(self.allocator.blocks_of(r.request_id))
                      for r in (*self.scheduler.running, *self.scheduler.waiting) if r.is_ls)  # fmt: skip
        not_ls = max(0, self.allocator.num_blocks - ls_held)
        prefill_tokens = sum(len(r.prompt_token_ids) for r in (*self.scheduler.running, *self.scheduler.waiting)
                             if not r.is_ls and not r.output_token_ids)  # fmt: skip
        prefill_room = self.allocator.blocks_for_tokens(prefill_tokens + self.scheduler.max_num_batched_tokens)
        # The reserve binds BE decodes, never the BE prefill in progress: a forecast can exceed the whole cache
        # (a burst's arrival rate over the horizon), and BE prefill KV stays only until the next plan moves it to
        # host; LS that does come preempts BE, as under `priority`.
        in_prefill = sum(r.num_computed_tokens for r in self.scheduler.running
                         if not r.is_ls and not r.output_token_ids)  # fmt: skip
        prefill_floor = self.allocator.blocks_for_tokens(in_prefill + self.scheduler.max_num_batched_tokens)
        be_limit = min(not_ls, max(not_ls - self.hbm_reserve_blocks(), prefill_floor))
        return be_limit, max(0, be_limit - prefill_room)

    def _projected_blocks(self, request: Request) -> int:
        return self.allocator.blocks_for_tokens(request.max_num_tokens)

    def _gpu_be_decoders(self) -> list[Request]:
        return [r for r in self.scheduler.running
                if not r.is_ls and r.output_token_ids and r not in self._to_host_next]  # fmt: skip

    def _plan_to_host(self) -> list[Request]:
        """The BE requests this plan moves to host KV: those whose prefill ended without HBM to decode in,
        then, while BE decodes' HBM (at full length, with a block of growth each) exceeds the BE share,
        HBM-resident ones in the policy's order. Each gets its host KV at full length now; one that finds
        none stays (and may be preempted by LS later, as under `priority`)."""
        host = self.host_kv
        assert host is not None
        be_limit, decode_limit = self._be_hbm_split()
        self.scheduler.be_kv_block_limit = be_limit
        decoders = self._gpu_be_decoders()  # without those already moving
        moving = list(self._to_host_next)
        self._to_host_next.clear()
        held = sum(self._projected_blocks(r) for r in decoders)
        if self.be_host_only:  # every BE decode belongs on the host path: those in HBM move there between tokens
            decode_limit = 0
        for request in self.policy.choose_to_host(decoders):
            if held <= decode_limit:
                break
            if request.num_remaining_tokens != 1:
                continue
            if self._reserve_for_host(request):
                moving.append(request)
                held -= self._projected_blocks(request)
        for request in moving:
            self.scheduler.running.remove(request)  # not in this plan; its blocks are freed once it ran
        self.moves_to_host += len(moving)
        return moving

    def order_to_host(self, request: Request) -> bool:
        """Move a BE request that decodes in HBM to host KV with the next plan (its host KV reserved now, at full
        length); False, nothing taken, when it does not decode in HBM or host KV is full. For a caller that
        orders a move itself (tests of the runtime's moves); the planner's own placement decides the same way."""
        if (not self.hybrid or request.is_ls or request.placement != "gpu" or request in self._to_host_next
                or request not in self.scheduler.running or not request.output_token_ids
                or request.num_remaining_tokens != 1):  # fmt: skip
            return False
        if not self._reserve_for_host(request):
            return False
        self._to_host_next.append(request)
        return True

    def _reserve_for_host(self, request: Request) -> bool:
        host = self.host_kv
        assert host is not None
        if request.request_id in host.slot_of:
            return True
        if self.remote_tier is not None:
            return self._reserve_cpu_tier(request)
        return host.reserve(request.request_id, request.max_num_tokens)

    def _reserve_cpu_tier(self, request: Request) -> bool:
        """Hybrid placement with remote nodes: the request's KV goes to the host or to a node, whichever its row
        decodes fastest on (`RemoteTier.choose`), at full length; a row on a node takes no host KV (unless the
        runtime stages remote KV on the host). False, nothing taken, when no tier can hold it."""
        tier, host = self.remote_tier, self.host_kv
        assert tier is not None and host is not None
        rid = request.request_id
        if tier.node_of(rid) is not None:
            return True
        tokens = request.max_num_tokens
        host_fits = bool(host.free_slots) and host.allocator.can_hold(rid, tokens)
        if tier.host_stages_remote_kv and not host_fits:
            return False
        staged = list(tier.held) if tier.host_stages_remote_kv else []  # host KV that is a node's rows' staging
        host_rows = len(host.slot_of) - len(staged)
        host_tokens = (host.allocator.num_blocks - host.allocator.num_free
                       - sum(len(host.blocks_of(r)) for r in staged)) * host.block_size  # fmt: skip
        try:
            node = tier.choose(tokens, host_rows, host_tokens, host_fits)
        except LookupError:
            return False
        if node is not None and tier.host_stages_remote_kv and not host.reserve(rid, tokens):
            return False
        if node is None:
            return host.reserve(rid, tokens)
        tier.reserve(rid, node, tokens)
        return True

    def release_remote_kv(self, request: Request) -> None:
        """The request's KV on a remote node is gone (the node was lost, the request goes back to prefill): its
        reservation there is free; the next placement decides afresh."""
        if self.remote_tier is not None:
            self.remote_tier.release(request.request_id)

    def _plan_to_gpu(self, host_rows_idle: Sequence[Request]) -> list[Request]:
        """Host-resident BE requests moved back into HBM while the BE decodes' share has room for them at full
        length (oldest first: each is then certain to finish where it is). They join batching after this
        plan, so the copy runs during the iteration; the caller frees their host KV once copied."""
        if self.remote_tier is not None:  # a node's rows stay there: their KV is not on this host to copy
            host_rows_idle = [r for r in host_rows_idle if self.remote_tier.node_of(r.request_id) is None]
        if not host_rows_idle or self.be_host_only:
            return []
        _, decode_limit = self._be_hbm_split()
        held = sum(self._projected_blocks(r) for r in self._gpu_be_decoders())
        moving: list[Request] = []
        for request in sorted(host_rows_idle, key=lambda r: r.arrival_s):
            need = self._projected_blocks(request)
            if held + need > decode_limit or not self.allocator.can_hold(request.request_id, request.num_tokens):
                break
            self.allocator.ensure(request.request_id, request.num_tokens)
            request.num_computed_tokens = request.num_tokens - 1
            request.placement = "gpu"
            request.status = RequestStatus.RUNNING
            self.scheduler.running.append(request)
            held += need
            moving.append(request)
        self.moves_to_gpu += len(moving)
        return moving

    def _place_after_prefill(self, request: Request) -> None:
        """Hybrid placement at the end of a BE prefill: decode in HBM while the BE decodes' share holds it at
        full length, else move it to host KV with the next plan (copied there, never recomputed). In host-only mode
        it moves to the host whenever host KV holds it."""
        _, decode_limit = self._be_hbm_split()
        held = sum(self._projected_blocks(r) for r in self._gpu_be_decoders() if r is not request)
        beyond = self.be_host_only or held + self._projected_blocks(request) > decode_limit
        if beyond and self._reserve_for_host(request):
            self._to_host_next.append(request)

    def update(self, plan: IterationPlan, outputs: IterationOutputs, now: float) -> list[TokenEvent]:
        """The plan ran and produced `outputs`; its tokens left at `now`. Does all the planner's bookkeeping
        after an iteration, in this order:

        - the plan's tokens are in the KV cache (computed tokens advance);
        - each sampled token joins its request (first/last token times, `append_token`); a request that is
          done is dropped (accelerator KV freed; an LS one joins the mix headroom is computed for); a host-path
          request that sampled its first token leaves batching for the CPU path;
        - the iteration's duration (start to now, bookkeeping included) feeds the SLO controller's closed loop
          (measured against its prediction for the shape that ran), and the stats recorder.

        Returns a `TokenEvent` per token (the plan's, then the host-path rows'): what the caller still does
        (text, metrics, its CPU path: start decoding, release host KV, send a row round again)."""
        sampling = sampling_requests(plan)
        if len(sampling) != len(outputs.plan_token_ids):
            raise ValueError(f"the plan samples {len(sampling)} requests but the outputs hold "
                             f"{len(outputs.plan_token_ids)} plan tokens")  # fmt: skip
        self._advance(plan)
        self.settle_moves(plan, outputs.failed_moves)
        events: list[TokenEvent] = []
        for request, token in zip(sampling, outputs.plan_token_ids, strict=True):
            event = self._take_token(request, token, now, from_host_path=False)
            if event.finish_reason is None and self.on_host_path(request):
                self._leave_for_host_path(request)
                event = TokenEvent(request, token, event.first, event.previous_token_s, None,
                                   left_for_host_path=True)  # fmt: skip
            elif event.finish_reason is None and event.first and self._placed_by_hybrid(request):
                self._place_after_prefill(request)
            events.append(event)
        for request, token in outputs.host_path_tokens:
            events.append(self._take_token(request, token, now, from_host_path=True))
        self.host_tokens_per_iteration += HOST_TOKENS_EWMA_ALPHA * (len(outputs.host_path_tokens)
                                                                    - self.host_tokens_per_iteration)  # fmt: skip
        measured_s = self.clock() - outputs.started_s
        if self.host_capacity is not None:  # the BE work `_choose_be_mode` measures the supply from
            be_tokens = sum(c.num_tokens for c in plan.chunks if not c.request.is_ls)
            work, seconds = self._be_work
            self._be_work = (work + be_tokens + outputs.be_rows_merged / outputs.num_layers, seconds + measured_s)
        predicted_s = None
        if self.slo is not None:  # the closed loop: the controller learns the device's truth
            shape = iteration_shape(plan, outputs.be_rows_merged / outputs.num_layers, len(events),
                                    self.slo.latency_model)  # fmt: skip
            predicted_s = self.slo.observe(shape, measured_s)
            if self._trace is not None:
                self._write_trace(plan, outputs, shape, now, measured_s, predicted_s)
        self.stats.ran(now, now - outputs.started_s, measured_s, predicted_s, events, outputs.be_rows_merged)
        return events

    def _write_trace(self, plan: IterationPlan, outputs: IterationOutputs, shape: IterationShape, now: float,
                     measured_s: float, predicted_s: float) -> None:  # fmt: skip
        assert self._trace is not None and self.slo is not None
        allowance = self.last_allowance
        self._trace.write(json.dumps({
            "t": now, "measured_s": measured_s, "predicted_s": predicted_s,
            "raw_s": self.slo.latency_model.predict(shape),
            "plan_s": self._planned_s - outputs.started_s, "run_s": now - self._planned_s,
            "regime": regime_of(shape.prefill_attention_load, shape.be_rows_per_layer, shape.decode_attention_load),
            "ls_prefill_tokens": sum(c.num_tokens for c in plan.prefills if c.request.is_ls),
            "be_prefill_tokens": sum(c.num_tokens for c in plan.prefills if not c.request.is_ls),
            "ls_decode_rows": sum(c.request.is_ls for c in plan.decodes),
            "be_decode_rows": sum(not c.request.is_ls for c in plan.decodes),
            "be_rows_merged": outputs.be_rows_merged, "be_rows_allowed": plan.be_rows_per_layer,
            "be_rows_ready": self._be_rows_ready, "logit_rows": shape.logit_rows, "dense_rows": shape.dense_rows,
            "prefill_load": shape.prefill_attention_load, "decode_load": shape.decode_attention_load,
            "allowance_predicted_s": allowance.predicted_latency_s if allowance is not None else None,
        }) + "\n")  # fmt: skip

    def settle_moves(self, plan: IterationPlan, failed: Sequence[Request] = ()) -> None:
        """The plan's moves to host KV are done (`update` calls it; a caller that ran a plan with moves and
        no chunks calls it alone): their accelerator blocks are free, and they decode on the CPU path. A move
        the caller reports in `failed` did not happen: the request stays where it was, and what the plan took
        for it on the other side (host KV, or accelerator blocks and a place in batching) is given back."""
        failed_ids = {r.request_id for r in failed}
        for request in plan.be_to_host:
            if request.request_id in failed_ids:
                self.moves_to_host -= 1
                if self.host_kv is not None:
                    self.host_kv.free(request.request_id)
                self.release_remote_kv(request)
                if request.status != RequestStatus.FINISHED:
                    self.scheduler.running.append(request)  # decodes on the accelerator again next plan
                continue
            self.allocator.free(request.request_id)
            request.placement = "host"
            request.num_computed_tokens = request.num_tokens - 1
        for request in plan.be_to_gpu:
            if request.request_id in failed_ids:
                self.moves_to_gpu -= 1
                if request in self.scheduler.running:
                    self.scheduler.running.remove(request)
                self.allocator.free(request.request_id)
                request.placement = "host"  # its row goes on on the CPU path

    def _advance(self, plan: IterationPlan) -> None:
        """The plan's tokens are in the KV cache."""
        for chunk in plan.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens

    def _take_token(self, request: Request, token: int, now: float, from_host_path: bool) -> TokenEvent:
        first, previous_s = request.first_token_s is None, request.last_token_s
        if first:
            request.first_token_s = now
        request.last_token_s = now
        reason = self.append_token(request, token)
        if reason is not None:
            self.finish(request, reason)
            if request.is_ls and reason in (FINISH_STOP, FINISH_LENGTH):
                self.record_finished_ls(len(request.prompt_token_ids), len(request.output_token_ids))
        return TokenEvent(request, token, first, previous_s, reason, from_host_path=from_host_path)

    def _leave_for_host_path(self, request: Request) -> None:
        """A host-path request sampled its first token: it leaves batching and frees its accelerator KV.

        Its next token is computed on the CPU path, which counts it as computed from here on."""
        self.scheduler.remove(request)
        request.num_computed_tokens = request.num_tokens - 1

    def finish(self, request: Request, reason: str) -> None:
        """The request is done (finished, aborted or failed): drop it and free its accelerator KV. Host KV
        it holds is freed by the CPU path, which may still have a task of it in flight."""
        self.scheduler.remove(request)
        if request in self.host_kv_waiting:
            self.host_kv_waiting.remove(request)
        if request in self._to_host_next:  # its host KV was reserved for a move that will not happen
            self._to_host_next.remove(request)
            if self.host_kv is not None:
                self.host_kv.free(request.request_id)
        self.release_remote_kv(request)  # the node's KV of it is freed by the CPU path, as host KV is
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.host_kv_waiting)

    # --- the LS picture, for control and capacity ----------------------------------------------------
    def ls_state(self) -> list[LSRequestState]:
        """The LS requests batching holds, in arrival order, as the SLO controller sees them."""
        held = self._held_ls()
        return [
            LSRequestState(
                tpot_s=r.slo.tpot_s,  # type: ignore[union-attr]
                ttft_deadline_s=r.arrival_s + r.slo.ttft_s if r.first_token_s is None else None,  # type: ignore[union-attr]
                remaining_prefill_tokens=0 if r.output_token_ids else r.num_remaining_tokens,
                context_len=r.num_tokens,
            )
            for r in held
        ]

    def record_finished_ls(self, prompt_tokens: int, output_tokens: int) -> None:
        """An LS request completed: its lengths join the mix headroom is computed for."""
        self._finished_ls_lengths.append((prompt_tokens, output_tokens))
        if self.slo is not None:  # how long a queued LS request will decode: admission's prediction needs it
            self.slo.ls_output_tokens = sum(o for _, o in self._finished_ls_lengths) / len(self._finished_ls_lengths)

    def headroom_rps(self) -> float | None:
        """Extra LS request rate that fits at the current mix, on top of the rate admitted lately
        (`SLOController.headroom_rps`); None until LS requests were seen."""
        assert self.slo is not None
        slos = [s.slo for s in self.config.services if s.slo is not None]
        if not self._finished_ls_lengths or not slos:
            return None
        prompts, outputs = zip(*self._finished_ls_lengths, strict=True)
        mix = LSMix(sum(prompts) / len(prompts), sum(outputs) / len(outputs),
                    min(s.tpot_s for s in slos), min(s.ttft_s for s in slos))  # fmt: skip
        return self.slo.headroom_rps(self.ls_state(), mix, self.clock(), self.admitted_ls_rps())
