"""Bounded graceful drain: a real `piggyback serve` process on loopback, sent SIGTERM mid-stream.

On SIGTERM: readiness fails at once (503), new requests get 503 with `Retry-After` in the OpenAI envelope,
requests in flight get `server.drain_timeout_s` to finish (a short LS stream does), the ones that cannot
(a long BE stream, a long non-streaming request) end with an explicit retryable error (an SSE error event
then `[DONE]`; a 503 with `Retry-After`), and the process exits 0 well before drain_timeout_s + 5 s.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from piggyback_runtime.client import free_port, wait_ready
from piggyback_runtime.config import RuntimeConfig
from tests.runtime.configs import runtime_config

DRAIN_S = 2.0
LONG = 1900  # tokens: far more than the tiny model makes in DRAIN_S on any machine (the test checks)


def _config(port: int) -> RuntimeConfig:
    return runtime_config(
        model={"max_model_len": 2048},
        # Policy piggyback: the BE requests cut off run on the CPU worker path (host KV), as in production.
        policy="piggyback",
        engine={"block_size": 16, "num_kv_blocks": 512, "max_num_batched_tokens": 64, "max_num_seqs": 64},
        piggyback={"host_block_size": 16, "num_host_kv_blocks": 512, "max_be_requests": 4, "num_cpu_workers": 1,
                   "cpu_threads_per_worker": 1},
        slo_control={"enabled": False},
        server={"host": "127.0.0.1", "port": port, "drain_timeout_s": DRAIN_S},
    )  # fmt: skip


def _stream(base: str, body: dict[str, Any], events: list[str], first: threading.Event) -> None:
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                events.append(line.removeprefix("data: "))
                first.set()


def _payloads(events: list[str]) -> list[dict[str, Any]]:
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.slow
def test_sigterm_drains_within_the_bound(tmp_path: Path) -> None:
    port = free_port()
    config_path = tmp_path / "runtime.yaml"
    config_path.write_text(_config(port).to_yaml())
    log_path = tmp_path / "runtime.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "piggyback_runtime.cli", "serve", "--config",
                                    str(config_path)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, timeout_s=120)
        long_body = {"model": "batch", "prompt": "write a very long story", "max_tokens": LONG, "ignore_eos": True,
                     "temperature": 0}  # fmt: skip
        # In flight at SIGTERM: a long BE stream, a long non-streaming BE request, and a short LS stream.
        be_events: list[str] = []
        be_started = threading.Event()
        be_stream = threading.Thread(target=_stream, args=(base, long_body, be_events, be_started))
        be_stream.start()
        non_streaming: list[httpx.Response] = []
        be_blocking = threading.Thread(
            target=lambda: non_streaming.append(httpx.post(f"{base}/v1/completions", json=long_body, timeout=60))
        )
        be_blocking.start()
        assert be_started.wait(60), "the BE stream never started"
        ls_events: list[str] = []
        ls_started = threading.Event()
        ls_body = {"model": "chat", "prompt": "hi", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
        ls_stream = threading.Thread(target=_stream, args=(base, ls_body, ls_events, ls_started))
        ls_stream.start()
        assert ls_started.wait(60), "the LS stream never started"

        process.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()

        # Readiness fails at once; liveness does not (the kubelet must not kill a draining pod).
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 503 and "draining" in ready.json()["reason"]
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        # A new request: 503, Retry-After, the OpenAI envelope.
        refused = httpx.post(f"{base}/v1/chat/completions", timeout=5,
                             json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "draining"
        assert refused.json()["error"]["type"] == "service_unavailable"

        returncode = process.wait(timeout=DRAIN_S + 5)
        exited_after = time.monotonic() - sigterm_at
        for thread in (be_stream, be_blocking, ls_stream):
            thread.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log_text = log_path.read_text(errors="replace")
    assert returncode == 0, log_text[-3000:]
    assert DRAIN_S <= exited_after < DRAIN_S + 5, f"exited {exited_after:.1f} s after SIGTERM"

    # The short LS stream finished normally inside the drain.
    ls = _payloads(ls_events)
    assert not any("error" in p for p in ls)
    assert ls[-1]["choices"][0]["finish_reason"] == "length"

    # The long BE stream: text, then an explicit retryable error event, then [DONE].
    be = _payloads(be_events)
    assert "error" in be[-1], be[-1]
    assert be[-1]["error"]["code"] == "draining" and be[-1]["error"]["type"] == "service_unavailable"
    assert "retry" in be[-1]["error"]["message"]
    streamed_text = "".join(p["choices"][0]["text"] for p in be[:-1] if p.get("choices"))
    assert streamed_text, "the BE stream produced nothing before the drain cut it"
    assert not any("finish_reason" in p.get("choices", [{}])[0] and p["choices"][0]["finish_reason"] for p in be[:-1])

    # The long non-streaming request: a 503 with Retry-After, not a 500.
    (blocked,) = non_streaming
    assert blocked.status_code == 503, blocked.text
    assert int(blocked.headers["retry-after"]) >= 1
    assert blocked.json()["error"]["code"] == "draining"
