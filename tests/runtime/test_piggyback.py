"""Attention Piggybacking: BE attention on CPU worker processes against host-DRAM KV, merged layer by layer.

Shown here without timing: exactness against transformers, the engine never waiting for the CPU (tasks are
held until released), resources freed on finish and cancel, and a killed worker failing only its own BE
requests while LS requests and later BE requests carry on.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mp_connection
import multiprocessing.process
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.engine import Engine
from piggyback_runtime.piggyback import pool as pool_module
from piggyback_runtime.request import Request
from tests.runtime.helpers import (
    assert_matches_reference,
    greedy,
    hf_reference,
    make_request,
    reference_greedy,
    run_to_completion,
    tiny_config,
)

pytestmark = pytest.mark.slow  # engines with CPU worker processes

PROMPTS = [[1, *range(30, 30 + n)] for n in (4, 19, 33, 2, 11, 7)]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine(tiny_config(policy="piggyback", max_num_batched_tokens=16,
                                piggyback={"max_be_rows_per_layer": 3}))  # fmt: skip
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def references(engine: Engine) -> list[tuple[list[int], list[torch.Tensor]]]:
    hf = hf_reference(engine.arch, engine.model.state_dict())
    return [reference_greedy(hf, prompt, MAX_TOKENS) for prompt in PROMPTS]


def _submit(engine: Engine, classes: str, tag: str) -> list[Request]:
    requests = [make_request(f"{tag}{i}", p, greedy(MAX_TOKENS), "LS" if c == "L" else "BE")
                for i, (p, c) in enumerate(zip(PROMPTS, classes, strict=True))]  # fmt: skip
    for request in requests:
        engine.add_request(request)
    return requests


def _assert_idle(engine: Engine) -> None:
    pb = engine.piggyback
    assert pb is not None
    assert not engine.has_work()
    assert pb.host_kv.allocator.num_used == 0, "host KV blocks leaked"
    assert not pb.residuals, "residual store entries leaked"
    host = pb.host_kv
    assert not pb.rows and not pb.row_by_slot and len(host.free_slots) == len(host.generation), "slots leaked"
    assert engine.allocator.num_used == 0, "accelerator KV blocks leaked"


def test_be_outputs_match_transformers_and_ls_outputs_are_unchanged_by_be(engine: Engine, references) -> None:
    mixed = _submit(engine, "BLBLBB", "mix")
    run_to_completion(engine)
    for request, (ref, logits) in zip(mixed, references, strict=True):
        assert request.finish_reason == "length", request.error
        assert_matches_reference(request.output_token_ids, ref, logits)
    assert engine.metrics.be_rows_merged._sum.get() > 0, "BE rows never went through the piggyback merge"
    _assert_idle(engine)
    # The same LS requests with no BE load give the same tokens.
    ls_alone = [make_request(f"alone{i}", PROMPTS[i], greedy(MAX_TOKENS)) for i in (1, 3)]
    for request in ls_alone:
        engine.add_request(request)
    run_to_completion(engine)
    assert [r.output_token_ids for r in ls_alone] == [mixed[1].output_token_ids, mixed[3].output_token_ids]


@dataclass(frozen=True)
class BlockingCall:
    primitive: str
    timeout: float | None  # None: unbounded
    during_run: bool  # inside ModelRunner.run, i.e. while the accelerator has a pass to run
    idle_wait: bool  # inside PiggybackPath.idle_wait
    accelerator_idle: bool  # the planner had nothing to run (no LS work, no BE prefill)
    where: str


@dataclass
class BlockingWaitMonitor:
    """Records every call on the engine thread that may block, bounded or not, instead of timing anything.

    Instrumented: multiprocessing.connection.wait (which Connection.poll(timeout) also goes through) and
    the pool's import of it, a Connection.recv with nothing to read, time.sleep, threading.Event.wait,
    threading.Condition.wait, queue.Queue.get, the pool's SimpleQueue outbox, Thread/Process.join and CUDA
    synchronisation. A call with timeout 0 (a non-blocking poll) is not a wait. Other threads (the pool's
    sender thread) may block as they like: only the engine's thread is watched.
    """

    engine: Engine
    calls: list[BlockingCall] = field(default_factory=list)
    _thread: int = field(default_factory=threading.get_ident)
    _depth: threading.local = field(default_factory=threading.local)
    _in_run: bool = False
    _in_idle_wait: bool = False

    def _record(self, primitive: str, timeout: float | None) -> None:
        if threading.get_ident() != self._thread or getattr(self._depth, "inside", False):
            return
        if timeout is not None and timeout <= 0:
            return  # a non-blocking poll
        where = "".join(traceback.format_stack(limit=6)[:-2])
        self.calls.append(BlockingCall(primitive, timeout, self._in_run, self._in_idle_wait,
                                       not self.engine.planner.has_work(), where))  # fmt: skip

    def _quiet(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an original primitive without recording the calls it makes itself."""
        outer = getattr(self._depth, "inside", False)
        self._depth.inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            self._depth.inside = outer

    @contextlib.contextmanager
    def watching(self) -> Iterator[BlockingWaitMonitor]:
        monitor = self
        mp = pytest.MonkeyPatch()
        real_wait = mp_connection.wait

        def wait(object_list: Any, timeout: float | None = None) -> Any:
            monitor._record("multiprocessing.connection.wait", timeout)
            return monitor._quiet(real_wait, object_list, timeout)

        mp.setattr(mp_connection, "wait", wait)
        mp.setattr(pool_module, "wait", wait)
        for name in ("recv", "recv_bytes"):
            real = getattr(mp_connection.Connection, name)

            def recv(conn: Any, *args: Any, _real: Any = real, _name: str = name) -> Any:
                if not monitor._quiet(conn.poll):  # nothing to read yet: this recv would block
                    monitor._record(f"Connection.{_name} with nothing to read", None)
                return monitor._quiet(_real, conn, *args)

            mp.setattr(mp_connection.Connection, name, recv)

        def with_timeout(primitive: str, real: Callable[..., Any], timeout_of: Callable[..., float | None]) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                monitor._record(primitive, timeout_of(*args, **kwargs))
                return monitor._quiet(real, *args, **kwargs)

            return wrapper

        def first_timeout(_self: Any, timeout: float | None = None, *_: Any, **__: Any) -> float | None:
            return timeout

        def get_timeout(_self: Any, block: bool = True, timeout: float | None = None) -> float | None:
            return timeout if block else 0.0

        mp.setattr(time, "sleep", with_timeout("time.sleep", time.sleep, lambda seconds: seconds))
        mp.setattr(threading.Event, "wait", with_timeout("Event.wait", threading.Event.wait, first_timeout))
        mp.setattr(threading.Condition, "wait", with_timeout("Condition.wait", threading.Condition.wait, first_timeout))
        mp.setattr(queue.Queue, "get", with_timeout("Queue.get", queue.Queue.get, get_timeout))
        mp.setattr(threading.Thread, "join", with_timeout("Thread.join", threading.Thread.join, first_timeout))
        process_cls = multiprocessing.process.BaseProcess
        mp.setattr(process_cls, "join", with_timeout("Process.join", process_cls.join, first_timeout))
        for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                            (torch.cuda.Stream, "synchronize")):  # fmt: skip
            mp.setattr(owner, name, with_timeout(f"torch.cuda {name}", getattr(owner, name), lambda *a, **k: None))

        pb = self.engine.piggyback
        assert pb is not None
        outbox = pb.pool._outbox

        class WatchedOutbox:  # SimpleQueue is a C type: watch the pool's instance instead
            def get(self, block: bool = True, timeout: float | None = None) -> Any:
                monitor._record("SimpleQueue.get", timeout if block else 0.0)
                return monitor._quiet(outbox.get, block, timeout)

            def __getattr__(self, name: str) -> Any:
                return getattr(outbox, name)

        mp.setattr(pb.pool, "_outbox", WatchedOutbox())
        outbox.put((None, lambda: None))  # wake the sender thread so it reads the watched outbox

        real_run, real_idle_wait = self.engine.runner.run, pb.idle_wait

        def run(*args: Any, **kwargs: Any) -> Any:
            monitor._in_run = True
            try:
                return real_run(*args, **kwargs)
            finally:
                monitor._in_run = False

        def idle_wait(timeout_s: float) -> None:
            monitor._in_idle_wait = True
            try:
                real_idle_wait(timeout_s)
            finally:
                monitor._in_idle_wait = False

        mp.setattr(self.engine.runner, "run", run)
        mp.setattr(pb, "idle_wait", idle_wait)
        try:
            yield self
        finally:
            mp.undo()

    def waits_with_work_to_do(self) -> list[BlockingCall]:
        """Blocking calls other than the one allowed wait: sleeping on the workers when the accelerator has
        nothing at all to run (no LS work, no BE prefill, no BE row ready) until a CPU result lands."""
        return [c for c in self.calls if c.during_run or not (c.idle_wait and c.accelerator_idle)]


