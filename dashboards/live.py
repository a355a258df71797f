"""A live stack for the dashboards: a real `piggyback serve` under mixed load, the operator's metrics, Prometheus.

Used by the Prometheus-backed tests and by `python dashboards/render.py --demo`:

- the runtime is a real `piggyback serve` process on loopback (synthetic tiny model, one LS and one BE
  service, policy piggyback with SLO control), driven by the demo's Poisson LS / closed-loop BE load, and a
  few LS requests more through a real `piggyback router` (lengthAware over two addresses of the one runtime,
  stages far above the requests' lengths so that nothing migrates, re-planning every second);
- the operator's metrics are its real registry (`piggyback_operator.telemetry.REGISTRY`) served over HTTP the
  way `piggyback-operator run --metrics-port` serves it. No Kubernetes API server is involved, so the handlers
  do not run: the test records what they record (conditions of an admitted LS service and of a BE service
  waiting for host memory, its admission retries every few seconds) and, each second, what the `observe` timer
  records after scraping the real runtime with the operator's own `PoolScraper`;
- Prometheus is Debian's `prometheus` binary on loopback with a generated config (1 s scrapes, temporary
  storage) that loads dashboards/rules/piggyback-rules.yaml.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from piggyback_runtime.client import free_port, start_server, wait_ready
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.demo import drive_load

RULES_FILE = Path(__file__).resolve().parent / "rules" / "piggyback-rules.yaml"
NAMESPACE = "serving"  # what a PodMonitor would attach to the runtime's series
POOL = "tiny-llama"
RUNTIME_POD = "piggyback-chat-0"
ROUTER_POD = "tiny-llama-router-0"
ROUTED_LS_RATE_PER_S = 0.5  # LS requests/s sent through the router, on top of the load on the runtime itself
INSTALL_HINT = "install Prometheus: `apt-get install prometheus` (or `make setup` as root)"


def missing_prometheus() -> str | None:
    """Why the Prometheus-backed checks cannot run here, or None."""
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not on PATH: {INSTALL_HINT}" if missing else None


# The tests' LS SLO: tight enough for the tiny model on a busy CPU to miss some requests (so violation and
# rejection panels have data). The rendered demo uses a looser one, closer to what a user would set.
TEST_SLO_MS = (150.0, 15.0)


def runtime_config(
    port: int, ttft_slo_ms: float = TEST_SLO_MS[0], tpot_slo_ms: float = TEST_SLO_MS[1]
) -> RuntimeConfig:
    """One LS and one BE service of the tiny model; a BE queue small enough that a BE burst gets 429s."""
    return RuntimeConfig.from_dict({
        "model": {"uri": "synthetic://tiny-llama", "max_model_len": 1024},
        "device": "cpu",
        "services": [
            {"name": "chat", "class": "LS",
             "slo": {"ttft_ms": ttft_slo_ms, "tpot_ms": tpot_slo_ms, "attainment_target": 0.9}},
            {"name": "batch", "class": "BE"},
        ],
        "engine": {"block_size": 16, "num_kv_blocks": 512, "max_num_batched_tokens": 128, "max_num_seqs": 128,
                   "policy": "piggyback"},
        "piggyback": {"host_block_size": 16, "num_host_kv_blocks": 96, "max_be_requests": 4, "num_cpu_workers": 1,
                      "cpu_threads_per_worker": 1},
        "slo_control": {"max_be_queue": 2},
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 1},
        "metrics": {"attainment_window_s": 60},
    })  # fmt: skip


def fill_operator_telemetry() -> None:
    """What the operator records for a pool with an admitted LS service and a BE service waiting for memory."""
    from piggyback_operator import telemetry as t

    ready = [("Admitted", "True", "Admitted"), ("Placed", "True", "Placed"), ("RuntimeReady", "True", "Ready"),
             ("SLOMet", "True", "SLOMet"), ("Ready", "True", "Ready")]  # fmt: skip
    waiting = [("Admitted", "False", "InsufficientHostMemory"), ("Placed", "False", "NotAdmitted"),
               ("RuntimeReady", "False", "NotAdmitted"), ("SLOMet", "Unknown", "NotAdmitted"),
               ("Ready", "False", "InsufficientHostMemory")]  # fmt: skip
    t.record_conditions(NAMESPACE, "chat", [{"type": c, "status": s, "reason": r} for c, s, r in ready])
    t.record_conditions(NAMESPACE, "batch", [{"type": c, "status": s, "reason": r} for c, s, r in waiting])
    t.POOL_REPLICAS.labels(NAMESPACE, POOL).set(1)
    t.RECONCILES.labels("reconcile").inc(2)  # the create handler, once per service
    t.ADMISSION_DECISIONS.labels("LS", "admitted", "Admitted").inc()
    t.ADMISSION_DECISIONS.labels("BE", "rejected", "InsufficientHostMemory").inc()
    t.RECONCILE_ERRORS.labels("reconcile", "temporary").inc()  # not admitted: kopf retries it later


async def operator_observe_loop(runtime_endpoint: str, deadline_s: float, retry_every_s: float = 5.0) -> None:
    """Until `deadline_s` (time.monotonic): the observe timer's telemetry each second, with real scrapes of the
    runtime, and the waiting BE service's admission retry (a temporary error) every `retry_every_s`."""
    from piggyback_operator import telemetry as t
    from piggyback_operator.scrape import PoolScraper

    scraper = PoolScraper(min_interval_s=0.5)
    next_retry_s = time.monotonic() + retry_every_s
    try:
        while time.monotonic() < deadline_s:
            t.RECONCILES.labels("observe").inc(2)  # the timer runs per service: chat and batch
            figures = await scraper.figures(POOL, [runtime_endpoint])
            t.SCRAPES.labels("ok").inc(figures.pods)
            t.SCRAPES.labels("error").inc(len(figures.errors))
            chat = figures.service("chat")
            if chat is not None and chat.attainment is not None:
                t.SLO_ATTAINMENT.labels(NAMESPACE, "chat").set(chat.attainment)
            if time.monotonic() >= next_retry_s:
                next_retry_s += retry_every_s
                t.RECONCILES.labels("reconcile").inc()
                t.ADMISSION_DECISIONS.labels("BE", "rejected", "InsufficientHostMemory").inc()
                t.RECONCILE_ERRORS.labels("reconcile", "temporary").inc()
            await asyncio.sleep(1.0)
    finally:
        await scraper.close()


