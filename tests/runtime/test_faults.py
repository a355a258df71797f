"""Faults with real processes: a CPU attention worker SIGKILLed in the middle of BE work, and the runtime
process SIGKILLed under load. Nothing hangs: every request ends, with an explicit error where it was hit;
LS requests do not notice a worker death; a replacement worker (or a restarted runtime) serves again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from piggyback_runtime import metrics as m
from piggyback_runtime.client import free_port, wait_ready
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import Engine
from piggyback_runtime.piggyback.be_path import PiggybackPath
from piggyback_runtime.request import Request, RequestOutput
from tests.runtime.configs import runtime_config
from tests.runtime.helpers import greedy, make_request, run_to_completion, tiny_config

pytestmark = pytest.mark.slow  # kills CPU worker processes and a runtime process

MAX_TOKENS = 12
LS_PROMPTS = [[1, *range(60, 60 + n)] for n in (5, 17)]
BE_PROMPTS = [[1, *range(30, 30 + n)] for n in (9, 23, 40)]  # 40: several chunks of prefill at 16 per step


def _kill_worker_and_wait(pb: PiggybackPath) -> int:
    """SIGKILL worker 0 and return once it is dead, so the engine meets the death deterministically."""
    worker = pb.pool.workers[0]
    pid = worker.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    worker.process.join(timeout=30)
    assert not worker.process.is_alive()
    return pid


def _drain(engine: Engine, max_steps: int = 5_000, max_s: float = 120.0) -> list[RequestOutput]:
    """Step until no work is left: bounded in steps and time, so a hang fails instead of blocking the suite."""
    outputs: list[RequestOutput] = []
    deadline = time.monotonic() + max_s
    for _ in range(max_steps):
        outputs += engine.step()
        if not engine.has_work():
            return outputs
        assert time.monotonic() < deadline, "requests hang after the worker died"
    raise AssertionError("requests hang after the worker died")


def _submit(engine: Engine, tag: str) -> tuple[list[Request], list[Request]]:
    ls = [make_request(f"{tag}-ls{i}", p, greedy(MAX_TOKENS)) for i, p in enumerate(LS_PROMPTS)]
    be = [make_request(f"{tag}-be{i}", p, greedy(MAX_TOKENS), "BE") for i, p in enumerate(BE_PROMPTS)]
    for request in [*be, *ls]:
        engine.add_request(request)
    return ls, be


def _reference_outputs() -> dict[str, list[int]]:
    """Every prompt's greedy tokens from an engine with no fault (request ids without the tag)."""
    engine = Engine(tiny_config(policy="piggyback", max_num_batched_tokens=16))
    try:
        ls, be = _submit(engine, "ref")
        run_to_completion(engine)
        return {r.request_id.removeprefix("ref-"): r.output_token_ids for r in [*ls, *be]}
    finally:
        engine.close()


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    return _reference_outputs()


def _check_recovery(engine: Engine, pb: PiggybackPath, dead_pid: int) -> None:
    """The replacement worker serves new BE requests correctly."""
    assert engine.metrics.cpu_worker_restarts._value.get() == 1
    assert pb.pool.pids()[0] != dead_pid
    later = [make_request(f"later{i}", p, greedy(MAX_TOKENS), "BE") for i, p in enumerate(BE_PROMPTS)]
    for request in later:
        engine.add_request(request)
    _drain(engine)
    assert all(r.finish_reason == "length" and r.error is None for r in later), [r.error for r in later]
    assert pb.host_kv.allocator.num_used == 0 and not pb.residuals and not pb.row_by_slot


def _run_with_kill(pb: PiggybackPath, trigger: str, when: Callable[[], bool]) -> list[int]:
    """Wrap the piggyback path's `trigger` method: the first call for which `when()` holds kills worker 0
    right there, in the middle of that operation (before it runs)."""
    real = getattr(pb, trigger)
    killed: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not killed and when():
            killed.append(_kill_worker_and_wait(pb))
        return real(*args, **kwargs)

    setattr(pb, trigger, wrapper)
    return killed  # the pid killed, once it was


def test_worker_killed_during_be_prefill_kv_offload(reference: dict[str, list[int]]) -> None:
    engine = Engine(tiny_config(policy="piggyback", max_num_batched_tokens=16))
    pb = engine.piggyback
    assert pb is not None
    try:
        ls, be = _submit(engine, "f")
        # Kill when the long BE prompt (several chunks) is half-way through offloading its prefill KV to host
        # memory: some of its layers' KV are written, the rest are not, and other BE rows are in decode.
        long_be = be[-1]  # prefilled last, while the others decode
        killed = _run_with_kill(
            pb, "write_prefill_kv",
            lambda: 0 < long_be.num_computed_tokens < len(long_be.prompt_token_ids) and bool(pb.rows),
        )  # fmt: skip
        outputs = _drain(engine)
        assert killed, "the kill never happened: no BE prefill offload overlapped BE decode"
        failed = {o.request_id: o.error for o in outputs if o.finished and o.finish_reason == "error"}
        # Rows on the dead worker fail explicitly; the request whose prefill was being offloaded was on no
        # worker yet: its KV is in host memory the engine owns, so it completes, with the right tokens.
        assert failed, "no BE request was on the killed worker"
        assert all("worker holding this request died" in (e or "") for e in failed.values()), failed
        for request in be:
            if request.request_id in failed:
                assert request.finish_reason == "error"
            else:
                assert request.finish_reason == "length"
                assert request.output_token_ids == reference[request.request_id.removeprefix("f-")]
        assert long_be.request_id not in failed
        for request in ls:  # LS requests never notice
            assert request.finish_reason == "length"
            assert request.output_token_ids == reference[request.request_id.removeprefix("f-")]
        assert engine.metrics.requests.labels("batch", "BE", m.OUTCOME_FAILED)._value.get() == len(failed)
        _check_recovery(engine, pb, killed[0])
    finally:
        engine.close()


