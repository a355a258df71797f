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

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.kv.allocator import BlockAllocator
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.request import FINISH_LENGTH, FINISH_STOP, Request, RequestStatus, SLOTarget
from piggyback_runtime.scheduler.batching import BatchScheduler, IterationPlan
from piggyback_runtime.scheduler.latency_model import IterationShape, LatencyModel, prefill_chunk_load
from piggyback_runtime.scheduler.outputs import (
    IterationOutputs,
    TokenEvent,
    append_until_max_tokens,
    sampling_requests,
)
from piggyback_runtime.scheduler.policies import Policy, make_policy
from piggyback_runtime.scheduler.slo_control import (
    AdmissionDecision,
    BEAllowance,
    IterationDemand,
    LSMix,
    LSRequestState,
    NewLSRequest,
    PrefillChunk,
    SLOController,
)
from piggyback_runtime.scheduler.stats import StatsRecorder

REASON_BE_QUEUE_FULL = "BEQueueFull"


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
    ) -> None:
        """`latency_model`: the model itself, or a function that makes it (profiling is only paid for when
        the policy is SLO-controlled). `host_kv` is required when the policy uses the host path.
        `append_token(request, token)` adds a sampled token to a request and returns its finish reason when
        it is done (the engine detokenises and checks stop strings; the default ends at max_tokens)."""
        engine = config.engine
        self.config = config
        self.clock = clock
        self.append_token = append_token
        self.stats = stats or StatsRecorder()
        self.policy: Policy = make_policy(engine.policy, engine.headroom_be_kv_share,
                                          config.piggyback.max_be_requests)  # fmt: skip
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
            )
        self.static_rows_per_layer = self.policy.rows_per_layer(config.piggyback.max_be_rows_per_layer)
        self.last_allowance: BEAllowance | None = None
        self._finished_ls_lengths: deque[tuple[int, int]] = deque(maxlen=200)

    # --- requests in ---------------------------------------------------------------------------------
    def on_host_path(self, request: Request) -> bool:
        """Whether the request decodes with its KV in host DRAM and its attention on the CPU."""
        return self.policy.on_host_path(request.service_class)

    def admission(self, request: Request) -> Rejection | None:
        """Decide on a new request (its service's SLO is filled in if it brings none); None: admitted."""
        service = self.services[request.service]
        if request.slo is None and service.slo is not None:
            request.slo = SLOTarget(service.slo.ttft_s, service.slo.tpot_s)
        if self.slo is not None and request.is_ls and request.slo is not None and self.config.slo_control.admission:
            decision = self.slo.admit_ls(
                NewLSRequest(len(request.prompt_token_ids), request.slo.ttft_s, request.slo.tpot_s, request.arrival_s),
                self.ls_state(), IterationDemand(), self.clock(),
            )  # fmt: skip
            if not decision.admitted:
                return Rejection(decision.reason, decision.message, decision.retry_after_s, decision)
        if self.on_host_path(request) and len(self.host_kv_waiting) >= self.config.slo_control.max_be_queue:
            return Rejection(REASON_BE_QUEUE_FULL, f"{len(self.host_kv_waiting)} requests already wait for host "
                             "KV memory (slo_control.max_be_queue); retry later", 5.0)  # fmt: skip
        return None

    def add(self, request: Request) -> None:
        """Hold an admitted request: host-path requests queue for host KV, the rest go to batching."""
        if self.on_host_path(request):
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
        """Move host-path requests to batching, in arrival order, while host KV and slots last."""
        host = self.host_kv
        while self.host_kv_waiting and host is not None:
            request = self.host_kv_waiting[0]
            if not host.reserve(request.request_id, len(request.prompt_token_ids) + request.params.max_tokens):
                break
            self.scheduler.add(self.host_kv_waiting.popleft())

    # --- one iteration -------------------------------------------------------------------------------
    def schedule(self, be_rows_ready: int = 0) -> IterationPlan:
        """Plan one iteration; `be_rows_ready` is what the CPU path could merge now (entering or with a
        CPU result back), the demand the SLO controller sizes the BE share against."""
        self._admit_be()
        limit = None
        if self.slo is not None:
            def limit(ls_plan: IterationPlan) -> int:
                return self._be_allowance(ls_plan, be_rows_ready)
        else:
            self.last_allowance = None
        plan = self.scheduler.schedule(be_prefill_limit=limit)
        plan.be_rows_per_layer = (self.last_allowance.be_rows_per_layer if self.last_allowance is not None
                                  else self.static_rows_per_layer)  # fmt: skip
        self.stats.planned(plan.num_tokens, plan.preempted,
                           plan.be_rows_per_layer if self.last_allowance is not None else None)  # fmt: skip
        return plan

    def _be_allowance(self, ls_plan: IterationPlan, be_rows_ready: int) -> int:
        """SLO control: given the LS work planned, how many BE prefill tokens and BE rows per layer fit."""
        assert self.slo is not None
        be_waiting = [r for r in (*self.scheduler.running, *self.scheduler.waiting) if not r.is_ls]
        demand = IterationDemand(
            ls_decode_rows=len(ls_plan.decodes),
            ls_decode_attention_load=float(sum(c.start + 1 for c in ls_plan.decodes)),
            ls_decode_longest_context=max((c.start + 1 for c in ls_plan.decodes), default=0),
            ls_prefill_chunks=[PrefillChunk(c.num_tokens, prefill_chunk_load(c.start, c.num_tokens))
                               for c in ls_plan.prefills],
            be_prefill_tokens_available=min(self.scheduler.max_num_batched_tokens - ls_plan.num_tokens,
                                            sum(r.num_remaining_tokens for r in be_waiting)),
            be_prefill_context_start=be_waiting[0].num_computed_tokens if be_waiting else 0,
            be_decode_rows_ready=be_rows_ready,
        )  # fmt: skip
        self.last_allowance = self.slo.choose(demand, self.ls_state(), self.clock())
        return self.last_allowance.be_prefill_tokens

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
        events: list[TokenEvent] = []
        for request, token in zip(sampling, outputs.plan_token_ids, strict=True):
            event = self._take_token(request, token, now, from_host_path=False)
            if event.finish_reason is None and self.on_host_path(request):
                self._leave_for_host_path(request)
                event = TokenEvent(request, token, event.first, event.previous_token_s, None,
                                   left_for_host_path=True)  # fmt: skip
            events.append(event)
        for request, token in outputs.host_path_tokens:
            events.append(self._take_token(request, token, now, from_host_path=True))
        measured_s = self.clock() - outputs.started_s
        predicted_s = None
        if self.slo is not None:  # the closed loop: the controller learns the device's truth
            shape = iteration_shape(plan, outputs.be_rows_merged / outputs.num_layers, len(events),
                                    self.slo.latency_model)  # fmt: skip
            predicted_s = self.slo.observe(shape, measured_s)
        self.stats.ran(now, now - outputs.started_s, measured_s, predicted_s, events, outputs.be_rows_merged)
        return events

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
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.host_kv_waiting)

    # --- the LS picture, for control and capacity ----------------------------------------------------
    def ls_state(self) -> list[LSRequestState]:
        """The LS requests batching holds, in arrival order, as the SLO controller sees them."""
        held = [r for r in (*self.scheduler.running, *self.scheduler.waiting) if r.is_ls and r.slo is not None]
        held.sort(key=lambda r: r.arrival_s)
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

    def headroom_rps(self) -> float | None:
        """Extra LS request rate that fits at the current mix; None until LS requests were seen."""
        assert self.slo is not None
        slos = [s.slo for s in self.config.services if s.slo is not None]
        if not self._finished_ls_lengths or not slos:
            return None
        prompts, outputs = zip(*self._finished_ls_lengths, strict=True)
        mix = LSMix(sum(prompts) / len(prompts), sum(outputs) / len(outputs),
                    min(s.tpot_s for s in slos), min(s.ttft_s for s in slos))  # fmt: skip
        return self.slo.headroom_rps(self.ls_state(), mix, self.clock())