async def _load_and_observe(runtime_url: str, load_s: float, ls_rate_per_s: float, be_concurrency: int,
                            router_url: str) -> int:  # fmt: skip
    """The load on the runtime directly, a few LS requests more through the router (a second client), while the
    operator observes the runtime."""
    deadline_s = time.monotonic() + load_s
    result, routed, _ = await asyncio.gather(
        drive_load(runtime_url, load_s, ls_rate_per_s, be_concurrency, progress=False),
        drive_load(router_url, load_s, ROUTED_LS_RATE_PER_S, 0, seed=1, progress=False),
        operator_observe_loop(runtime_url.removeprefix("http://"), deadline_s),
    )
    return len(result.records) + len(routed.records)


def serve_operator_metrics() -> int:
    """Serve the operator's registry on a free loopback port, as `piggyback-operator run` does; returns the port."""
    from prometheus_client import start_http_server

    from piggyback_operator.telemetry import REGISTRY

    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=REGISTRY)
    return port


def start_router(runtime_port: int, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The pool router in front of the runtime, as `piggyback router` under the operator. It polls the replicas'
    load once a second (not 0.2 s): on a small machine faster polls take enough CPU from the runtime for its LS
    admission to reject most LS requests, and the TTFT panels would have nothing to show."""
    endpoints = f"http://127.0.0.1:{runtime_port},http://localhost:{runtime_port}"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "piggyback_runtime.cli", "router", "--pool-endpoints", endpoints,
             "--policy", "lengthAware", "--stage-boundaries", "100000", "--refine-interval-s", "0",
             "--replan-interval-s", "1", "--poll-interval-s", "1", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def prometheus_config(runtime_port: int, operator_port: int, router_port: int) -> dict[str, Any]:
    """Scrape jobs and target labels as the PodMonitor and ServiceMonitor give them (dashboards/build.py)."""
    pod = {"namespace": NAMESPACE, "pool": POOL}
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            {"job_name": "piggyback-runtime", "static_configs": [
                {"targets": [f"127.0.0.1:{runtime_port}"], "labels": {**pod, "pod": RUNTIME_POD}}]},
            {"job_name": "piggyback-router", "static_configs": [
                {"targets": [f"127.0.0.1:{router_port}"], "labels": {**pod, "pod": ROUTER_POD}}]},
            # As the ServiceMonitor: the operator's series keep the LLMService's namespace label.
            {"job_name": "piggyback-operator", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
        ],
    }  # fmt: skip


@dataclass
class LiveStack:
    prometheus_url: str
    runtime_url: str
    load_started_s: float  # time.time()
    load_ended_s: float
    requests_sent: int

    def query(self, expr: str, at_s: float | None = None) -> list[dict[str, Any]]:
        """Instant query; raises with Prometheus' own error text when the expression does not parse or evaluate."""
        params: dict[str, Any] = {"query": expr}
        if at_s is not None:
            params["time"] = at_s
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus rejected {expr!r}: {body.get('errorType')}: {body.get('error')}")
        return list(body["data"]["result"])

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": start_s, "end": end_s, "step": step_s}
        body = httpx.get(f"{self.prometheus_url}/api/v1/query_range", params=params, timeout=60).json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus rejected {expr!r}: {body.get('errorType')}: {body.get('error')}")
        return list(body["data"]["result"])

    def get(self, path: str, **params: Any) -> Any:
        body = httpx.get(f"{self.prometheus_url}{path}", params=params, timeout=30).json()
        if body.get("status") != "success":
            raise ValueError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]