def test_worker_killed_during_be_decode_with_tasks_in_flight(reference: dict[str, list[int]]) -> None:
    engine = Engine(tiny_config(policy="piggyback", max_num_batched_tokens=16))
    pb = engine.piggyback
    assert pb is not None
    try:
        ls, be = _submit(engine, "d")
        # Kill while submitting decode attention, once every BE request is in decode (no hold: the worker is
        # busy with real tasks when it dies) and the LS requests are still running.
        killed = _run_with_kill(
            pb, "submit",
            lambda: len(pb.rows) == len(be) and any(r.finish_reason is None for r in ls),
        )  # fmt: skip
        outputs = _drain(engine)
        assert killed, "the kill never happened"
        failed = {o.request_id: o.error for o in outputs if o.finished and o.finish_reason == "error"}
        assert set(failed) == {r.request_id for r in be}, "every BE row was on the only worker"
        assert all("worker holding this request died" in (e or "") for e in failed.values()), failed
        for request in ls:
            assert request.finish_reason == "length"
            assert request.output_token_ids == reference[request.request_id.removeprefix("d-")]
        _check_recovery(engine, pb, killed[0])
    finally:
        engine.close()


# --- the runtime process killed under load ------------------------------------------------------------------
def _server_config(port: int) -> RuntimeConfig:
    return runtime_config(
        model={"max_model_len": 512},
        policy="piggyback",
        engine={"block_size": 8, "num_kv_blocks": 256, "max_num_batched_tokens": 64, "max_num_seqs": 64},
        piggyback={"num_host_kv_blocks": 256, "host_block_size": 16, "max_be_requests": 32},
        server={"host": "127.0.0.1", "port": port},
    )


def _start(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "piggyback_runtime.cli", "serve", "--config", str(config_path)],
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


async def _stream(client: httpx.AsyncClient, service: str, first_token: asyncio.Event) -> str:
    """One streaming completion; returns "ok" or the class of the explicit error that ended it."""
    body = {"model": service, "prompt": "hello world " * 8, "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    if json.loads(line.removeprefix("data: ")).get("error"):
                        return "error event"
                    first_token.set()
                elif line == "data: [DONE]":
                    return "ok"
        return "stream ended without [DONE]"  # a cut stream is an error too, never a silent success
    except httpx.HTTPError as exc:
        return type(exc).__name__


def test_runtime_killed_under_load_ends_every_request_with_an_error_and_restarts(tmp_path: Path) -> None:
    port = free_port()
    config_path = tmp_path / "runtime.yaml"
    config_path.write_text(_server_config(port).to_yaml())
    log_path = tmp_path / "runtime.log"
    base = f"http://127.0.0.1:{port}"
    process = _start(config_path, log_path)
    try:
        wait_ready(base, process, timeout_s=120)

        async def load() -> list[str]:
            timeout = httpx.Timeout(connect=10.0, read=60.0, write=10.0, pool=10.0)
            async with httpx.AsyncClient(base_url=base, timeout=timeout) as client:
                started = asyncio.Event()
                tasks = [asyncio.create_task(_stream(client, s, started)) for s in ["chat", "batch"] * 6]
                await asyncio.wait_for(started.wait(), timeout=60)  # tokens are flowing
                process.send_signal(signal.SIGKILL)
                # Every request must end on its own, well inside the client's read timeout: none hangs.
                done, pending = await asyncio.wait(tasks, timeout=30)
                for task in pending:
                    task.cancel()
                assert not pending, f"{len(pending)} requests hung after the runtime died"
                return [task.result() for task in done]

        outcomes = asyncio.run(load())
        process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL
        assert len(outcomes) == 12
        # None of the long streams (400 tokens) finished; each ended with an explicit transport error.
        assert "ok" not in outcomes, outcomes
        assert all(o in ("RemoteProtocolError", "ReadError", "stream ended without [DONE]") for o in outcomes), outcomes
        with pytest.raises(httpx.ConnectError):  # and a new request is refused at once, not left waiting
            httpx.get(f"{base}/healthz", timeout=5)

        # Restarted (what the pod's restart does), the runtime serves again on the same port.
        process = _start(config_path, log_path)
        wait_ready(base, process, timeout_s=120)
        for service in ("chat", "batch"):
            body = {"model": service, "prompt": "hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            reply = httpx.post(f"{base}/v1/completions", timeout=60, json=body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 8
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
