"""A real HTTP process on loopback that serves a runtime's /healthz, /readyz and /metrics.

Stand-in for `piggyback serve` until the runtime's server exists: it exports the runtime's metrics through
the runtime's own RuntimeMetrics (so every name comes from piggyback_runtime.metrics), plus the headroom
and host-KV gauges the SLO controller will export. Tests set the figures with POST /control:

    {"headroom": 2.5 | null, "host_kv_free_bytes": ..., "services": {"chat": {"class": "LS",
     "attainment": 0.995, "window": 200, "ttft_s": [0.05, ...], "tpot_s": [...], "tokens": 1000,
     "running": 3, "waiting": 1}}}

`router: {"stages": [[0, 4096], [4096, null]], "replicas": {"http://127.0.0.1:PORT": 0}}` adds a
lengthAware router's stage metrics. `headroom: null` removes the headroom metric (a runtime that does not
export it). Prints `PORT <n>` once listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from piggyback_runtime import metrics as m

_lock = threading.Lock()
_state: dict[str, Any] = {"registry": None}


def build(control: dict[str, Any]) -> CollectorRegistry:
    registry = CollectorRegistry()
    runtime = m.RuntimeMetrics(registry)
    for name, figures in (control.get("services") or {}).items():
        cls = figures.get("class", "LS")
        for value in figures.get("ttft_s", []):
            runtime.ttft.labels(name, cls).observe(value)
        for value in figures.get("tpot_s", []):
            runtime.request_tpot.labels(name, cls).observe(value)
        if "tokens" in figures:
            runtime.generation_tokens.labels(name, cls).inc(figures["tokens"])
        runtime.num_running.labels(name, cls).set(figures.get("running", 0))
        runtime.num_waiting.labels(name, cls).set(figures.get("waiting", 0))
        if cls == "LS":
            runtime.slo_attainment.labels(name).set(figures.get("attainment", 1.0))
            runtime.slo_window_requests.labels(name).set(figures.get("window", 0))
    router = control.get("router")
    if router:  # a lengthAware router: its stages ([lower, upper|null]) and each replica URL's stage index
        metrics = m.RouterMetrics(registry)
        for index, (lower, upper) in enumerate(router["stages"]):
            metrics.stage_lower_tokens.labels(str(index)).set(lower)
            if upper is not None:
                metrics.stage_upper_tokens.labels(str(index)).set(upper)
        for replica, index in router["replicas"].items():
            metrics.replica_queue.labels(replica, str(index)).set(0)
    for name, key in ((m.LS_HEADROOM_RPS, "headroom"), (m.HOST_KV_FREE_BYTES, "host_kv_free_bytes")):
        if control.get(key) is None:
            continue
        # RuntimeMetrics may already define the gauge (the runtime grows); otherwise export it here.
        gauge = registry._names_to_collectors.get(name) or Gauge(name, f"{key} (fake runtime)", registry=registry)
        gauge.set(control[key])
    return registry


class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/healthz", "/readyz"):
            self._send(200, b"ok")
        elif self.path == "/metrics":
            with _lock:
                body = generate_latest(_state["registry"])
            self._send(200, body, "text/plain; version=0.0.4")
        else:
            self._send(404, b"not found")

    def do_POST(self) -> None:
        if self.path != "/control":
            self._send(404, b"not found")
            return
        control = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with _lock:
            _state["registry"] = build(control)
        self._send(200, b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test output is the operator's


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    _state["registry"] = build({})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
