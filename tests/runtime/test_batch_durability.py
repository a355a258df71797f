"""Exactly once across crashes: a 2,000-line batch whose runtime is killed with SIGKILL twice, at random points,
and restarted on the same directory. Every input line is in the output exactly once, and no line that had
finished ran again (its lease count is the one that recorded it)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from piggyback_runtime.client import free_port, start_server, wait_ready
from tests.runtime.batch_helpers import TORCH_ATTENTION, batch_config, chat_line, jsonl, parse_jsonl, sqlite_lines

pytestmark = pytest.mark.slow
LINES = 2000
MAX_INFLIGHT = 64


def start(workdir: Path, directory: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = batch_config(port, {"directory": str(directory), "max_inflight_lines": MAX_INFLIGHT,
                                 "poll_interval_s": 0.1})  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv(*TORCH_ATTENTION)
        process = start_server(config, workdir, workdir / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, process, timeout_s=120)
    return process, base


def batch_state(base: str, batch_id: str) -> dict:
    return httpx.get(f"{base}/v1/batches/{batch_id}", timeout=10).json()


def kill_when(process: subprocess.Popen[bytes], base: str, batch_id: str, completed_at_least: int) -> int:
    """SIGKILL the runtime once the batch has this many lines completed; returns the count seen."""
    while True:
        state = batch_state(base, batch_id)
        if state["request_counts"]["completed"] >= completed_at_least or state["status"] != "in_progress":
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            return int(state["request_counts"]["completed"])
        time.sleep(0.02)


def test_sigkill_twice_mid_batch_every_line_exactly_once(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    directory = tmp_path / "batch"
    lines = [chat_line(f"line-{i}", max_tokens=1 + i % 2) for i in range(LINES)]
    process, base = start(tmp_path, directory, "first")
    try:
        file_id = httpx.post(f"{base}/v1/files", files={"file": ("in.jsonl", jsonl(lines))},
                             data={"purpose": "batch"}, timeout=60).json()["id"]  # fmt: skip
        batch_id = httpx.post(f"{base}/v1/batches", json={"input_file_id": file_id, "completion_window": "24h",
                                                          "endpoint": "/v1/chat/completions"}).json()["id"]  # fmt: skip
        seen = [kill_when(process, base, batch_id, rng.randrange(100, 800))]
        process, base = start(tmp_path, directory, "second")
        seen.append(kill_when(process, base, batch_id, rng.randrange(seen[0] + 100, 1800)))
        process, base = start(tmp_path, directory, "third")
        deadline = time.monotonic() + 120
        while (state := batch_state(base, batch_id))["status"] != "completed" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state["status"] == "completed", (seed, seen, state)
        output = parse_jsonl(httpx.get(f"{base}/v1/files/{state['output_file_id']}/content", timeout=30).content)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert state["error_file_id"] is None and state["request_counts"] == {"total": LINES, "completed": LINES,
                                                                          "failed": 0}  # fmt: skip
    # Every line exactly once, each with its own answer.
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in lines), seed
    assert all(line["response"]["status_code"] == 200 for line in output)
    rows = sqlite_lines(directory, batch_id)
    assert {row["state"] for row in rows} == {"completed"}
    # No line ran again once it had finished: the lease that recorded it was its last.
    assert all(row["attempts"] == row["finished_attempt"] for row in rows), seed
    # Only lines in flight at a kill ran twice: at most max_inflight_lines per kill.
    reruns = sum(row["attempts"] - 1 for row in rows)
    assert reruns <= 2 * MAX_INFLIGHT, (seed, seen, reruns)
    assert seen[0] < seen[1] < LINES, (seed, seen)  # both kills landed mid-batch