def _describe(calls: list[BlockingCall]) -> str:
    return "\n".join(f"{c.primitive} (timeout {c.timeout}) during_run={c.during_run} idle_wait={c.idle_wait}\n"
                     f"{c.where}" for c in calls[:3])  # fmt: skip


def test_engine_never_waits_for_cpu_attention(engine: Engine, references) -> None:
    """No blocking wait on the engine thread, bounded or not, while there is accelerator work; shown by
    counting every blocking primitive the engine thread calls (see BlockingWaitMonitor), not by timing."""
    pb = engine.piggyback
    assert pb is not None
    waited_before = engine.metrics.cpu_attention_wait_seconds._value.get()
    monitor = BlockingWaitMonitor(engine)
    with monitor.watching():
        pb.hold()  # workers take no task until released
        try:
            requests = _submit(engine, "BLBLBB", "held")
            ls = [r for r in requests if r.is_ls]
            be = [r for r in requests if not r.is_ls]
            iterations = 0
            while any(r.finish_reason is None for r in ls):
                engine.step()
                iterations += 1
                assert iterations < 2_000, "LS requests did not finish while BE attention was held"
            # While LS work ran next to held BE work, the engine thread made no blocking call at all.
            assert monitor.calls == [], _describe(monitor.calls)
            # LS done, BE stuck after their first token (prefill and first sample run on the accelerator).
            assert all(r.finish_reason == "length" for r in ls)
            assert all(r.finish_reason is None and len(r.output_token_ids) == 1 for r in be)
            assert engine.metrics.cpu_attention_queue_depth._value.get() > 0
            # The engine keeps iterating (and returns) with nothing but held BE work; with nothing for the
            # accelerator it sleeps on the workers, a bounded wait, and only there.
            for _ in range(5):
                engine.step()
            assert all(r.finish_reason is None for r in be)
            assert monitor.calls and all(c.timeout is not None for c in monitor.calls), _describe(monitor.calls)
        finally:
            pb.release_hold()
        run_to_completion(engine)
    assert monitor.waits_with_work_to_do() == [], _describe(monitor.waits_with_work_to_do())
    for request, (ref, logits) in zip(requests, references, strict=True):
        assert_matches_reference(request.output_token_ids, ref, logits)
    assert engine.metrics.cpu_attention_wait_seconds._value.get() == waited_before == 0
    _assert_idle(engine)


