"""Two runtimes drain one batch from a shared Postgres queue; one is killed with SIGKILL mid-batch and the other
takes over its lines once their leases time out. Every line is in the output exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from piggyback_runtime import metrics as m
from piggyback_runtime.client import free_port, start_server, wait_ready
from tests.runtime.batch_helpers import TORCH_ATTENTION, batch_config, chat_line, jsonl, parse_jsonl
from tests.runtime.postgres_fixture import postgres_server

pytestmark = pytest.mark.slow
LINES = 600
LEASE_TIMEOUT_S = 3.0


@pytest.fixture
def database_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def start(workdir: Path, url: str, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = batch_config(port, {"database_url": url, "lease_timeout_s": LEASE_TIMEOUT_S, "poll_interval_s": 0.1,
                                 "max_inflight_lines": 32})  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(*TORCH_ATTENTION)
        process = start_server(config, workdir, workdir / f"{name}.log")
    return process, f"http://127.0.0.1:{port}"


async def line_rows(url: str, batch_id: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return await connection.fetch("SELECT * FROM batch_lines WHERE batch_id = $1 ORDER BY line_no", batch_id)
    finally:
        await connection.close()


def completed_here(base: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text)
    return sum(s.value for f in families if f.name == m.BATCH_LINES_FINISHED for s in f.samples
               if s.name.endswith("_total") and s.labels["line_state"] == "completed")  # fmt: skip


def test_two_replicas_one_killed_every_line_exactly_once(tmp_path: Path, database_url: str) -> None:
    (a, base_a), (b, base_b) = start(tmp_path / "a", database_url, "a"), start(tmp_path / "b", database_url, "b")
    try:
        wait_ready(base_a, a, timeout_s=120)
        wait_ready(base_b, b, timeout_s=120)
        lines = [chat_line(f"pg-{i}", max_tokens=1 + i % 2) for i in range(LINES)]
        # Uploaded through one replica, run by both: the file and the queue live in the database.
        file_id = httpx.post(f"{base_a}/v1/files", files={"file": ("in.jsonl", jsonl(lines))},
                             data={"purpose": "batch"}, timeout=60).json()["id"]  # fmt: skip
        create = {"input_file_id": file_id, "completion_window": "24h", "endpoint": "/v1/chat/completions"}
        batch_id = httpx.post(f"{base_b}/v1/batches", json=create).json()["id"]
        while httpx.get(f"{base_a}/v1/batches/{batch_id}").json()["request_counts"]["completed"] < LINES // 3:
            time.sleep(0.05)
        by_b = completed_here(base_b)
        os.kill(b.pid, signal.SIGKILL)  # with its leases
        b.wait(timeout=30)
        deadline = time.monotonic() + 120
        while (state := httpx.get(f"{base_a}/v1/batches/{batch_id}").json())["status"] != "completed":
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        output = parse_jsonl(httpx.get(f"{base_a}/v1/files/{state['output_file_id']}/content", timeout=30).content)
        by_a = completed_here(base_a)
    finally:
        for process in (a, b):
            process.kill()
            process.wait(timeout=30)
    assert by_b > 0 and by_a < LINES  # both replicas ran lines
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in lines)
    assert state["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
    rows = asyncio.run(line_rows(database_url, batch_id))
    assert {row["state"] for row in rows} == {"completed"}
    assert all(row["attempts"] == row["finished_attempt"] for row in rows)
