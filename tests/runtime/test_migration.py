"""Live migration between real `piggyback serve` processes on loopback (migration.py, server/internal.py).

Specification:
- A greedy request migrated mid-decode, with its KV, continues on the target token for token as it would have
  without migrating: LS (accelerator KV) and BE (host KV on the CPU path).
- A failed migration leaves the request running on the source: a target that refuses (no room) and a target
  that is not there both answer with an explicit outcome, and the request completes on the source, unchanged.
- The source frees the request's KV only once the target confirmed: after a refusal the source still holds
  it (it keeps decoding); after a success it holds nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from piggyback_runtime.client import free_port, wait_ready
from tests.runtime.configs import runtime_config_dict

pytestmark = pytest.mark.slow  # real runtime processes

MAX_TOKENS = 160
PROMPT = [5, 17, 42, 8, 99, 3, 61, 7]


TOKEN = "internal-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def runtime_config(port: int, max_model_len: int) -> dict[str, Any]:
    return runtime_config_dict(
        model={"max_model_len": max_model_len},
        policy="piggyback",
        engine={"block_size": 16, "num_kv_blocks": 256, "max_num_batched_tokens": 64, "max_num_seqs": 64},
        # Host blocks of another size than the accelerator's: KV moves by position, not by block.
        piggyback={"host_block_size": 8, "num_host_kv_blocks": 512, "max_be_requests": 4, "num_cpu_workers": 1,
                   "cpu_threads_per_worker": 1},
        slo_control={"enabled": False},
        server={"host": "127.0.0.1", "port": port, "drain_timeout_s": 1.0},
    )  # fmt: skip


class Replica:
    """A `piggyback serve` process; `ensure_running` restarts it on the same port after a test killed it."""

    def __init__(self, tmp: Path, name: str, max_model_len: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / f"{name}.json"  # JSON is YAML
        self.config.write_text(json.dumps(runtime_config(self.port, max_model_len)))
        self.log_path = tmp / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "piggyback_runtime.cli", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PIGGYBACK_INTERNAL_TOKEN": TOKEN},
            )  # fmt: skip

    def wait(self) -> Replica:
        assert self.process is not None
        wait_ready(self.url, self.process, timeout_s=120)
        return self

    def ensure_running(self) -> Replica:
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def load(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/internal/v1/load", headers=AUTH, timeout=5).json()


_POOL: list[Replica] = []


def shared_pool() -> list[Replica]:
    """Two replicas for every migration and router test of the session (starting one costs seconds):
    `a` (max_model_len 1024) and `b` (max_model_len 256: it refuses to import a request longer than that)."""
    if not _POOL:
        tmp = Path(tempfile.mkdtemp(prefix="piggyback-pool-"))
        _POOL.extend([Replica(tmp, "a", 1024), Replica(tmp, "b", 256)])  # start together, wait together
        atexit.register(lambda: [r.kill() for r in _POOL])
    return [r.ensure_running() for r in _POOL]


@pytest.fixture
def replicas() -> list[Replica]:
    return shared_pool()


def body(model: str, request_id: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {"kind": "completions", "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "request_id": request_id}  # fmt: skip


def read_stream(url: str, method: str, payload: dict[str, Any] | None, lines: list[dict[str, Any]],
                progress: threading.Event | None = None, after_tokens: int = 0) -> None:  # fmt: skip
    with httpx.stream(method, url, json=payload, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for raw in response.iter_lines():
            if raw:
                lines.append(json.loads(raw))
                if progress is not None and sum(len(x.get("token_ids", [])) for x in lines) >= after_tokens:
                    progress.set()


def tokens(lines: list[dict[str, Any]]) -> list[int]:
    return [t for line in lines for t in line.get("token_ids", [])]


def run_plain(replica: Replica, model: str, request_id: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    lines: list[dict[str, Any]] = []
    read_stream(f"{replica.url}/internal/v1/generate", "POST", body(model, request_id, max_tokens), lines)
    assert lines[-1]["finished"] and lines[-1]["finish_reason"] == "length"
    return tokens(lines)


def start_and_migrate(source: Replica, target_url: str, model: str, request_id: str, max_tokens: int = MAX_TOKENS
                      ) -> tuple[list[dict[str, Any]], httpx.Response, threading.Thread]:  # fmt: skip
    """Start a request on `source`, migrate it to `target_url` after its 8th token; the reader keeps reading."""
    lines: list[dict[str, Any]] = []
    progress = threading.Event()
    url = f"{source.url}/internal/v1/generate"
    reader = threading.Thread(target=read_stream, args=(url, "POST", body(model, request_id, max_tokens), lines,
                                                        progress, 8))  # fmt: skip
    reader.start()
    assert progress.wait(30), "the request produced no tokens"
    answer = httpx.post(f"{source.url}/internal/v1/requests/{request_id}/migrate", json={"target": target_url},
                        headers=AUTH, timeout=30)  # fmt: skip
    return lines, answer, reader


@pytest.mark.parametrize("model", ["chat", "batch"])
def test_greedy_request_migrated_mid_decode_continues_token_for_token(replicas: list[Replica], model: str) -> None:
    a, b = replicas
    expected = run_plain(a, model, f"plain-{model}")
    assert len(expected) == MAX_TOKENS

    lines, answer, reader = start_and_migrate(a, b.url, model, f"moved-{model}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "migrated" and answer.json()["kv_bytes"] > 0
    reader.join(30)
    assert lines[-1] == {"request_id": f"moved-{model}", "migrated_to": b.url}
    before = tokens(lines)
    assert 8 <= len(before) < MAX_TOKENS, "the migration must happen mid-decode for this test to mean anything"

    after: list[dict[str, Any]] = []
    read_stream(f"{b.url}/internal/v1/requests/moved-{model}/stream", "GET", None, after)
    assert after[-1]["finished"] and after[-1]["finish_reason"] == "length"
    assert before + tokens(after) == expected
    assert after[-1]["num_output_tokens"] == MAX_TOKENS
    # The source freed the request's KV when the target confirmed: it holds nothing now.
    assert a.load()["running"] == 0 and b.load()["running"] == 0


LONG_TOKENS = 300  # longer than b's max_model_len (256): b refuses to import it


@pytest.mark.parametrize("target", ["refusing", "absent"])
def test_failed_migration_leaves_the_request_running_on_the_source(replicas: list[Replica], target: str) -> None:
    a, b = replicas
    expected = run_plain(a, "chat", f"plain-stay-{target}", LONG_TOKENS)
    target_url = b.url if target == "refusing" else f"http://127.0.0.1:{free_port()}"
    lines, answer, reader = start_and_migrate(a, target_url, "chat", f"stay-{target}", LONG_TOKENS)
    status, outcome = (409, "refused") if target == "refusing" else (502, "failed")
    assert answer.status_code == status and answer.json()["outcome"] == outcome, answer.text
    reader.join(20)  # well before FROZEN_TIMEOUT_S (30 s): resumed at once, not by the timeout
    assert not reader.is_alive(), "the request must go on decoding on the source right after the failure"
    assert lines[-1]["finished"] and lines[-1]["finish_reason"] == "length", lines[-1]
    assert tokens(lines) == expected  # resumed where it was, nothing lost or repeated
    assert b.load()["running"] == 0  # the refusing target kept nothing


def test_migrating_an_unknown_request_is_an_explicit_409(replicas: list[Replica]) -> None:
    a, b = replicas
    answer = httpx.post(f"{a.url}/internal/v1/requests/nobody/migrate", json={"target": b.url}, headers=AUTH,
                        timeout=10)  # fmt: skip
    assert answer.status_code == 409 and answer.json()["outcome"] == "not_ready"
    assert httpx.get(f"{b.url}/internal/v1/requests/nobody/stream", headers=AUTH, timeout=10).status_code == 404


def test_internal_endpoints_need_the_internal_token(replicas: list[Replica]) -> None:
    a, _ = replicas
    assert httpx.get(f"{a.url}/internal/v1/load", timeout=5).status_code == 401
    wrong = {"authorization": "Bearer not-the-token"}
    refused = httpx.post(f"{a.url}/internal/v1/generate", json=body("chat", "x"), headers=wrong, timeout=5)
    assert refused.status_code == 401
    assert a.load()["running"] == 0


# --- in-process: the engine side of a migration (no HTTP) ------------------------------------------------------
def test_in_process_export_import_continues_exactly_and_abort_while_frozen_frees_everything() -> None:
    from piggyback_runtime.engine import Engine
    from piggyback_runtime.migration import Migrator
    from piggyback_runtime.request import FINISH_ABORT
    from tests.runtime.helpers import greedy, make_request, run_to_completion, tiny_config

    source, target = Engine(tiny_config()), Engine(tiny_config())
    plain = make_request("plain", PROMPT, greedy(24))
    source.add_request(plain)
    run_to_completion(source)

    moving = make_request("moving", PROMPT, greedy(24))
    source.add_request(moving)
    while len(moving.output_token_ids) < 6:
        source.step()
    header, payload = Migrator(source, source.metrics).export("moving")
    assert moving not in source.scheduler.running  # frozen: no longer scheduled, KV kept until commit
    assert source.allocator.blocks_of("moving")
    imported = Migrator(target, target.metrics).import_request(header, payload)
    run_to_completion(target)
    assert imported.output_token_ids == plain.output_token_ids

    frozen = make_request("frozen", PROMPT, greedy(24))
    source.add_request(frozen)
    while len(frozen.output_token_ids) < 3:
        source.step()
    migrator = Migrator(source, source.metrics)
    migrator.export("frozen")
    assert source.abort("frozen").finish_reason == FINISH_ABORT  # the client went away mid-migration
    assert migrator.resume("frozen") is False  # not brought back to life
    assert migrator.commit("frozen") is None
    assert source.allocator.blocks_of("frozen") == [] and not source.has_work()


def test_an_imported_stream_nobody_reads_is_released_and_its_request_aborted() -> None:
    """A generator that never started skips its `finally` when closed, so an unread attach() (an import whose
    stream is never picked up, or whose import failed) must be undone explicitly: no registration left, and
    the request aborted when it did enter the engine."""
    import asyncio

    from piggyback_runtime.engine import Engine
    from piggyback_runtime.server.async_engine import AsyncEngine
    from tests.runtime.helpers import tiny_config

    engine = AsyncEngine(Engine(tiny_config()))  # not started: posted commands stay queued for inspection

    async def attach_and_detach() -> None:
        engine.attach("picked-up-never")
        engine.attach("import-failed")
        engine.detach("picked-up-never", abort=True)
        engine.detach("import-failed", abort=False)

    asyncio.run(attach_and_detach())
    assert engine._streams == {}
    posted = []
    while not engine._commands.empty():
        posted.append(engine._commands.get_nowait())
    assert posted == [("abort", "picked-up-never")]