def test_the_wait_instrumentation_sees_the_neo_baseline_wait() -> None:
    """Control: policy `neo` waits for every CPU attention result inside the forward pass; the same
    instrumentation must see those waits, or the test above would prove nothing."""
    engine = Engine(tiny_config(policy="neo"))
    try:
        monitor = BlockingWaitMonitor(engine)
        with monitor.watching():
            requests = _submit(engine, "BLBLBB", "neo")
            run_to_completion(engine)
        assert all(r.finish_reason == "length" for r in requests)
        in_pass = [c for c in monitor.calls if c.during_run]
        assert in_pass and monitor.waits_with_work_to_do(), "the instrumentation missed neo's waits"
        assert engine.metrics.cpu_attention_wait_seconds._value.get() > 0
    finally:
        engine.close()


def test_cancelled_be_requests_free_host_kv_queue_entries_and_residuals(engine: Engine) -> None:
    pb = engine.piggyback
    assert pb is not None
    pb.hold()
    try:
        requests = _submit(engine, "BBBBBB", "cancel")
        for _ in range(200):
            engine.step()
            if all(r.request_id in pb.rows and pb.rows[r.request_id].state == "waiting" for r in requests):
                break
        assert pb.residuals and pb.host_kv.allocator.num_used > 0
        for request in requests:
            engine.abort(request.request_id)
        assert not pb.residuals
    finally:
        pb.release_hold()
    # Their in-flight tasks still report; only then are the slots and blocks reused.
    run_to_completion(engine)
    assert all(r.finish_reason == "abort" for r in requests)
    _assert_idle(engine)


