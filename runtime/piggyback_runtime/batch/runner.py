"""The batch runner: one per replica. It leases lines, runs each as a BE request through the engine (the same
validation, admission and planner as a live BE request), records results in groups, and finalizes batches.

The share of BE capacity a batch takes: at most `batch.max_inflight_lines` lines in flight per replica (running,
or finished with the result not yet recorded), and a new line is leased only while live BE requests in flight
plus the batch's lines stay below `piggyback.max_be_requests` — lines fill the BE slots live traffic leaves, and
a live BE request waits at most for one line to finish, never behind a queue of them. A line refused at
admission (BE queue full) goes back to the queue and leasing pauses for its Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from piggyback_runtime.batch import store as st
from piggyback_runtime.batch.files import CHAT_ENDPOINT, parse_file
from piggyback_runtime.config import BatchConfig
from piggyback_runtime.engine import RequestError, UnknownServiceError
from piggyback_runtime.request import FINISH_ABORT, FINISH_ERROR, FINISH_REJECTED
from piggyback_runtime.request import Request as EngineRequest
from piggyback_runtime.server.app import Runtime
from piggyback_runtime.server.async_engine import EngineDeadError
from piggyback_runtime.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    batch_output_line,
    completion_body,
    error_body,
    resolve_max_tokens,
    usage,
)

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 2.0
NOT_RUN_ERRORS = {st.CANCELLED: ("batch_cancelled", "the batch was cancelled before this line ran"),
                  st.EXPIRED: ("batch_expired", "the batch expired (completion_window) before this line ran")}


class _Release(Exception):
    """The line did not run to an answer of its own (admission, drain, cancel): it goes back to the queue."""

    def __init__(self, retry_after_s: float = 0.0) -> None:
        super().__init__()
        self.retry_after_s = retry_after_s


class BatchRunner:
    def __init__(self, runtime: Runtime, store: st.BatchStore, config: BatchConfig) -> None:
        self.runtime, self.store, self.config = runtime, store, config
        self.metrics = runtime.metrics
        self.in_flight: dict[tuple[str, int], tuple[asyncio.Task[None], st.LeasedLine]] = {}
        self._results: asyncio.Queue[st.LineResult] = asyncio.Queue()
        # Lines finished here whose result is not recorded yet (queued or being committed): still leased, so they
        # count against max_inflight_lines; a crash loses them like the lines running.
        self._unrecorded = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._pause_until = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    # --- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._guard(self._main(), "runner")),
                       asyncio.create_task(self._guard(self._heartbeat(), "lease heartbeat")),
                       asyncio.create_task(self._guard(self._recorder(), "result recorder")),
                       asyncio.create_task(self._guard(self._export_metrics(), "metrics"))]  # fmt: skip

    async def stop(self) -> None:
        """Stop leasing, hand unfinished lines back, record what finished."""
        self._stopping = True
        await self._abort_lines(list(self.in_flight))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_results()

    async def _guard(self, coro: Any, name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s failed; batches stop progressing on this replica", name)

    def wake(self) -> None:
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping or self.runtime.draining

    # --- the loop ----------------------------------------------------------------------------------------------
    async def _main(self) -> None:
        while not self.stopping and (self.runtime.engine is None or not self.runtime.engine.alive):
            await asyncio.sleep(0.1)  # the model is loading
        next_scan = 0.0
        while not self.stopping:
            self._wake.clear()  # before looking: a wake-up while we look is not lost
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + self.config.poll_interval_s
                await self._scan_batches()
            await self._lease()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, next_scan - time.monotonic()))
        await self._abort_lines(list(self.in_flight))  # draining: the lines go back for another replica

    async def _scan_batches(self) -> None:
        for batch in await self.store.active_batches():
            if batch.status == st.VALIDATING:
                await self.store.start_batch(batch.id, self._parse_input)
                continue
            if batch.status == st.CANCELLING or (batch.status == st.IN_PROGRESS and batch.expires_at <= time.time()):
                await self._abort_lines([key for key in self.in_flight if key[0] == batch.id])
            if batch.status == st.IN_PROGRESS and any(key[0] == batch.id for key in self.in_flight):
                continue  # still running here
            target = await self.store.claim_finalize(batch.id)
            if target is not None:
                await self._finalize(batch.id, target)

    def _parse_input(self, batch: Any, content: bytes) -> tuple[list[tuple[str, str, str]], list[dict[str, Any]]]:
        errors: list[dict[str, Any]] = []
        lines = parse_file(content, self.runtime.config, self.config.max_lines_per_file, batch.endpoint,
                           on_error=lambda exc: errors.append(exc.as_batch_error()))  # fmt: skip
        return lines, errors[:1000]

    async def _finalize(self, batch_id: str, target: str) -> None:
        """Assemble the output and error files from the recorded lines; lines that never ran (cancel, expiry)
        go to the error file. Every input line lands in exactly one of them."""
        output: list[str] = []
        errors: list[str] = []
        for row in await self.store.final_lines(batch_id):
            if row.state == st.LINE_COMPLETED:
                output.append(row.result)
            elif row.state == st.LINE_FAILED:
                errors.append(row.result)
            else:
                code, message = NOT_RUN_ERRORS.get(target, ("batch_not_run", "the line did not run"))
                line = batch_output_line(st.new_id("batch_req_"), row.custom_id, None, None, None,
                                         {"code": code, "message": message})  # fmt: skip
                errors.append(json.dumps(line, separators=(",", ":")))

        def jsonl(items: list[str]) -> tuple[bytes, int] | None:
            return (("\n".join(items) + "\n").encode(), len(items)) if items else None

        if await self.store.finish_batch(batch_id, target, jsonl(output), jsonl(errors)):
            log.info("batch %s %s: %d output line(s), %d error line(s)", batch_id, target, len(output), len(errors))

    async def _lease(self) -> None:
        if self.stopping or time.monotonic() < self._pause_until:
            return
        live_be = sum(1 for service_class in self.runtime.in_flight.values() if service_class == "BE")
        be_slots = self.runtime.config.piggyback.max_be_requests - live_be - len(self.in_flight)
        free = min(self.config.max_inflight_lines - len(self.in_flight) - self._unrecorded, be_slots)
        for line in await self.store.lease_lines(free):
            key = (line.batch_id, line.line_no)
            self.in_flight[key] = (asyncio.create_task(self._run_line(line)), line)
        self.metrics.batch_lines_in_flight.set(len(self.in_flight))

    async def _abort_lines(self, keys: list[tuple[str, int]]) -> None:
        tasks = [self.in_flight[key][0] for key in keys if key in self.in_flight]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- one line ----------------------------------------------------------------------------------------------
    async def _run_line(self, line: st.LeasedLine) -> None:
        key = (line.batch_id, line.line_no)
        try:
            result = await self._execute(line)
        except (_Release, asyncio.CancelledError) as exc:
            if isinstance(exc, _Release) and exc.retry_after_s:
                self._pause_until = time.monotonic() + exc.retry_after_s
            self.in_flight.pop(key, None)
            await asyncio.shield(self.store.release([(line.batch_id, line.line_no, line.attempt)]))
            self.wake()
            return
        except Exception:
            log.exception("batch %s line %d: unexpected error; the line goes back to the queue", *key)
            self.in_flight.pop(key, None)
            await asyncio.shield(self.store.release([(line.batch_id, line.line_no, line.attempt)]))
            return
        self.in_flight.pop(key, None)
        self._unrecorded += 1
        self._results.put_nowait(result)
        self.wake()

    async def _execute(self, line: st.LeasedLine) -> st.LineResult:
        chat = line.endpoint == CHAT_ENDPOINT
        line_id = st.new_id("batch_req_")
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex

        def failed(status: int, message: str, err_type: str, code: str | None,
                   param: str | None = None) -> st.LineResult:  # fmt: skip
            body = error_body(message, err_type, code, param)
            result = batch_output_line(line_id, line.custom_id, status, request_id, body)
            return st.LineResult(line.batch_id, line.line_no, line.attempt, st.LINE_FAILED, _dumps(result))

        engine = self.runtime.engine
        if engine is None or not engine.alive or self.stopping:
            raise _Release()
        service = self.runtime.config.service(line.model)
        if service is None or service.service_class != "BE":
            return failed(404, f"The model `{line.model}` is not a BE service of this runtime", "invalid_request_error",
                          "model_not_found", "model")  # fmt: skip
        body: CompletionRequest | ChatCompletionRequest
        try:
            tokenizer = engine.engine.tokenizer
            if chat:
                body = ChatCompletionRequest.model_validate_json(line.body)
                try:
                    text = tokenizer.apply_chat_template(body.message_dicts())
                except ValueError as exc:
                    return failed(400, str(exc), "invalid_request_error", "invalid_request", "messages")
                prompt_ids = tokenizer.encode(text, add_special_tokens=False)
                requested, field = body.requested_max_tokens(), body.max_tokens_field
            else:
                body = CompletionRequest.model_validate_json(line.body)
                prompt = body.single_prompt()
                prompt_ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
                requested, field = body.max_tokens, "max_tokens"
            max_tokens = resolve_max_tokens(service, requested, field, len(prompt_ids),
                                            engine.engine.loaded.max_model_len, chat)  # fmt: skip
            params = body.sampling_params(max_tokens)
        except APIError as exc:
            return failed(exc.status, exc.message, exc.err_type, exc.code, exc.param)
        except ValueError as exc:
            return failed(400, str(exc), "invalid_request_error", "invalid_request")
        request = EngineRequest(request_id, service.name, "BE", prompt_ids, params)
        try:
            stream = engine.generate(request)
            first = await anext(stream)
        except RequestError as exc:
            return failed(400, str(exc), "invalid_request_error", "invalid_request")
        except UnknownServiceError as exc:
            return failed(404, str(exc), "invalid_request_error", "model_not_found", "model")
        except EngineDeadError:
            raise _Release() from None
        if first.finish_reason == FINISH_REJECTED:
            raise _Release(max(0.05, first.retry_after_s or 0.5))
        text_out, last = first.text_delta, first
        try:
            async for output in stream:
                text_out += output.text_delta
                last = output
        finally:
            await stream.aclose()
        if last.finish_reason == FINISH_ABORT or (last.finish_reason == FINISH_ERROR and self.stopping):
            raise _Release()
        if last.finish_reason == FINISH_ERROR:
            return failed(500, f"The runtime failed this request: {last.error}", "server_error", "engine_error")
        answer = completion_body(request_id, chat, int(time.time()), body.model, text_out, last.finish_reason,
                                 usage(last.num_prompt_tokens, last.num_output_tokens))  # fmt: skip
        result = batch_output_line(line_id, line.custom_id, 200, request_id, answer)
        return st.LineResult(line.batch_id, line.line_no, line.attempt, st.LINE_COMPLETED, _dumps(result))

    # --- background ----------------------------------------------------------------------------------------------
    async def _recorder(self) -> None:
        """Group commit: every result waiting is recorded in one transaction; a line counts only from then."""
        while True:
            first = await self._results.get()
            batch = [first]
            while not self._results.empty():
                batch.append(self._results.get_nowait())
            await self._record(batch)

    async def _flush_results(self) -> None:
        batch = []
        while not self._results.empty():
            batch.append(self._results.get_nowait())
        await self._record(batch)

    async def _record(self, results: list[st.LineResult]) -> None:
        if not results:
            return
        try:
            await asyncio.shield(self.store.record(results))
        finally:
            self._unrecorded -= len(results)
        for result in results:
            self.metrics.batch_lines_finished.labels(result.state).inc()
        self.wake()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_timeout_s / 3)
            await self.store.renew_leases()

    async def _export_metrics(self) -> None:
        while True:
            counts = await self.store.lines_by_batch_status()
            self.metrics.batch_lines.clear()
            for batch_status, line_state, lines in counts:
                self.metrics.batch_lines.labels(batch_status, line_state).set(lines)
            by_status = await self.store.batches_by_status()
            for status in (*st.ACTIVE_STATUSES, *st.TERMINAL_STATUSES):
                self.metrics.batches.labels(status).set(by_status.get(status, 0))
            self.metrics.batch_lines_in_flight.set(len(self.in_flight))
            await asyncio.sleep(METRICS_INTERVAL_S)


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
