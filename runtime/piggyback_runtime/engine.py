"""The engine: one iteration = schedule (the planner) → run (the model runner) → update (the planner's
bookkeeping), then tokens out to the clients and the iteration's stats into the metrics.

Single-threaded by design: only the engine thread (server/async_engine.py) calls into it.

Time: the engine reads one clock (`clock`, the wall clock by default) for everything the planner decides by.
A test or a benchmark may give it a virtual clock and a `forward_pass_done(plan)` hook that advances that
clock by what the forward pass "lasted" (e.g. the latency model's prediction): the engine then makes exactly
the decisions the simulator makes for the same timings, whatever the host's load (tests/runtime/
test_fidelity_gate.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable

from piggyback_runtime import distributed
from piggyback_runtime import metrics as m
from piggyback_runtime.attention.paged import kv_cache_dtype
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.kv import sizing
from piggyback_runtime.kv.cache import kv_block_bytes
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.model import activation_peak
from piggyback_runtime.model.loader import LoadedModel, load_model
from piggyback_runtime.model.tokenizer import Tokenizer
from piggyback_runtime.model_runner import ModelRunner
from piggyback_runtime.piggyback.be_path import BERow, PiggybackPath, share_cores_with_cpu_workers
from piggyback_runtime.profiler import load_or_profile
from piggyback_runtime.request import (
    FINISH_ABORT,
    FINISH_ERROR,
    Request,
    RequestOutput,
    SLOTarget,
)
from piggyback_runtime.scheduler.batching import IterationPlan
from piggyback_runtime.scheduler.latency_model import LatencyModel, ModelError
from piggyback_runtime.scheduler.outputs import TokenEvent
from piggyback_runtime.scheduler.planner import Planner
from piggyback_runtime.scheduler.policies import policy_class
from piggyback_runtime.scheduler.stats import IterationStats

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take as sent (HTTP 400); the message says what to change."""


class UnknownServiceError(LookupError):
    """The request names a service this runtime does not host (HTTP 404)."""