def _wait_scraped(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Until Prometheus reports every target up (it scrapes every second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            targets = httpx.get(f"{url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
            if len(targets) == 3 and all(t["health"] == "up" for t in targets):
                return
        time.sleep(0.25)
    raise TimeoutError(f"Prometheus did not scrape all three targets within {timeout_s:.0f}s:\n"
                       f"{log.read_text()[-3000:]}")


def _wait_rules_evaluated(url: str, after_s: float, timeout_s: float) -> None:
    """Until every rule group has been evaluated since `after_s` (Unix time; 0: at least once)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            groups = httpx.get(f"{url}/api/v1/rules", timeout=2).json()["data"]["groups"]
            stamps = [g.get("lastEvaluation", "") for g in groups]
            if groups and all(s and not s.startswith("0001") and _unix_s(s) > after_s for s in stamps):
                return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus did not evaluate every rule group within {timeout_s:.0f}s")


def _unix_s(rfc3339: str) -> float:
    """Prometheus' RFC 3339 timestamps (nanosecond fractions, Z) as Unix seconds."""
    from datetime import datetime

    head, _, fraction = rfc3339.rstrip("Z").partition(".")
    whole = datetime.fromisoformat(head + "+00:00").timestamp()
    return whole + float(f"0.{fraction}") if fraction else whole


# A first start on a fresh machine builds the CPU attention kernel and profiles the latency model: minutes
# where the machine is busy. Readiness is what is waited for, so a generous bound costs nothing when it is quick.
STARTUP_TIMEOUT_S = 420.0

@contextlib.contextmanager
def live_stack(
    load_s: float,
    ls_rate_per_s: float = 4.0,
    be_concurrency: int = 8,
    settle_s: float = 3.0,
    slo_ms: tuple[float, float] = TEST_SLO_MS,
    workdir: Path | None = None,
) -> Iterator[LiveStack]:
    """Start everything, drive `load_s` seconds of mixed load, let Prometheus scrape the end, then yield."""
    reason = missing_prometheus()
    if reason:
        raise RuntimeError(reason)
    with contextlib.ExitStack() as stack:
        tmp = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="piggyback-dashboards-")))
        runtime_port = free_port()
        config = runtime_config(runtime_port, *slo_ms)
        runtime_log = tmp / "runtime.log"
        runtime = start_server(config, tmp, runtime_log)
        stack.callback(lambda: (runtime.terminate(), runtime.wait(timeout=30)))
        router_port = free_port()
        router_log = tmp / "router.log"
        router = start_router(runtime_port, router_port, router_log)
        stack.callback(lambda: (router.terminate(), router.wait(timeout=30)))
        fill_operator_telemetry()
        operator_port = serve_operator_metrics()

        prometheus_port = free_port()
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(prometheus_config(runtime_port, operator_port, router_port)))
        prometheus_log = tmp / "prometheus.log"
        with prometheus_log.open("wb") as log_file:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}", "--storage.tsdb.retention.time=1d"],
                stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        stack.callback(lambda: (prometheus.terminate(), prometheus.wait(timeout=30)))
        runtime_url = f"http://127.0.0.1:{runtime_port}"
        router_url = f"http://127.0.0.1:{router_port}"
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        try:
            wait_ready(runtime_url, runtime, timeout_s=STARTUP_TIMEOUT_S)
            wait_ready(router_url, router, timeout_s=60)
            _wait_scraped(prometheus_url, prometheus, prometheus_log, timeout_s=30)
        except Exception as exc:
            raise RuntimeError(f"{exc}\nruntime log:\n{runtime_log.read_text()[-3000:]}\nrouter log:\n"
                               f"{router_log.read_text()[-2000:]}") from exc
        # Every target has now been scraped once. Rules over other rules' recorded series (the error budget over
        # the recorded target) read nothing until a group evaluation that starts after this scrape: one that ran
        # while the runtime was still starting recorded nothing, and the next comes up to 30 s later (the rule
        # groups' interval). Wait for it before the load, whose rates the panels' short windows must still see.
        _wait_rules_evaluated(prometheus_url, time.time(), timeout_s=45)
        started = time.time()
        requests_sent = asyncio.run(_load_and_observe(runtime_url, load_s, ls_rate_per_s, be_concurrency,
                                                      router_url))  # fmt: skip
        ended = time.time()
        time.sleep(settle_s)  # a few more scrapes after the last request
        yield LiveStack(prometheus_url, runtime_url, started, ended, requests_sent)
