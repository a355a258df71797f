"""Runs the engine loop on its own thread and bridges its outputs to asyncio request handlers.

Torch releases the GIL inside its kernels, so the HTTP event loop stays responsive while the engine
computes. Handlers never touch engine state: they post commands (add, abort) that the loop applies
between iterations, and receive RequestOutputs on a per-request asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future

from piggyback_runtime.distributed import RankLostError
from piggyback_runtime.engine import AdmissionRejected, Engine
from piggyback_runtime.request import FINISH_ERROR, FINISH_REJECTED, Request, RequestOutput

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped; the runtime is not healthy."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._streams_lock = threading.Lock()
        self.dead_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._stop.is_set():  # idempotent: a test and the app's shutdown may both stop it
            return
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout_s)
        self.engine.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead_reason is None

    async def generate(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        """Submit a validated request and yield its outputs; leaving early (client gone) aborts it."""
        if not self.alive:
            raise EngineDeadError(self.dead_reason or "engine loop is not running")
        self.engine.validate(request)  # reads only immutable engine facts; safe off the engine thread
        refused = self.refuse_early(request)  # an LS refusal from the engine's published view: no round trip
        if refused is not None:
            yield refused
            return
        stream = self.attach(request.request_id)  # registered before the request exists: no output is missed
        self._post("add", request)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()  # runs attach's cleanup: unregister, and abort if unfinished

    def refuse_early(self, request: Request, *, forwarding: bool = True) -> RequestOutput | None:
        """On the event loop, for a validated request: its refusal (FINISH_REJECTED) when `Engine.refuse_early`
        refuses it, counted and noted; None: not refused (`forwarding=False`: the caller submits it another way
        and it is asked again there)."""
        refused = self.engine.refuse_early(request, forwarding=forwarding)
        if refused is None:
            return None
        # The planner's LS arrival record is the engine thread's: queued for its next pass over the commands,
        # without waking it (bookkeeping only; an idle loop looks every 0.5 s).
        self._commands.put(("refused", request))
        return RequestOutput(request.request_id, [], "", True, FINISH_REJECTED, error=str(refused),
                             retry_after_s=refused.retry_after_s, reject_reason=refused.reason)  # fmt: skip

    def attach(self, request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """The outputs of a request that enters the engine some other way (a live migration's import): the
        stream is registered now, before the request exists, so no output is missed; closing it early aborts."""
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._streams_lock:
            self._streams[request_id] = (asyncio.get_running_loop(), outputs)

        async def stream() -> AsyncGenerator[RequestOutput, None]:
            finished = False
            try:
                while not finished:
                    output = await outputs.get()
                    finished = output.finished
                    yield output
            finally:
                with self._streams_lock:
                    self._streams.pop(request_id, None)
                if not finished:
                    self._post("abort", request_id)

        return stream()

    def detach(self, request_id: str, abort: bool) -> None:
        """Undo attach() for a stream nobody iterated: closing a never-started generator skips its cleanup."""
        with self._streams_lock:
            self._streams.pop(request_id, None)
        if abort:
            self._post("abort", request_id)

    def call(self, fn: Callable[[], object]) -> Future[object]:
        """Run `fn` on the engine thread between two iterations (migration export/import); its result or
        exception lands in the returned future."""
        future: Future[object] = Future()
        self._post("call", (fn, future))
        return future

    def deliver(self, output: RequestOutput) -> None:
        """Hand an output produced outside `step` (a migration's commit) to its request's stream."""
        self._deliver(output)

    def fail(self, request_ids: list[str], error: str) -> None:
        """End these requests with FINISH_ERROR and `error` (the drain deadline); their streams get the output."""
        for request_id in request_ids:
            self._post("fail", (request_id, error))

    def _post(self, command: str, payload: object) -> None:
        self._commands.put((command, payload))
        self._wakeup.set()

    def _deliver(self, output: RequestOutput) -> None:
        self._deliver_all([output])

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams: one callback per event loop for the lot, not one per output (each
        `call_soon_threadsafe` writes to the loop's wake-up pipe and wakes the HTTP thread, which then takes
        the GIL from this, the engine thread); each stream still gets its outputs in order."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]] = {}
        with self._streams_lock:
            for output in outputs:
                target = self._streams.get(output.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], output))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _apply_commands(self) -> None:
        while True:
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                assert isinstance(payload, Request)
                try:
                    self.engine.add_request(payload)
                except AdmissionRejected as exc:
                    self._deliver(RequestOutput(payload.request_id, [], "", True, FINISH_REJECTED, error=str(exc),
                                                retry_after_s=exc.retry_after_s, reject_reason=exc.reason))
                except Exception as exc:  # validated before, but state may have changed (duplicate id)
                    self._deliver(RequestOutput(payload.request_id, [], "", True, FINISH_ERROR, error=str(exc)))
            elif command == "refused":
                assert isinstance(payload, Request)
                self.engine.planner.note_refused_early(payload)
            elif command == "abort":
                assert isinstance(payload, str)
                self.engine.abort(payload)
            elif command == "call":
                fn, future = payload  # type: ignore[misc]
                try:
                    future.set_result(fn())
                except Exception as exc:  # the caller's to handle (e.g. a refused migration)
                    future.set_exception(exc)
            elif command == "fail":
                assert isinstance(payload, tuple)
                if (output := self.engine.fail(*payload)) is not None:
                    self._deliver(output)

    def _die(self, reason: str) -> None:
        """The engine cannot go on (a tensor-parallel rank is lost): not ready from now on, then every request in
        flight ends with an error event (the process exits shortly after: distributed.RankWatch)."""
        self.dead_reason = reason
        log.error("engine stopped: %s; failing %d in-flight request(s)", reason, len(self.engine.requests))
        error = f"the runtime lost a tensor-parallel rank and stops: {reason}"
        for request_id in list(self.engine.requests):
            try:
                output = self.engine.fail(request_id, error)
            except Exception:  # the iteration broke off part-way: the request's state may be half-updated
                self.engine.requests.pop(request_id, None)
                output = RequestOutput(request_id, [], "", True, FINISH_ERROR, error=error)
            if output is not None:
                self._deliver(output)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands()
                if self.engine.fatal_reason is not None:  # a tensor-parallel rank is gone (distributed.py)
                    self._die(self.engine.fatal_reason)
                    return
                if not self.engine.has_work():
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    # Idle: sliding-window attainment and headroom must still age and be recomputed.
                    self.engine.refresh_gauges()
                    continue
                try:
                    outputs = self.engine.step()
                except RankLostError as exc:
                    self._die(str(exc))
                    return
                except Exception:
                    # One bad iteration must not take the runtime down: fail what was in flight, keep serving.
                    message = traceback.format_exc(limit=3)
                    log.error("engine iteration failed; failing in-flight requests:\n%s", message)
                    outputs = [
                        out for rid in list(self.engine.requests)
                        if (out := self.engine.fail(rid, "internal error in the engine iteration")) is not None
                    ]  # fmt: skip
                self._deliver_all(outputs)
        except BaseException as exc:  # pragma: no cover - last resort, reported by /healthz
            self.dead_reason = f"engine loop died: {exc!r}"
            log.exception("engine loop died")
            raise


def _put_all(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for outputs, output in items:
        outputs.put_nowait(output)