def test_be_requests_wait_for_host_kv_and_run_when_it_frees() -> None:
    # 3 host blocks of 8 tokens: room for one request of 20 tokens (4 prompt + 16 output) at a time.
    engine = Engine(tiny_config(policy="piggyback", piggyback={"num_host_kv_blocks": 3}))
    try:
        requests = [make_request(f"w{i}", [1, 5, 6, 7], greedy(MAX_TOKENS), "BE") for i in range(3)]
        for request in requests:
            engine.add_request(request)
        assert len(engine.host_kv_waiting) == 2
        run_to_completion(engine)
        assert all(r.finish_reason == "length" for r in requests)
        assert len({tuple(r.output_token_ids) for r in requests}) == 1
        with pytest.raises(ValueError, match="host KV cache"):
            engine.add_request(make_request("too-long", [1] * 40, greedy(20), "BE"))
        _assert_idle(engine)
    finally:
        engine.close()


def test_be_outputs_longer_than_the_accelerator_kv_cache_fit_in_host_kv() -> None:
    # 16 accelerator blocks of 4 tokens hold 64 tokens: enough for the prompt's prefill, not for 100 outputs.
    engine = Engine(tiny_config(policy="piggyback", num_kv_blocks=16))
    try:
        request = make_request("long", [1, *range(40, 49)], greedy(100), "BE")
        engine.add_request(request)
        run_to_completion(engine)
        assert request.finish_reason == "length" and len(request.output_token_ids) == 100
        with pytest.raises(ValueError, match="KV blocks"):  # an LS request of that length stays refused
            engine.add_request(make_request("ls-long", [1, *range(40, 49)], greedy(100)))
        _assert_idle(engine)
    finally:
        engine.close()


def test_a_killed_worker_fails_its_be_requests_and_nothing_else() -> None:
    engine = Engine(tiny_config(policy="piggyback"))
    pb = engine.piggyback
    assert pb is not None
    try:
        pb.hold()
        doomed = _submit(engine, "BLBLBB", "doomed")
        ls = [r for r in doomed if r.is_ls]
        be = [r for r in doomed if not r.is_ls]
        for _ in range(200):
            engine.step()
            if all(r.request_id in pb.rows for r in be):
                break
        pid = pb.pool.pids()[0]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        pb.release_hold()
        outputs = []
        for _ in range(5_000):
            outputs += engine.step()
            if not engine.has_work():
                break
        failed = {o.request_id: o for o in outputs if o.finished and o.finish_reason == "error"}
        assert set(failed) == {r.request_id for r in be}
        assert all("worker holding this request died" in (o.error or "") for o in failed.values())
        assert all(r.finish_reason == "length" for r in ls)
        assert engine.metrics.cpu_worker_restarts._value.get() == 1
        assert engine.metrics.requests.labels("batch", "BE", m.OUTCOME_FAILED)._value.get() == len(be)
        _assert_idle(engine)
        # The replacement worker serves new BE requests.
        later = [make_request(f"later{i}", p, greedy(8), "BE") for i, p in enumerate(PROMPTS[:3])]
        for request in later:
            engine.add_request(request)
        run_to_completion(engine)
        assert all(r.finish_reason == "length" and r.error is None for r in later)
        assert pb.pool.pids()[0] != pid
    finally:
        engine.close()
