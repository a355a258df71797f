"""The engine: one iteration = plan (scheduler) → one forward pass over every scheduled token → sample → emit.

Single-threaded by design: only the engine thread (server/async_engine.py) calls into it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.attention.paged import AttentionBatch, paged_attention
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.kv.allocator import BlockAllocator
from piggyback_runtime.kv.cache import PagedKVCache, kv_block_bytes
from piggyback_runtime.model.loader import LoadedModel, load_model
from piggyback_runtime.model.tokenizer import Tokenizer
from piggyback_runtime.piggyback.be_path import BERow, PiggybackPath
from piggyback_runtime.request import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Request,
    RequestOutput,
    RequestStatus,
    SLOTarget,
)
from piggyback_runtime.sampling import sample
from piggyback_runtime.scheduler.batching import BatchScheduler, IterationPlan
from piggyback_runtime.scheduler.latency_model import LatencyModel, ModelError, prefill_chunk_load
from piggyback_runtime.scheduler.profiler import load_or_profile
from piggyback_runtime.scheduler.slo_control import (
    IterationDemand,
    LSMix,
    LSRequestState,
    NewLSRequest,
    PrefillChunk,
    SLOController,
)

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
    ) -> None:
        """`latency_model` replaces the profiled one (tests and the simulator pass a known model)."""
        self.config = config
        self.loaded = loaded or load_model(config.model, config.device)
        self.model = self.loaded.model
        self.arch = self.loaded.arch
        self.tokenizer: Tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.metrics = metrics or m.RuntimeMetrics()
        engine_cfg = config.engine
        self.block_size = engine_cfg.block_size
        block_bytes = kv_block_bytes(self.arch, self.block_size, self.loaded.dtype)
        num_blocks = engine_cfg.num_kv_blocks or max(1, int(engine_cfg.kv_cache_memory_gib * 2**30) // block_bytes)
        self.kv_cache = PagedKVCache(self.arch, num_blocks, self.block_size, self.loaded.dtype, self.device)
        self.allocator = BlockAllocator(num_blocks, self.block_size)
        policy = engine_cfg.policy
        self.scheduler = BatchScheduler(
            self.allocator,
            engine_cfg.max_num_seqs,
            engine_cfg.max_num_batched_tokens,
            engine_cfg.enable_chunked_prefill,
            be_waits_for_ls=policy == "ls-only",
            be_kv_block_limit=int(engine_cfg.headroom_be_kv_share * num_blocks) if policy == "headroom" else None,
        )
        self.requests: dict[str, Request] = {}
        # Policy `piggyback`: BE decode attention on host CPUs. BE requests wait here for host KV first.
        self.piggyback: PiggybackPath | None = None
        self.host_kv_waiting: deque[Request] = deque()
        # `neo`: every request's decode attention on the CPU, and the engine waits for it layer by layer.
        self.synchronous_cpu_attention = policy == "neo"
        if policy in ("piggyback", "neo"):
            self.piggyback = PiggybackPath(config, self.arch, self.loaded.dtype, self.device, self.metrics)
            if self.synchronous_cpu_attention:
                self.piggyback.max_rows_per_layer = config.piggyback.max_be_requests
        self._be_token_times: deque[float] = deque()
        # SLO control (policy `piggyback`): a latency model decides the BE allowance and LS admission.
        self.slo: SLOController | None = None
        self.model_error = ModelError()
        self._finished_ls_lengths: deque[tuple[int, int]] = deque(maxlen=200)
        self._headroom_due_s = 0.0
        if policy == "piggyback" and config.slo_control.enabled:
            self.slo = SLOController(
                latency_model or load_or_profile(self.loaded, config.slo_control.profile_cache_dir),
                safety_margin=config.slo_control.safety_margin,
                ls_chunk_tokens=engine_cfg.max_num_batched_tokens,
                max_be_rows_per_layer=config.piggyback.max_be_rows_per_layer,
                max_be_prefill_tokens=engine_cfg.max_num_batched_tokens,
            )
        self.scale = 1.0 / math.sqrt(self.arch.head_dim)
        self._last_merged = 0
        self._last_sampled = 0
        self.attainment = {s.name: m.SlidingAttainment(config.metrics.attainment_window_s) for s in config.services}
        self.services = {s.name: s for s in config.services}
        self.metrics.cache_config_info.labels(block_size=str(self.block_size), num_gpu_blocks=str(num_blocks)).set(1)
        for service in config.services:  # export every series from the start, so dashboards see zeros
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
        log.info("engine ready: %d KV blocks of %d tokens on %s", num_blocks, self.block_size, self.device)

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
        if prompt_len + request.params.max_tokens > max_len:
            raise RequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt_len + request.params.max_tokens} tokens ({prompt_len} in the prompt, "
                f"{request.params.max_tokens} for the completion). Shorten the prompt or lower max_tokens."
            )
        host_path = self._on_host_path(request)
        # A request on the host path holds accelerator KV only while it prefills; its outputs live in host KV.
        on_accelerator = prompt_len if host_path else prompt_len + request.params.max_tokens
        needed = self.allocator.blocks_for_tokens(on_accelerator)
        if needed > self.allocator.num_blocks:
            raise RequestError(
                f"the request needs {needed} KV blocks but this runtime's cache holds {self.allocator.num_blocks}; "
                "lower max_tokens or shorten the prompt"
            )
        if host_path:
            assert self.piggyback is not None
            host_tokens = self.piggyback.capacity_tokens()
            if prompt_len + request.params.max_tokens > host_tokens:
                raise RequestError(
                    f"the request needs {prompt_len + request.params.max_tokens} tokens of host KV cache but this "
                    f"runtime holds {host_tokens}; lower max_tokens or shorten the prompt"
                )
        if any(t < 0 or t >= self.arch.vocab_size for t in request.prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.arch.vocab_size})")

    def _on_host_path(self, request: Request) -> bool:
        """Whether the request decodes with its KV in host DRAM and its attention on the CPU."""
        return self.piggyback is not None and (not request.is_ls or self.synchronous_cpu_attention)

    def add_request(self, request: Request) -> None:
        """Take a request, or raise RequestError (400), UnknownServiceError (404) or AdmissionRejected (429)."""
        self.validate(request)
        if request.request_id in self.requests:
            raise RequestError(f"request id {request.request_id!r} is already running")
        service = self.services[request.service]
        if request.slo is None and service.slo is not None:
            request.slo = SLOTarget(service.slo.ttft_s, service.slo.tpot_s)
        if self.slo is not None and request.is_ls and request.slo is not None and self.config.slo_control.admission:
            decision = self.slo.admit_ls(
                NewLSRequest(len(request.prompt_token_ids), request.slo.ttft_s, request.slo.tpot_s, request.arrival_s),
                self._ls_state(), IterationDemand(), time.monotonic(),
            )  # fmt: skip
            if not decision.admitted:
                self._reject(request, decision.reason, decision.message, decision.retry_after_s)
        host_path = self._on_host_path(request)
        if host_path and len(self.host_kv_waiting) >= self.config.slo_control.max_be_queue:
            self._reject(request, "BEQueueFull", f"{len(self.host_kv_waiting)} requests already wait for host KV "
                         "memory (slo_control.max_be_queue); retry later", retry_after_s=5.0)  # fmt: skip
        self.requests[request.request_id] = request
        if host_path:
            self.host_kv_waiting.append(request)
            self._admit_be()
        else:
            self.scheduler.add(request)
        labels = (request.service, request.service_class)
        self.metrics.prompt_tokens.labels(*labels).inc(len(request.prompt_token_ids))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request (client gone); its KV blocks are free when this returns."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        output = self._finish(request, FINISH_ABORT)
        self._update_gauges()  # the loop may go idle now; the gauges must not keep showing this request
        return output

    def fail(self, request_id: str, error: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.error = error
        return self._finish(request, FINISH_ERROR)

    def _reject(self, request: Request, reason: str, message: str, retry_after_s: float) -> None:
        labels = (request.service, request.service_class)
        self.metrics.requests.labels(*labels, m.OUTCOME_REJECTED).inc()
        self.metrics.admission_rejections.labels(*labels, reason).inc()
        if request.is_ls:  # a rejected LS request is an SLO miss (DESIGN.md)
            self.metrics.slo_violations.labels(request.service, m.VIOLATION_REJECTED).inc()
            self.attainment[request.service].record(False)
        self._update_gauges()  # the loop may stay idle: attainment must show the miss now
        raise AdmissionRejected(f"Rejected ({reason}): {message}", reason, retry_after_s)

    def _ls_state(self) -> list[LSRequestState]:
        """The LS requests the planner holds, in arrival order, as the SLO controller sees them."""
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

    def _be_allowance(self, ls_plan: IterationPlan) -> int:
        """SLO control: given the LS work planned, how many BE prefill tokens and BE rows per layer fit."""
        assert self.slo is not None and self.piggyback is not None
        be_waiting = [r for r in (*self.scheduler.running, *self.scheduler.waiting) if not r.is_ls]
        demand = IterationDemand(
            ls_decode_rows=len(ls_plan.decodes),
            ls_decode_attention_load=float(sum(c.start + 1 for c in ls_plan.decodes)),
            ls_prefill_chunks=[PrefillChunk(c.num_tokens, prefill_chunk_load(c.start, c.num_tokens))
                               for c in ls_plan.prefills],
            be_prefill_tokens_available=min(self.scheduler.max_num_batched_tokens - ls_plan.num_tokens,
                                            sum(r.num_remaining_tokens for r in be_waiting)),
            be_prefill_context_start=be_waiting[0].num_computed_tokens if be_waiting else 0,
            be_decode_rows_ready=self.piggyback.runnable_rows(),
        )  # fmt: skip
        allowance = self.slo.choose(demand, self._ls_state(), time.monotonic())
        self.piggyback.max_rows_per_layer = allowance.be_rows_per_layer
        self.metrics.be_rows_allowed.set(allowance.be_rows_per_layer)
        return allowance.be_prefill_tokens

    def _admit_be(self) -> None:
        """Move BE requests to the planner, in arrival order, while host KV and slots last."""
        assert self.piggyback is not None
        while self.host_kv_waiting and self.piggyback.reserve(self.host_kv_waiting[0]):
            self.scheduler.add(self.host_kv_waiting.popleft())

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.host_kv_waiting) or (
            self.piggyback is not None and self.piggyback.has_work()
        )

    def close(self) -> None:
        if self.piggyback is not None:
            self.piggyback.close()

    # --- one iteration --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        pb = self.piggyback
        if pb is not None:
            self._admit_be()
            pb.collect()
        plan = self.scheduler.schedule(be_prefill_limit=self._be_allowance if self.slo is not None else None)
        for victim in plan.preempted:
            self.metrics.num_preemptions.labels(victim.service, victim.service_class).inc()
        outputs: list[RequestOutput] = []
        if plan or (pb is not None and pb.has_ready_work()):
            forward_started = time.perf_counter()
            outputs = self._execute(plan)
            finished = time.perf_counter()
            self.metrics.iteration_seconds.observe(finished - started)
            if self.slo is not None:
                self._record_prediction(plan, finished - forward_started)
        elif pb is not None and pb.has_work():
            # Nothing for the accelerator until a CPU result lands: sleep on the workers, not a busy loop.
            pb.idle_wait(0.05)
        if pb is not None:
            for request, error in pb.take_failures():
                if (output := self.fail(request.request_id, error)) is not None:
                    outputs.append(output)
        self._update_gauges()
        return outputs

    def _execute(self, plan: IterationPlan) -> list[RequestOutput]:
        """One forward pass: the plan's rows on the accelerator, plus BE rows merged layer by layer."""
        token_ids: list[int] = []
        positions: list[int] = []
        be_prefills: list[tuple[Request, int, int, int]] = []
        for chunk in plan.chunks:
            if self._on_host_path(chunk.request):
                be_prefills.append((chunk.request, len(token_ids), chunk.start, chunk.num_tokens))
            token_ids.extend(chunk.request.token_ids(chunk.start, chunk.start + chunk.num_tokens))
            positions.extend(range(chunk.start, chunk.start + chunk.num_tokens))
        blocks = self.allocator.blocks_of
        batch = AttentionBatch.build(
            decodes=[(blocks(c.request.request_id), c.start) for c in plan.decodes],
            prefills=[(blocks(c.request.request_id), c.start, c.num_tokens) for c in plan.prefills],
            block_size=self.block_size,
            device=self.device,
        )
        pb = self.piggyback
        prefill_targets = pb.prefill_targets(be_prefills) if pb is not None else None
        model = self.model
        hidden = model.embed(torch.tensor(token_ids, dtype=torch.long, device=self.device))
        cos, sin = model.rope(torch.tensor(positions, dtype=torch.long, device=self.device), hidden.dtype)
        num_rows = len(token_ids)
        # BE rows travelling with this pass: at layer 0 the tokens that enter the model, after layer l the
        # rows whose layer-l CPU attention was merged into post_attention(l).
        carry: list[BERow] = pb.entering() if pb is not None else []
        carry_hidden = model.embed(self._tensor([r.request.output_token_ids[-1] for r in carry]))
        merged = len(carry)
        for index, layer in enumerate(model.layers):
            attn = hidden.new_empty((0, self.arch.num_attention_heads, self.arch.head_dim))
            if num_rows or carry:
                x, row_cos, row_sin = hidden, cos, sin
                if carry:
                    carry_cos, carry_sin = model.rope(self._tensor([r.position for r in carry]), hidden.dtype)
                    x = torch.cat((hidden, carry_hidden))
                    row_cos, row_sin = torch.cat((cos, carry_cos)), torch.cat((sin, carry_sin))
                q, k, v = layer.pre_attention(x, row_cos, row_sin)
                if num_rows:
                    attn = paged_attention(index, q[:num_rows], k[:num_rows], v[:num_rows], self.kv_cache, batch,
                                           self.scale)  # fmt: skip
                    if prefill_targets is not None:
                        assert pb is not None
                        pb.write_prefill_kv(index, prefill_targets, k, v)
                if carry:
                    assert pb is not None
                    pb.submit(index, carry, q[num_rows:], k[num_rows:], v[num_rows:], carry_hidden)
                    if self.synchronous_cpu_attention:
                        self._wait_for_cpu(carry)
            ready = pb.ready(index) if pb is not None else []
            if ready:
                assert pb is not None
                be_attn, be_residual = pb.take(index, ready)
                attn, residual = torch.cat((attn, be_attn)), torch.cat((hidden, be_residual))
                merged += len(ready)
            else:
                residual = hidden
            if num_rows or ready:
                out = layer.post_attention(attn, residual)
                hidden, carry_hidden = out[:num_rows], out[num_rows:]
            carry = ready
        if pb is not None:
            self.metrics.be_rows_merged.observe(merged)
        self._last_merged = merged
        return self._sample(plan, hidden, carry, carry_hidden)

    def _wait_for_cpu(self, rows: list[BERow]) -> None:
        """Policy `neo`: block until these rows' CPU attention is back (counted: the piggyback path never does)."""
        assert self.piggyback is not None
        started = time.perf_counter()
        while any(row.state == "waiting" for row in rows):
            self.piggyback.idle_wait(0.005)
            self.piggyback.collect()
        self.metrics.cpu_attention_wait_seconds.inc(time.perf_counter() - started)

    def _record_prediction(self, plan: IterationPlan, measured_s: float) -> None:
        """Compare the latency model with the iteration as it actually ran (its error is a metric)."""
        assert self.slo is not None
        merged_rows_per_layer = self._last_merged / self.arch.num_hidden_layers
        predicted = self.slo.latency_model.predict_parts(
            plan.num_tokens + merged_rows_per_layer,
            sum(prefill_chunk_load(c.start, c.num_tokens) for c in plan.prefills),
            float(sum(c.start + 1 for c in plan.decodes)),
            self._last_sampled,
        )
        self.model_error.record(predicted, measured_s)
        self.metrics.iteration_predicted_seconds.set(predicted)
        self.metrics.iteration_measured_seconds.set(measured_s)
        self.metrics.latency_model_error.set(self.model_error.mape())

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _sample(
        self, plan: IterationPlan, hidden: torch.Tensor, done_rows: list[BERow], done_hidden: torch.Tensor
    ) -> list[RequestOutput]:
        """Sample the plan's rows that reached their last token and the BE rows that left the last layer."""
        sample_rows: list[int] = []
        sampling: list[Request] = []
        row = 0
        for chunk in plan.chunks:
            row += chunk.num_tokens
            chunk.request.num_computed_tokens += chunk.num_tokens
            if chunk.samples:
                sample_rows.append(row - 1)
                sampling.append(chunk.request)
        self._last_sampled = len(sampling) + len(done_rows)
        if not sampling and not done_rows:
            return []
        logits = self.model.compute_logits(torch.cat((hidden[sample_rows], done_hidden)))
        requests = sampling + [r.request for r in done_rows]
        new_tokens = sample(logits, requests)
        now = time.monotonic()
        outputs = [self._append_token(r, t, now) for r, t in zip(requests, new_tokens, strict=True)]
        if self.piggyback is not None:
            for request, output in zip(sampling, outputs, strict=False):
                if self._on_host_path(request) and not output.finished:
                    # Prefill done and first token out: the request leaves the accelerator for the CPU path.
                    self.scheduler.remove(request)
                    request.num_computed_tokens = request.num_tokens - 1
                    self.piggyback.start_decode(request)
            for be_row, output in zip(done_rows, outputs[len(sampling):], strict=True):
                if not output.finished:
                    self.piggyback.token_done(be_row)
        return outputs

    # --- outputs ------------------------------------------------------------------------------------
    def _append_token(self, request: Request, token: int, now: float) -> RequestOutput:
        labels = (request.service, request.service_class)
        if request.first_token_s is None:
            request.first_token_s = now
            self.metrics.ttft.labels(*labels).observe(now - request.arrival_s)
            if request.scheduled_s is not None:
                self.metrics.queue_time.labels(*labels).observe(request.scheduled_s - request.arrival_s)
        elif request.last_token_s is not None:
            self.metrics.inter_token_latency.labels(*labels).observe(now - request.last_token_s)
        request.last_token_s = now
        request.output_token_ids.append(token)
        self.metrics.generation_tokens.labels(*labels).inc()
        if not request.is_ls:
            self._be_token_times.append(now)
        params = request.params
        finish_reason = None
        is_stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.loaded.eos_token_ids)
        if is_stop_token:
            finish_reason = FINISH_STOP
        else:
            if self._detokenize(request):
                finish_reason = FINISH_STOP
        if finish_reason is None and (
            len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.loaded.max_model_len
        ):
            finish_reason = FINISH_LENGTH
        if finish_reason is not None:
            return self._finish(request, finish_reason, new_token_ids=[token])
        return RequestOutput(
            request.request_id,
            [token],
            self._take_text(request, final=False),
            False,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
        )

    def _detokenize(self, request: Request) -> bool:
        """Extend output_text with the newest token; True when a stop string completed (text cut before it)."""
        ids = request.output_token_ids
        prefix = self.tokenizer.decode(ids[request.prefix_offset : request.read_offset])
        full = self.tokenizer.decode(ids[request.prefix_offset :])
        # A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives.
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            previous_len = len(request.output_text)
            request.output_text += full[len(prefix) :]
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)
            for stop in request.params.stop:
                index = request.output_text.find(stop, max(0, previous_len - len(stop) + 1))
                if index != -1:
                    request.output_text = request.output_text[:index]
                    return True
        return False

    def _take_text(self, request: Request, final: bool) -> str:
        # While running, hold back what could be the start of a stop string, so it is never streamed.
        holdback = 0 if final or not request.params.stop else max(len(s) for s in request.params.stop) - 1
        end = max(request.sent_text_len, len(request.output_text) - holdback)
        delta = request.output_text[request.sent_text_len : end]
        request.sent_text_len = end
        return delta

    def _finish(self, request: Request, reason: str, new_token_ids: list[int] | None = None) -> RequestOutput:
        self.scheduler.remove(request)
        if self._on_host_path(request):
            assert self.piggyback is not None
            if request in self.host_kv_waiting:
                self.host_kv_waiting.remove(request)
            self.piggyback.release(request)
        self.requests.pop(request.request_id, None)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        labels = (request.service, request.service_class)
        if request.is_ls and reason in (FINISH_STOP, FINISH_LENGTH):
            self._finished_ls_lengths.append((len(request.prompt_token_ids), len(request.output_token_ids)))
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
            new_token_ids or [],
            self._take_text(request, final=True),
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

    def _headroom_rps(self, now: float) -> float | None:
        """Extra LS request rate that fits at the current mix; None (absent) until LS requests were seen."""
        assert self.slo is not None
        slos = [s.slo for s in self.config.services if s.slo is not None]
        if not self._finished_ls_lengths or not slos:
            return None
        prompts, outputs = zip(*self._finished_ls_lengths, strict=True)
        mix = LSMix(sum(prompts) / len(prompts), sum(outputs) / len(outputs),
                    min(s.tpot_s for s in slos), min(s.ttft_s for s in slos))  # fmt: skip
        return self.slo.headroom_rps(self._ls_state(), mix, now)

    def refresh_gauges(self) -> None:
        """Recompute time-based gauges (sliding windows, headroom) while the engine is idle."""
        self._update_gauges()

    def _update_gauges(self) -> None:
        now = time.monotonic()
        while self._be_token_times and self._be_token_times[0] < now - 10.0:
            self._be_token_times.popleft()
        self.metrics.be_tokens_per_second.set(len(self._be_token_times) / 10.0)
        if self.piggyback is not None:
            self.piggyback.update_gauges()
        if self.slo is not None and now >= self._headroom_due_s:
            self._headroom_due_s = now + self.config.slo_control.headroom_interval_s
            self.metrics.ls_headroom.set(self._headroom_rps(now))
        counts: dict[str, list[int]] = {name: [0, 0, 0] for name in self.services}  # running, waiting, blocks
        for request in self.scheduler.running:
            counts[request.service][0] += 1
            counts[request.service][2] += len(self.allocator.blocks_of(request.request_id))
        for request in self.scheduler.waiting:
            counts[request.service][1] += 1
            counts[request.service][2] += len(self.allocator.blocks_of(request.request_id))
        if self.piggyback is not None:  # BE requests on the CPU path hold no accelerator KV
            for be_row in self.piggyback.rows.values():
                counts[be_row.request.service][0] += 1
            for request in self.host_kv_waiting:
                counts[request.service][1] += 1
        for name, (running, waiting, blocks) in counts.items():
            labels = (name, self.services[name].service_class)
            self.metrics.num_running.labels(*labels).set(running)
            self.metrics.num_waiting.labels(*labels).set(waiting)
            self.metrics.kv_cache_usage.labels(*labels).set(blocks / self.allocator.num_blocks)
            if self.services[name].service_class == "LS":
                ratio, window = self.attainment[name].value()
                self.metrics.slo_attainment.labels(name).set(ratio)
                self.metrics.slo_window_requests.labels(name).set(window)
