"""SLO-driven admission against real `piggyback serve` processes on loopback, not the fake runtime.

Two runtimes of synthetic://tiny-llama on the CPU, each warmed with a few LS completions so that it exports
real TTFT/TPOT histograms, attainment and the SLO controller's headroom figure:

- `no_room` hosts `chat` and `strict`, an LS service whose TPOT SLO (0.01 ms) no iteration can meet. The
  runtime predicts headroom for the tightest LS SLO it hosts, so it reports 0 req/s, while `chat` (the only
  service with traffic) meets its loose SLO. The operator's refusal then rests on headroom alone: had `chat`
  itself the impossible SLO, it would miss its attainment target and the refusal would name that instead.
- `room` hosts `chat` alone, exactly as the operator renders it, and reports headroom > 0.

The headroom model assumes iterations run at the TPOT target, so its figure shrinks as the TPOT SLO loosens
(about token budget / ((prompt + output tokens) x TPOT)): with a 60 s TPOT it is ~0.06 req/s, hence 1 s here.

The fake-runtime tests (test_admission_slo.py) cover the edge values a real runtime cannot be forced into.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Cluster, eventually, ls_spec
from prometheus_client.parser import text_string_to_metric_families

from piggyback_operator.scrape import quantile
from piggyback_runtime import metrics as m
from piggyback_runtime.client import wait_ready
from piggyback_runtime.config import RuntimeConfig
from tests.runtime.configs import runtime_config as build_runtime_config

# slow: real runtime processes and the operator. The timeout includes starting the runtimes (module fixture)
# in the first test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HEADROOM_INTERVAL_S = 0.2
WARM_UP_REQUESTS = 4
MAX_TOKENS = 8
READY_TIMEOUT_S = 120.0
WAIT_S = 60.0  # eventually(): generous for a loaded 2-core CI machine; only matters on failure
NEW_LOAD_RPS = 0.5  # chat2's expected load: above no_room's headroom (0), below room's (3.3-3.7 observed)

# `chat`'s SLO, the same in the LLMService and in the runtimes: loose enough that every request on a busy
# 2-core machine meets it (measured TPOT is ~5-20 ms), tight enough that the headroom model leaves room.
CHAT_SLO = {"ttft_ms": 60_000.0, "tpot_ms": 1_000.0, "attainment_target": 0.99}
CHAT_SPEC = ls_spec(slo={"ttftMs": 60_000, "tpotMs": 1_000, "attainmentTarget": 0.99},
                    expectedLoad={"requestsPerSecond": NEW_LOAD_RPS})  # fmt: skip
STRICT_SLO = {"ttft_ms": 60_000.0, "tpot_ms": 0.01}  # no iteration is this fast: no headroom


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held at once while chosen, so no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def runtime_config(port: int, services: list[dict[str, Any]], profile_dir: Path) -> RuntimeConfig:
    return build_runtime_config(
        model={"dtype": "float32"},
        services=services,
        engine={"block_size": 8, "num_kv_blocks": 128, "max_num_batched_tokens": 64, "max_num_seqs": 64},
        piggyback={"num_host_kv_blocks": 256, "max_be_requests": 8, "cpu_threads_per_worker": 1},
        # A private profile cache: the latency profile taken here (two runtimes starting at once on 2
        # cores) must not become the one every other test's runtime reads from ~/.cache.
        slo_control={"headroom_interval_s": HEADROOM_INTERVAL_S, "profile_cache_dir": str(profile_dir)},
        # No attainment figure may age out of the window while the scenario runs.
        metrics={"attainment_window_s": 3600},
        server={"host": "127.0.0.1", "port": port},
    )  # fmt: skip


@dataclass
class Figures:
    """What one scrape of a runtime's /metrics says about `chat`, parsed here (not by the operator)."""

    headroom_rps: float | None
    attainment: dict[str, float]
    window_requests: dict[str, float]
    ttft: dict[float, float]  # chat's cumulative buckets: upper bound -> count
    tpot: dict[float, float]


def parse(text: str) -> Figures:
    figures = Figures(None, {}, {}, {}, {})
    histograms = {m.TTFT_SECONDS: figures.ttft, m.REQUEST_TPOT_SECONDS: figures.tpot}
    for family in text_string_to_metric_families(text):
        if family.name == m.LS_HEADROOM_RPS:
            figures.headroom_rps = family.samples[0].value
        elif family.name == m.SLO_ATTAINMENT:
            figures.attainment = {s.labels["model_name"]: s.value for s in family.samples}
        elif family.name == m.SLO_WINDOW_REQUESTS:
            figures.window_requests = {s.labels["model_name"]: s.value for s in family.samples}
        elif family.name in histograms:
            for s in family.samples:
                if s.name.endswith("_bucket") and s.labels.get("model_name") == "chat":
                    histograms[family.name][float(s.labels["le"])] = s.value
    return figures


