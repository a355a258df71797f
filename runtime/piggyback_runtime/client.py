"""A client of a runtime (or router) process: start one, wait until it is ready, stream a completion from it.

The demo, the dashboards' live stack, the benchmarks and the tests that run a real server share these.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Protocol

import httpx

from piggyback_runtime.config import RuntimeConfig


class StreamTiming(Protocol):
    """Where stream_completion writes what it timed (monotonic seconds)."""

    first_token_s: float | None
    last_token_s: float | None
    output_tokens: int


def free_port() -> int:
    """A TCP port on loopback that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# What stream_completion returns for a completed stream and for a 429 at admission.
STREAM_OK, STREAM_REJECTED = "ok", "429"


async def stream_completion(
    client: httpx.AsyncClient, service: str, prompt: str, max_tokens: int, record: StreamTiming
) -> str:
    """Send one streaming completion and time it into `record` (first and last token read, output tokens).

    Returns STREAM_OK, STREAM_REJECTED (429 at admission), or what went wrong: "HTTP <status>", "stream error
    <code>" (the runtime ended the stream with an error event), "stream cut" (no [DONE]), or the transport
    error's type."""
    body = {"model": service, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return STREAM_REJECTED if response.status_code == 429 else f"HTTP {response.status_code}"
            done = False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                    continue
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return f"stream error {chunk['error'].get('code')}"
                now = time.monotonic()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    record.first_token_s = record.first_token_s or now
                    record.last_token_s = now
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
            return STREAM_OK if done else "stream cut"
    except httpx.HTTPError as exc:
        return type(exc).__name__


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]  # `piggyback --log-level`'s choices


def start_server(
    config: RuntimeConfig, workdir: Path, log_path: Path, log_level: LogLevel = "WARNING"
) -> subprocess.Popen[bytes]:
    """`piggyback serve` with `config` (written to workdir/runtime.yaml) as a child process logging to log_path
    at `log_level` (WARNING keeps a long run's log small; a caller that reads INFO lines asks for INFO)."""
    config_path = workdir / "runtime.yaml"
    config_path.write_text(config.to_yaml())
    with log_path.open("wb") as log_file:  # the child holds its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "piggyback_runtime.cli", "--log-level", log_level, "serve", "--config",
             str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


def wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout_s: float = 300.0) -> None:
    """Poll base_url/readyz until it answers 200; fail if `process` exits first or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process serving {base_url} exited with code {process.returncode} before it "
                               "became ready")  # fmt: skip
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{base_url} was not ready after {timeout_s:.0f}s")