class AdmissionRejected(Exception):
    """Rejected at arrival (HTTP 429): admitting it would break an SLO, or the BE queue is full."""

    def __init__(self, message: str, reason: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Engine:
    def __init__(
        self,
        config: RuntimeConfig,
        loaded: LoadedModel | None = None,
        metrics: m.RuntimeMetrics | None = None,
        latency_model: LatencyModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        forward_pass_done: Callable[[IterationPlan], None] | None = None,
    ) -> None:
        """`latency_model` replaces the profiled one (tests pass a known model). `clock`: the time source of
        every decision (the planner's, the iteration's start and end); `forward_pass_done(plan)` is called
        when the model runner has run `plan`, before the planner's update reads the clock again (a virtual
        clock advances there by the iteration's modelled duration)."""
        self.config = config
        self.clock = clock
        self.forward_pass_done = forward_pass_done
        self.fatal_reason: str | None = None  # set when a tensor-parallel rank is lost: the engine cannot go on
        self.ranks: distributed.RankContext | None = None
        if loaded is None and config.engine.tensor_parallel_size > 1:
            # Tensor parallelism: this process is rank 0; the other ranks start now (distributed.py).
            self.ranks = distributed.launch(config, on_lost=self._rank_lost)
            try:
                loaded = load_model(config.model, distributed.rank_device(config, 0), self.ranks.tp)
            except BaseException:
                distributed.abort(self.ranks)
                raise
        self.loaded = loaded or load_model(config.model, config.device)
        self.arch = self.loaded.arch
        self.tokenizer: Tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.metrics = metrics or m.RuntimeMetrics()
        engine_cfg = config.engine
        pb = config.piggyback
        # Before any cache exists: sizing from memory measures the largest iteration's activation peak. The
        # readers are looked up at call time (module attributes), so that a test can replace them.
        loaded = self.loaded
        kv_dtype = kv_cache_dtype(engine_cfg.kv_cache_dtype, loaded.device, loaded.dtype)  # fp8 refused off-GPU
        # Under tensor parallelism rank 0 measures and profiles its own shard, the collectives idle.
        shard = dataclasses.replace(loaded, arch=loaded.shard_arch)
        tp = loaded.tp

        def local() -> contextlib.AbstractContextManager[None]:
            return tp.local_only() if tp is not None else contextlib.nullcontext()

        def size_caches(bytes_per_token: int) -> sizing.KVSizes:
            with local():
                return sizing.size_kv_caches(
                    config,
                    bytes_per_token=bytes_per_token,
                    max_model_len=loaded.max_model_len,
                    resident_weights_bytes=sizing.weights_bytes(loaded.model),
                    on_cpu=self.device.type == "cpu",
                    # Only a service whose class takes the host path ever holds host KV (an LS-only pool never).
                    uses_host_kv=any(s.service_class in policy_class(engine_cfg.policy).host_path_classes
                                     for s in config.services),
                    read_device=lambda: sizing.read_device_memory(loaded.device),
                    read_host=lambda: sizing.read_host_memory(),
                    measure_activation=lambda tokens, rows: activation_peak.measure_activation_bytes(
                        shard, tokens, rows),
                )  # fmt: skip

        kv_sizes = size_caches(kv_block_bytes(loaded.arch, 1, kv_dtype))
        if tp is not None and self.device.type != "cpu":
            # Each GPU holds its rank's KV heads; the ranks' host KV shards share this host's memory (as do all
            # the caches on a CPU device): those are sized for the whole model's KV.
            per_gpu = size_caches(kv_block_bytes(loaded.shard_arch, 1, kv_dtype)).accelerator
            kv_sizes = dataclasses.replace(kv_sizes, accelerator=per_gpu)
        sizing.require_fixed_caches_fit(
            config, kv_sizes, on_cpu=self.device.type == "cpu",
            host_kv_allocated=bool(policy_class(engine_cfg.policy).host_path_classes),
            read_device=lambda: sizing.read_device_memory(loaded.device), read_host=lambda: sizing.read_host_memory(),
        )  # fmt: skip
        num_blocks = kv_sizes.accelerator.num_blocks
        log.info("accelerator KV: %d blocks of %d tokens (%s)", num_blocks, engine_cfg.block_size,
                 kv_sizes.accelerator.explanation)  # fmt: skip
        log.info("host KV: %d blocks of %d tokens (%s)", kv_sizes.host.num_blocks, pb.host_block_size,
                 kv_sizes.host.explanation)  # fmt: skip
        host_kv = HostKV(kv_sizes.host.num_blocks, pb.host_block_size, pb.max_be_requests)
        if policy_class(engine_cfg.policy).host_path_classes:
            share_cores_with_cpu_workers(pb, self.device)  # before the latency model is profiled
        loaded_model = self.loaded

        def append_token(request: Request, token: int) -> str | None:  # detokenise, check stops and lengths
            return request.append_token(token, self.tokenizer, loaded_model.eos_token_ids,
                                        loaded_model.max_model_len)  # fmt: skip

        def profile() -> LatencyModel:
            with local():  # under tensor parallelism: rank 0's shard, without the all-reduces' time
                return load_or_profile(shard, config.slo_control.profile_cache_dir,
                                       config.slo_control.profile_trust_factor)  # fmt: skip

        # The engine executes the plans' BE KV moves (hybrid placement); under tensor parallelism the other
        # ranks' host KV would have to move too, which they do not yet: there hybrid runs BE on the host path.
        self.planner = Planner(
            config, num_blocks, host_kv, latency_model or profile, append_token=append_token, clock=clock,
            kv_moves=self.ranks is None,
        )  # fmt: skip
        runner_args = (config, self.loaded, self.planner.allocator, self.planner.policy, self.planner.host_kv,
                       self.metrics)  # fmt: skip
        if self.ranks is not None:
            self.ranks.start(distributed.RankSetup(num_blocks, kv_sizes.host.num_blocks))
            self.runner: ModelRunner = distributed.LeaderRunner(self.ranks, *runner_args)
        else:
            self.runner = ModelRunner(*runner_args)
        pb_path = self.runner.piggyback
        if self.planner.hybrid and pb_path is not None:
            if self.device.type != "cpu":
                # Hybrid placement picks its mode by the host's bandwidth (scheduler/be_mode.py). Not on a CPU
                # device: there the "accelerator" and the CPU workers share the cores, so host attention is not
                # free of accelerator time (`make demo` on this 2-core VM: 193 BE tok/s HBM-first, 96 host-only).
                self.planner.host_capacity = pb_path.host_capacity()
            if (tier := pb_path.remote_tier()) is not None:
                # Remote nodes as hybrid placement's third tier: the planner places, the CPU path follows it.
                self.planner.remote_tier = tier
                pb_path.node_of = tier.node_of
        self.model = self.loaded.model
        self.requests: dict[str, Request] = {}
        self._be_token_times: deque[float] = deque()
        self._headroom_due_s = 0.0
        self.attainment = {s.name: m.SlidingAttainment(config.metrics.attainment_window_s) for s in config.services}
        self.services = {s.name: s for s in config.services}
        self.metrics.cache_config_info.labels(block_size=str(engine_cfg.block_size),
                                              num_gpu_blocks=str(num_blocks)).set(1)  # fmt: skip
        for direction in ("to_host", "to_gpu"):  # export every series from the start, so dashboards see zeros
            for outcome in (m.MOVE_DONE, m.MOVE_FAILED):
                self.metrics.be_kv_moves.labels(direction, outcome)
        for service in config.services:
            labels = (service.name, service.service_class)
            self.metrics.num_running.labels(*labels).set(0)
            self.metrics.num_waiting.labels(*labels).set(0)
            self.metrics.kv_cache_usage.labels(*labels).set(0)
            self.metrics.prompt_tokens.labels(*labels)
            self.metrics.generation_tokens.labels(*labels)
            for outcome in m.OUTCOMES:
                self.metrics.requests.labels(*labels, outcome)
            if service.service_class == "LS":
                self.metrics.slo_attainment.labels(service.name).set(1.0)
                self.metrics.slo_window_requests.labels(service.name).set(0)
                for violation in (m.VIOLATION_TTFT, m.VIOLATION_TPOT, m.VIOLATION_REJECTED):
                    self.metrics.slo_violations.labels(service.name, violation)
        log.info("engine ready: %d KV blocks of %d tokens on %s, policy %s", num_blocks, engine_cfg.block_size,
                 self.device, self.planner.policy.name)  # fmt: skip

    def _rank_lost(self, reason: str) -> None:
        """A tensor-parallel rank exited (called on the watch thread): the next step raises RankLostError."""
        self.fatal_reason = f"tensor-parallel rank lost: {reason}"

    # The planner's and the runner's state, under the names tests and the server read.
    @property
    def scheduler(self):  # type: ignore[no-untyped-def]
        return self.planner.scheduler

    @property
    def allocator(self):  # type: ignore[no-untyped-def]
        return self.planner.allocator

    @property
    def host_kv_waiting(self) -> deque[Request]:
        return self.planner.host_kv_waiting

    @property
    def piggyback(self) -> PiggybackPath | None:
        return self.runner.piggyback

    @property
    def model_error(self) -> ModelError:
        return self.planner.stats.model_error

    # --- requests in and out ------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        service = self.services.get(request.service)
        if service is None:
            raise UnknownServiceError(
                f"The model `{request.service}` does not exist on this runtime; hosted: {', '.join(self.services)}"
            )
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise RequestError("the prompt is empty after tokenisation; send at least one token")
        max_len = self.loaded.max_model_len
        if request.max_num_tokens > max_len:
            raise RequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{request.max_num_tokens} tokens ({prompt_len} in the prompt, "
                f"{request.params.max_tokens} for the completion). Shorten the prompt or lower max_tokens."
            )
        # A request on the host path holds accelerator KV only while it prefills; its outputs live in host KV.
        # Under hybrid placement a BE request may decode in either: it must fit host KV (where it can always go).
        may_use_host = self.planner.on_host_path(request) or (self.planner.hybrid and not request.is_ls)
        host_kv = self.planner.host_kv if may_use_host else None
        on_accelerator = prompt_len if host_kv is not None else request.max_num_tokens
        allocator = self.planner.allocator
        needed = allocator.blocks_for_tokens(on_accelerator)
        if needed > allocator.num_blocks:
            raise RequestError(
                f"the request needs {needed} KV blocks but this runtime's cache holds {allocator.num_blocks}; "
                "lower max_tokens or shorten the prompt"
            )
        if host_kv is not None and request.max_num_tokens > host_kv.capacity_tokens():
            raise RequestError(
                f"the request needs {request.max_num_tokens} tokens of host KV cache but this "
                f"runtime holds {host_kv.capacity_tokens()}; lower max_tokens or shorten the prompt"
            )
        # min/max run in C: a generator over every token was most of a validation (it runs twice per request,
        # once on the engine thread).
        ids = request.prompt_token_ids
        if min(ids) < 0 or max(ids) >= self.arch.vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {self.arch.vocab_size})")

    def add_request(self, request: Request) -> None:
        """Take a request, or raise RequestError (400), UnknownServiceError (404) or AdmissionRejected (429)."""
        self.validate(request)
        if request.request_id in self.requests:
            raise RequestError(f"request id {request.request_id!r} is already running")
        rejection = self.planner.admission(request)
        if rejection is not None:
            self._reject(request, rejection.reason, rejection.message, rejection.retry_after_s)
        self.requests[request.request_id] = request
        self.planner.add(request)
        labels = (request.service, request.service_class)
        self.metrics.prompt_tokens.labels(*labels).inc(len(request.prompt_token_ids))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request (client gone); its KV blocks are free when this returns."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        output = self._finish(request, FINISH_ABORT)
        self.planner.publish_admission_view(IterationPlan())  # the engine may stay idle: no stale LS work
        self._update_gauges()  # the loop may go idle now; the gauges must not keep showing this request
        return output

    def fail(self, request_id: str, error: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.error = error
        return self._finish(request, FINISH_ERROR)

    def refuse_early(self, request: Request, *, forwarding: bool = True) -> AdmissionRejected | None:
        """Off the engine thread (the HTTP handler), for a validated request: an LS refusal decided from the
        admission view the engine publishes with each plan (`Planner.refuse_early`), counted here as any
        rejection is (requests, rejections by reason, the SLO miss; all thread-safe); None: submit it, the
        engine decides. Under overload most LS requests are refused: this spares each a round trip through
        the engine thread and a pass over the LS requests there. `forwarding=False`: only asking (see the
        planner's); a request not refused is not yet counted as let through."""
        rejection = self.planner.refuse_early(request, forwarding=forwarding)
        if rejection is None:
            return None
        return self._rejected(request, rejection.reason, rejection.message, rejection.retry_after_s)

    def refuses_every_prompt(self, service: str, slo: SLOTarget | None = None) -> bool:
        """Off the engine thread: whether `refuse_early` would refuse any prompt of this LS service now, even a
        one-token one (`Planner.refuses_every_prompt`); counts nothing."""
        return self.planner.refuses_every_prompt(service, slo)

    def _reject(self, request: Request, reason: str, message: str, retry_after_s: float) -> None:
        raise self._rejected(request, reason, message, retry_after_s)

    def _rejected(self, request: Request, reason: str, message: str, retry_after_s: float) -> AdmissionRejected:
        """A refusal at arrival, counted (requests, rejections by reason, an LS request's SLO miss)."""
        labels = (request.service, request.service_class)
        self.metrics.requests.labels(*labels, m.OUTCOME_REJECTED).inc()
        self.metrics.admission_rejections.labels(*labels, reason).inc()
        if request.is_ls:  # a rejected LS request is an SLO miss (DESIGN.md)
            self.metrics.slo_violations.labels(request.service, m.VIOLATION_REJECTED).inc()
            self.attainment[request.service].record(False)
            self.metrics.record_slo_outcome(request.service, False)
            # The loop may stay idle: attainment must show the miss now. Only that gauge: nothing else changed,
            # and under overload rejections outnumber iterations (a full gauge sweep each was most of a 429's
            # CPU on the engine thread).
            self._update_attainment(request.service)
        return AdmissionRejected(f"Rejected ({reason}): {message}", reason, retry_after_s)

    def has_work(self) -> bool:
        pb = self.runner.piggyback
        return self.planner.has_work() or (pb is not None and pb.has_work())

    def close(self) -> None:
        self.runner.close()

    # --- one iteration: schedule -> run -> update ------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.fatal_reason is not None:
            raise distributed.RankLostError(self.fatal_reason)
        started = self.clock()  # the planner's clock: the update measures the iteration against it
        pb = self.runner.piggyback
        if pb is not None:
            pb.collect()
            if self.planner.remote_tier is not None:  # a node lost or replaced since: its capacity follows
                pb.refresh_remote_tier(self.planner.remote_tier)
        idle = pb.rows_between_tokens() if pb is not None and self.planner.hybrid else ()
        plan = self.planner.schedule(be_rows_ready=pb.runnable_rows() if pb is not None else 0, host_rows_idle=idle)
        self.planner.publish_admission_view(plan)
        failed_moves = self._execute_moves(plan)
        if pb is not None:
            pb.max_rows_per_layer = plan.be_rows_per_layer
        outputs: list[RequestOutput] = []
        if plan or (pb is not None and pb.has_ready_work()):
            result = self.runner.run(plan)
            if self.forward_pass_done is not None:
                self.forward_pass_done(plan)
            ran = dataclasses.replace(result.outputs(started, self.arch.num_hidden_layers), failed_moves=failed_moves)
            events = self.planner.update(plan, ran, self.clock())
            outputs = self._deliver(events, result.done_rows)
        else:
            if plan.be_to_host or plan.be_to_gpu:  # moves only: booked without an iteration
                self.planner.settle_moves(plan, failed_moves)
            elif pb is not None and pb.has_work():
                # Nothing for the accelerator until a CPU result lands: sleep on the workers, not a busy loop.
                pb.idle_wait(0.05)
        self._start_moved_rows(plan, failed_moves)
        if not self.planner.has_work():  # idle until a request comes: the view must not hold the plan's requests
            self.planner.publish_admission_view(IterationPlan())
        self._export_stats(self.planner.stats.last)
        if pb is not None:
            for request, error in pb.take_failures():
                if (output := self.fail(request.request_id, error)) is not None:
                    outputs.append(output)
            for request in pb.take_retries():  # its attention worker was lost: prefill it again, elsewhere
                if request.request_id in self.requests:
                    request.num_computed_tokens = 0
                    self.planner.release_remote_kv(request)  # its node's KV is gone; placed afresh
                    self.planner.scheduler.add(request)
                    self.metrics.remote_be_retries.inc()
        self._update_gauges()
        return outputs

    # --- BE KV moves: executing the plan's be_to_host / be_to_gpu (the planner decided them) ------------------
    def _execute_moves(self, plan: IterationPlan) -> list[Request]:
        """Copy the KV of the plan's moves before its forward pass; returns the moves that could not be executed,
        for the planner's update (the request stays where it was). The planner holds the KV on both sides: host
        KV reserved for `be_to_host` (whose accelerator blocks it frees in the update), accelerator blocks and a
        place in batching for `be_to_gpu` (whose host KV the CPU path frees here, once copied)."""
        if not (plan.be_to_host or plan.be_to_gpu):
            return []
        pb = self.runner.piggyback
        if pb is None:
            raise RuntimeError(f"the plan moves BE KV but policy {self.planner.policy.name!r} has no host path")
        failed: list[Request] = []
        for request, direction, copy in (*((r, "to_host", self.runner.copy_to_host) for r in plan.be_to_host),
                                         *((r, "to_gpu", self.runner.copy_to_accelerator) for r in plan.be_to_gpu)):
            try:
                copy(request)
            except Exception:  # the request stays where it is: reported, and the planner decides again later
                log.exception("BE KV move %s of %s failed; it stays where it was", direction, request.request_id)
                failed.append(request)
                self.metrics.be_kv_moves.labels(direction, m.MOVE_FAILED).inc()
                continue
            if direction == "to_gpu":
                pb.release(request)  # off the CPU path: its host KV is free (the copy has read it)
            self.metrics.be_kv_moves.labels(direction, m.MOVE_DONE).inc()
        return failed

    def _start_moved_rows(self, plan: IterationPlan, failed: list[Request]) -> None:
        """Requests moved to host KV by this plan decode on the CPU path from their next token."""
        pb = self.runner.piggyback
        failed_ids = {r.request_id for r in failed}
        for request in plan.be_to_host:
            if pb is not None and request.request_id not in failed_ids and request.finish_reason is None:
                pb.start_decode(request)

    def _export_stats(self, stats: IterationStats | None) -> None:
        """This step's iteration, as the planner's stats recorder has it, into the Prometheus metrics (every
        step plans once, so each iteration is exported once)."""
        if stats is None:
            return
        if stats.be_rows_allowed is not None:
            self.metrics.be_rows_allowed.set(stats.be_rows_allowed)
        for victim in stats.preempted:
            self.metrics.num_preemptions.labels(victim.service, victim.service_class).inc()
        if not stats.ran:
            return
        if self.runner.piggyback is not None:
            self.metrics.be_rows_merged.observe(stats.be_rows_merged)
        self.metrics.iteration_seconds.observe(stats.run_s)
        if stats.predicted_s is not None:
            self.metrics.iteration_predicted_seconds.set(stats.predicted_s)
            self.metrics.iteration_measured_seconds.set(stats.measured_s)
            self.metrics.latency_model_error.set(self.model_error.mape())

    def _deliver(self, events: list[TokenEvent], done_rows: list[BERow]) -> list[RequestOutput]:
        """Each token the planner took goes out to its client; the CPU path learns what it carries next."""
        pb = self.runner.piggyback
        outputs = [self._token_output(event) for event in events]
        if pb is not None:
            for event in events:
                if event.finish_reason is not None and self.planner.on_host_path(event.request):
                    pb.release(event.request)
                elif event.left_for_host_path:  # prefill done: the request decodes on the CPU path
                    pb.start_decode(event.request)
            for be_row, event in zip(done_rows, [e for e in events if e.from_host_path], strict=True):
                if event.finish_reason is None:
                    pb.token_done(be_row)
        return outputs

    def _token_output(self, event: TokenEvent) -> RequestOutput:
        request, now = event.request, event.request.last_token_s
        assert now is not None
        labels = (request.service, request.service_class)
        if event.first:
            self.metrics.ttft.labels(*labels).observe(now - request.arrival_s)
            if request.scheduled_s is not None:
                self.metrics.queue_time.labels(*labels).observe(request.scheduled_s - request.arrival_s)
        elif event.previous_token_s is not None:
            self.metrics.inter_token_latency.labels(*labels).observe(now - event.previous_token_s)
        self.metrics.generation_tokens.labels(*labels).inc()
        if not request.is_ls:
            self._be_token_times.append(now)
        if event.finish_reason is not None:
            return self._finished_output(request, [event.token_id])
        return RequestOutput(
            request.request_id,
            [event.token_id],
            request.take_text(final=False),
            False,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
        )

    def _finish(self, request: Request, reason: str) -> RequestOutput:
        """End a request the iteration did not finish (aborted, failed)."""
        self.planner.finish(request, reason)
        if self.runner.piggyback is not None and self.planner.on_host_path(request):
            self.runner.piggyback.release(request)
        return self._finished_output(request, [])

    def _finished_output(self, request: Request, new_token_ids: list[int]) -> RequestOutput:
        """A request the planner has finished: its last output, and its outcome in the metrics."""
        self.requests.pop(request.request_id, None)
        reason = request.finish_reason
        assert reason is not None
        labels = (request.service, request.service_class)
        outcome = {FINISH_ABORT: m.OUTCOME_ABORTED, FINISH_ERROR: m.OUTCOME_FAILED}.get(reason, m.OUTCOME_FINISHED)
        self.metrics.requests.labels(*labels, outcome).inc()
        timing = request.timing()
        if outcome == m.OUTCOME_FINISHED:
            self.metrics.request_success.labels(*labels, reason).inc()
            if request.last_token_s is not None:
                self.metrics.e2e_latency.labels(*labels).observe(request.last_token_s - request.arrival_s)
            if timing.tpot_s is not None:
                self.metrics.request_tpot.labels(*labels).observe(timing.tpot_s)
        # Attainment counts what the runtime did: finished and failed LS requests; a client abort is neither.
        if request.is_ls and request.slo is not None and outcome != m.OUTCOME_ABORTED:
            ttft_ok, tpot_ok = m.slo_attained(timing, request.slo.ttft_s, request.slo.tpot_s)
            ok = ttft_ok and tpot_ok and outcome == m.OUTCOME_FINISHED
            self.record_ls_attainment(request.service, ok, ttft_ok=ttft_ok, tpot_ok=tpot_ok)
        return RequestOutput(
            request.request_id,
            new_token_ids,
            request.take_text(final=True),
            True,
            reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
            error=request.error,
        )

    def record_ls_attainment(self, service: str, attained: bool, *, ttft_ok: bool, tpot_ok: bool) -> None:
        if not ttft_ok:
            self.metrics.slo_violations.labels(service, m.VIOLATION_TTFT).inc()
        if not tpot_ok:
            self.metrics.slo_violations.labels(service, m.VIOLATION_TPOT).inc()
        self.attainment[service].record(attained)
        self.metrics.record_slo_outcome(service, attained)

    def refresh_gauges(self) -> None:
        """Recompute time-based gauges (sliding windows, headroom) while the engine is idle."""
        self._update_gauges()

    def _update_attainment(self, service: str) -> None:
        ratio, window = self.attainment[service].value()
        self.metrics.slo_attainment.labels(service).set(ratio)
        self.metrics.slo_window_requests.labels(service).set(window)

    def _update_gauges(self) -> None:
        now = self.clock()
        while self._be_token_times and self._be_token_times[0] < now - 10.0:
            self._be_token_times.popleft()
        self.metrics.be_tokens_per_second.set(len(self._be_token_times) / 10.0)
        pb = self.runner.piggyback
        if pb is not None:
            pb.update_gauges()
        if self.planner.slo is not None and now >= self._headroom_due_s:
            self._headroom_due_s = now + self.config.slo_control.headroom_interval_s
            self.metrics.ls_headroom.set(self.planner.headroom_rps())
        counts: dict[str, list[int]] = {name: [0, 0, 0] for name in self.services}  # running, waiting, blocks
        for request in self.scheduler.running:
            counts[request.service][0] += 1
            counts[request.service][2] += len(self.allocator.blocks_of(request.request_id))
        for request in self.scheduler.waiting:
            counts[request.service][1] += 1
            counts[request.service][2] += len(self.allocator.blocks_of(request.request_id))
        if pb is not None:  # BE requests on the CPU path hold no accelerator KV
            for be_row in pb.rows.values():
                counts[be_row.request.service][0] += 1
            for request in self.host_kv_waiting:
                counts[request.service][1] += 1
        for name, (running, waiting, blocks) in counts.items():
            labels = (name, self.services[name].service_class)
            self.metrics.num_running.labels(*labels).set(running)
            self.metrics.num_waiting.labels(*labels).set(waiting)
            self.metrics.kv_cache_usage.labels(*labels).set(blocks / self.allocator.num_blocks)
            if self.services[name].service_class == "LS":
                self._update_attainment(name)