@dataclass
class RealRuntime:
    name: str
    config: RuntimeConfig
    process: subprocess.Popen[bytes]
    log: Path
    requests: int = 0  # LS completions `chat` finished
    figures: Figures = field(default_factory=lambda: Figures(None, {}, {}, {}, {}))

    @property
    def port(self) -> int:
        return self.config.server.port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self, deadline: float) -> None:
        try:
            wait_ready(self.base, self.process, timeout_s=max(0.0, deadline - time.monotonic()))
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"runtime {self.name}: {exc}:\n{self.log_tail()}")

    def complete(self) -> None:
        body = {"model": "chat", "prompt": f"piggyback warm-up request {self.requests}", "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        response = httpx.post(f"{self.base}/v1/completions", json=body, timeout=60.0)
        assert response.status_code == 200, f"{self.name}: {response.status_code} {response.text}"
        assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
        self.requests += 1

    def scrape(self) -> Figures:
        response = httpx.get(f"{self.base}/metrics", timeout=10.0)
        response.raise_for_status()
        return parse(response.text)

    def warm_up(self) -> None:
        """Finish a few LS requests, then until the runtime exports a headroom figure.

        The runtime recomputes headroom inside engine iterations, at most every headroom_interval_s. The first
        computation (before any LS request finished) has nothing to go on; if every warm-up request finishes
        within that interval, the now idle runtime exports none until an LS request runs after it: so wait
        out the interval and send one more.
        """
        for _ in range(WARM_UP_REQUESTS):
            self.complete()
        deadline = time.monotonic() + WAIT_S
        while (figures := self.scrape()).headroom_rps is None:
            assert time.monotonic() < deadline, f"runtime {self.name} exports no headroom after {self.requests} LS"
            time.sleep(HEADROOM_INTERVAL_S + 0.05)
            self.complete()
        # That figure may predate the last request's finish; the idle runtime then recomputes it with that
        # request in the mix at its next wake-up (at most 0.5 s apart, see AsyncEngine._run). The operator
        # scrapes later, so keep the figures once two scrapes that far apart agree on headroom.
        while True:
            time.sleep(0.5 + HEADROOM_INTERVAL_S + 0.1)
            settled = self.scrape()
            if settled.headroom_rps == figures.headroom_rps:
                break
            assert time.monotonic() < deadline, f"runtime {self.name}: headroom still moving after {WAIT_S} s"
            figures = settled
        self.figures = settled


@dataclass
class Runtimes:
    no_room: RealRuntime
    room: RealRuntime


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtimes]:
    workdir = tmp_path_factory.mktemp("real-runtimes")
    chat = {"name": "chat", "class": "LS", "slo": CHAT_SLO}
    services = {"no_room": [chat, {"name": "strict", "class": "LS", "slo": STRICT_SLO}], "room": [chat]}
    started: list[RealRuntime] = []
    logs = []
    try:
        ports = _free_ports(len(services))
        for (name, hosted), port in zip(services.items(), ports, strict=True):  # start both, then wait for both
            config = runtime_config(port, hosted, workdir / "profiles")
            path = workdir / f"{name}.yaml"
            path.write_text(config.to_yaml())
            log = workdir / f"{name}.log"
            logs.append(out := log.open("wb"))
            process = subprocess.Popen(
                [sys.executable, "-m", "piggyback_runtime.cli", "serve", "--config", str(path)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            started.append(RealRuntime(name, config, process, log))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for runtime in started:
            runtime.wait_ready(deadline)
        for runtime in started:
            runtime.warm_up()
        yield Runtimes(*started)
    finally:
        for runtime in started:
            runtime.process.terminate()
        for runtime in started:
            try:
                runtime.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                runtime.process.kill()
                runtime.process.wait(timeout=15)
        for out in logs:
            out.close()


def test_the_runtimes_report_the_figures_the_scenario_relies_on(runtimes: Runtimes) -> None:
    """Checked here, by scraping /metrics directly, so that the operator scenarios below rest on them."""
    for runtime in (runtimes.no_room, runtimes.room):
        f = runtime.figures
        assert f.attainment["chat"] == 1.0 and f.window_requests["chat"] == runtime.requests, runtime.name
        assert f.ttft[float("inf")] == f.tpot[float("inf")] == runtime.requests, runtime.name
    assert runtimes.no_room.figures.headroom_rps == 0.0
    assert runtimes.no_room.figures.window_requests["strict"] == 0
    assert runtimes.room.figures.headroom_rps is not None and runtimes.room.figures.headroom_rps > NEW_LOAD_RPS


async def serving_chat(cluster: Cluster, runtime: RealRuntime) -> str:
    """A GPU node, an admitted LS service `chat`, and one ready replica whose runtime is `runtime`."""
    await cluster.add_gpu_node("gpu-a", gpus=1)
    await cluster.create("chat", CHAT_SPEC)
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", WAIT_S, "chat admitted")
    pool = cluster.status("chat")["pool"]
    await eventually(lambda: cluster.deployment(pool), WAIT_S, "the pool's Deployment")
    await cluster.run_replicas(pool, node="gpu-a", port=runtime.port)
    return pool


async def test_the_timer_writes_a_real_runtimes_figures_into_status(
    cluster: Cluster, operator: None, runtimes: Runtimes
) -> None:
    no_room = runtimes.no_room
    pool = await serving_chat(cluster, no_room)
    # The runtime serves what the operator renders for the pool, plus `strict`, whose SLO leaves no headroom.
    rendered = RuntimeConfig.from_dict(cluster.runtime_config(pool))
    assert rendered.services == runtimes.room.config.services == no_room.config.services[:1]
    assert rendered.model.uri == no_room.config.model.uri

    measured = await eventually(
        lambda: (s := cluster.status("chat").get("measured") or {}) and "attainment" in s and s, WAIT_S, "figures"
    )
    assert cluster.status("chat")["runtimeEndpoints"] == [f"127.0.0.1:{no_room.port}"]
    assert measured["attainment"] == 1.0
    assert measured["windowRequests"] == no_room.requests
    assert measured["poolHeadroomRequestsPerSecond"] == 0.0
    # p99 of the runtime's real histograms (nothing ran since the warm-up, so the lifetime ones): as the
    # runtime's own buckets give it, and plausible for a tiny model on a CPU (well inside the loose SLO).
    for key, buckets, slo_ms in (("ttftP99Ms", no_room.figures.ttft, CHAT_SLO["ttft_ms"]),
                                 ("tpotP99Ms", no_room.figures.tpot, CHAT_SLO["tpot_ms"])):  # fmt: skip
        expected = quantile(0.99, buckets)
        assert expected is not None
        assert measured[key] == pytest.approx(expected * 1000, abs=1e-3), key
        assert 0 < measured[key] < slo_ms, key
    slo = cluster.condition("chat", "SLOMet")
    assert (slo["status"], slo["reason"]) == ("True", "AttainmentMet")
    assert f"over {no_room.requests} requests" in slo["message"] and "TTFT p99" in slo["message"]


async def test_a_second_ls_service_is_refused_without_headroom_and_admitted_when_the_runtime_has_it(
    cluster: Cluster, operator: None, runtimes: Runtimes
) -> None:
    no_room, room = runtimes.no_room, runtimes.room
    pool = await serving_chat(cluster, no_room)

    await cluster.create("chat2", CHAT_SPEC)
    refused = await eventually(lambda: (c := cluster.condition("chat2", "Admitted")) and c, WAIT_S, "a decision")
    assert (refused["status"], refused["reason"]) == ("False", "InsufficientSLOHeadroom"), refused
    assert f"predicted headroom 0 req/s < expected load {NEW_LOAD_RPS:g} req/s" in refused["message"]
    assert cluster.condition("chat2", "Ready")["reason"] == "InsufficientSLOHeadroom"
    assert [s["name"] for s in cluster.runtime_config(pool)["services"]] == ["chat"]

    # The pool's replica is replaced by one whose runtime has room (a rollout, as the Deployment would do it).
    assert await cluster.delete_replicas(pool) == [f"{pool}-0"]
    await cluster.run_replicas(pool, node="gpu-a", port=room.port)

    admitted = await eventually(
        lambda: (c := cluster.condition("chat2", "Admitted")) and c.get("status") == "True" and c, WAIT_S,
        "chat2 admitted on retry",
    )  # fmt: skip
    found = re.search(r"predicted headroom (\S+) req/s covers expected load (\S+) req/s", admitted["message"])
    assert found, admitted["message"]
    assert float(found[1]) == pytest.approx(room.figures.headroom_rps, rel=1e-4) and float(found[2]) == NEW_LOAD_RPS
    await eventually(lambda: [s["name"] for s in cluster.runtime_config(pool)["services"]] == ["chat", "chat2"],
                     WAIT_S, "the pool rendered with chat2")  # fmt: skip
    measured = await eventually(
        lambda: (s := cluster.status("chat")).get("runtimeEndpoints") == [f"127.0.0.1:{room.port}"]
        and (s.get("measured") or {}).get("poolHeadroomRequestsPerSecond") and s["measured"],
        WAIT_S, "chat's status from the new replica",
    )  # fmt: skip
    assert measured["poolHeadroomRequestsPerSecond"] == pytest.approx(room.figures.headroom_rps, abs=1e-3)
    assert measured["attainment"] == 1.0 and measured["windowRequests"] == room.requests
