"""The pool router (`piggyback router`) in front of real `piggyback serve` processes on loopback.

Specification:
- Exactness: with lengthAware stages [0, 24) on replica a and [24, ∞) on b, a greedy request that starts at
  8 tokens is live-migrated from a to b mid-decode and the client's stream continues uninterrupted with, token
  for token, the text it gets from a replica alone (the router's metrics count the migration).
- A migration target that refuses: the request completes on its source, unchanged.
- A replica killed mid-stream: the client's stream ends with an explicit error event and [DONE], never silence.
- The router restarted: the in-flight client sees its connection break (explicit); the replica frees that
  request; a new router on the same port serves new requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from piggyback_runtime.client import free_port, wait_ready
from tests.runtime.test_migration import AUTH, PROMPT, TOKEN, Replica, shared_pool

pytestmark = pytest.mark.slow  # real runtime processes

BOUNDARY = 24  # tokens: the request (8-token prompt) crosses it after ~17 tokens


class RouterProcess:
    def __init__(self, tmp: Path, endpoints: list[str], policy: str = "lengthAware", port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / f"router-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "piggyback_runtime.cli", "router", "--pool-endpoints", ",".join(endpoints),
             "--policy", policy, "--poll-interval-s", "0.05", "--host", "127.0.0.1", "--port", str(self.port),
             *(["--stage-boundaries", str(BOUNDARY)] if policy == "lengthAware" else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PIGGYBACK_INTERNAL_TOKEN": TOKEN},
        )  # fmt: skip
        wait_ready(self.url, self.process, timeout_s=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}}") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
def router(tmp_path: Path) -> Any:
    a, b = shared_pool()
    started = RouterProcess(tmp_path, [a.url, b.url])
    yield started, a, b
    started.kill()


def completion(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": "chat", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}  # fmt: skip


def sse_events(url: str, payload: dict[str, Any], events: list[str], first: threading.Event | None = None) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line:
                events.append(line.removeprefix("data: "))
                if first is not None:
                    first.set()


def streamed_text(events: list[str]) -> tuple[str, str | None]:
    assert events[-1] == "[DONE]", events[-3:]
    payloads = [json.loads(e) for e in events[:-1]]
    errors = [p for p in payloads if "error" in p]
    assert not errors, errors
    return "".join(p["choices"][0]["text"] for p in payloads), payloads[-1]["choices"][0]["finish_reason"]


def direct_text(replica: Replica, max_tokens: int) -> str:
    answer = httpx.post(f"{replica.url}/v1/completions", json=completion(max_tokens, False), timeout=60)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])


def test_request_crossing_its_stage_is_migrated_and_streams_on_unchanged(router: Any) -> None:
    proc, a, _ = router
    expected = direct_text(a, 120)
    events: list[str] = []
    sse_events(proc.url, completion(120, True), events)
    text, finish = streamed_text(events)
    assert finish == "length"
    assert text == expected
    assert proc.metric("piggyback_router_migrations_total", outcome="migrated") == 1
    assert proc.metric("piggyback_router_stage_upper_tokens", stage="0") == BOUNDARY
    assert a.load()["running"] == 0


def test_refused_migration_leaves_the_request_where_it_was(router: Any) -> None:
    proc, a, _ = router
    expected = direct_text(a, 250)  # 258 tokens: more than b's max_model_len (256), so b refuses the import
    answer = httpx.post(f"{proc.url}/v1/completions", json=completion(250, False), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == expected
    assert proc.metric("piggyback_router_migrations_total", outcome="refused") >= 1
    assert proc.metric("piggyback_router_migrations_total", outcome="migrated") == 0


def test_router_restart_breaks_in_flight_streams_explicitly_and_serves_new_requests(
    router: Any, tmp_path: Path
) -> None:
    proc, a, _ = router
    events: list[str] = []
    first = threading.Event()
    outcome: list[BaseException] = []

    def client() -> None:
        try:
            sse_events(proc.url, completion(400, True), events, first)
        except BaseException as exc:  # what the client sees is the point of the test
            outcome.append(exc)

    reader = threading.Thread(target=client)
    reader.start()
    assert first.wait(30)
    proc.kill()
    reader.join(30)
    assert not reader.is_alive()
    assert outcome and isinstance(outcome[0], httpx.HTTPError), "the client must see its stream break"
    assert "[DONE]" not in events
    # The replica saw the router's connection go and freed the request.
    deadline = time.monotonic() + 10
    while a.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.load()["running"] == 0
    restarted = RouterProcess(tmp_path, [a.url], port=proc.port)
    try:
        answer = httpx.post(f"{restarted.url}/v1/completions", json=completion(8, False), headers=AUTH, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8
    finally:
        restarted.kill()


def test_replica_killed_mid_stream_ends_the_stream_with_an_explicit_error(router: Any, tmp_path: Path) -> None:
    _, a, _ = router
    events: list[str] = []
    first = threading.Event()
    # A long request that stays on a (stage 0 bound is far away for roundRobin: no migration at all).
    solo = RouterProcess(tmp_path, [a.url], policy="roundRobin")
    try:
        reader = threading.Thread(target=sse_events, args=(solo.url, completion(900, True), events, first))
        reader.start()
        assert first.wait(30)
        a.kill()
        reader.join(30)
        assert not reader.is_alive(), "the client's stream must end, not hang"
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "replica_lost" and a.url in error["message"]
        assert solo.metric("piggyback_router_requests_total", outcome="failed") == 1
    finally:
        solo.kill()  # a stays down: shared_pool() restarts it for whichever test needs it next


# --- in-process: settings, stages, refinement (no processes) ----------------------------------------------------
A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"endpoints": ()}, "--pool-endpoints"),
    ({"endpoints": ("10.0.0.1:8000",)}, "http"),
    ({"endpoints": (A,), "policy": "random"}, "roundRobin"),
    ({"endpoints": (A, B), "stage_boundaries": (100, 50)}, "strictly increasing"),
    ({"endpoints": (A,), "pool_dns": "pool-replicas"}, "host:port"),
])  # fmt: skip
def test_bad_router_settings_say_what_to_fix(kwargs: dict[str, Any], message: str) -> None:
    from piggyback_runtime.router.app import RouterSettings

    with pytest.raises(ValueError, match=message):
        RouterSettings(**kwargs)


def test_stage_plan_splits_replicas_in_order_and_merges_stages_without_replicas() -> None:
    from piggyback_runtime.router.app import RouterSettings

    settings = RouterSettings((A, B, C), "lengthAware", (1000, 8000))
    plan = settings.stage_plan((A, B, C))
    assert [(s.lower_tokens, s.upper_tokens, s.replicas) for s in plan.stages] == [
        (0, 1000, (A,)), (1000, 8000, (B,)), (8000, None, (C,))]  # fmt: skip
    merged = settings.stage_plan((A, B))  # a replica went away: two stages, not three
    assert [(s.upper_tokens, s.replicas) for s in merged.stages] == [(1000, (A,)), (None, (B,))]


def test_refinement_moves_the_boundary_towards_the_observed_lengths_and_exports_it() -> None:
    from piggyback_runtime.router.app import Router, RouterSettings

    router = Router(RouterSettings((A, B), "lengthAware", (1000,)))
    assert router.refine_once() is False  # nothing observed: nothing to refine from
    # Every request in flight is far beyond the boundary: stage 1 does all the attention work.
    router.lengths = {f"r{i}": 1500 + 10 * i for i in range(20)}
    assert router.refine_once() is True
    boundary = router.plan.boundaries[0]  # type: ignore[union-attr]
    assert 1000 < boundary <= 2000
    assert router.policy.plan.boundaries == (boundary,)  # type: ignore[attr-defined]
    assert f'piggyback_router_stage_upper_tokens{{stage="0"}} {float(boundary)}' in router.metrics.render().decode()


def test_prompt_length_estimate_is_exact_for_token_ids() -> None:
    from piggyback_runtime.router.app import estimate_prompt_tokens

    assert estimate_prompt_tokens("completions", {"prompt": [1, 2, 3]}) == 3
    assert estimate_prompt_tokens("completions", {"prompt": "x" * 400}) == 100  # ~4 bytes a token (quoted: 402)
    assert estimate_prompt_tokens("chat", {"messages": [{"role": "user", "content": "hi"}]}) >= 1


def _router_with_replicas(answers: dict[str, int], tried: list[str]) -> Any:
    """A Router whose replicas are a mock transport: each answers /internal/v1/generate with its status."""
    from piggyback_runtime.router.app import Router, RouterSettings

    def reply(request: httpx.Request) -> httpx.Response:
        replica = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        tried.append(replica)
        status = answers[replica]
        if status == 200:
            line = {"request_id": "x", "token_ids": [1], "text": "hi", "num_prompt_tokens": 3, "num_output_tokens": 1,
                    "finished": True, "finish_reason": "length", "error": None}  # fmt: skip
            return httpx.Response(200, content=json.dumps(line) + "\n")
        return httpx.Response(status, json={"error": {"message": f"{replica} says {status}", "code": "slo"}},
                              headers={"Retry-After": "3"})  # fmt: skip

    router = Router(RouterSettings(tuple(answers), "leastLoaded"))
    router.client = httpx.AsyncClient(transport=httpx.MockTransport(reply))
    return router


async def test_a_429_sends_the_request_to_the_next_candidate() -> None:
    tried: list[str] = []
    router = _router_with_replicas({A: 429, B: 200}, tried)
    opened = await router.open({"model": "chat"}, 3, "LS", None)
    assert not isinstance(opened, httpx.Response) and isinstance(opened, tuple), opened
    assert opened[0] == B and tried == [A, B]
    assert 'piggyback_router_admission_retries_total 1.0' in router.metrics.render().decode()


async def test_the_429_is_passed_on_only_when_every_replica_refused_and_other_errors_at_once() -> None:
    tried: list[str] = []
    refused = await _router_with_replicas({A: 429, B: 429}, tried).open({"model": "chat"}, 3, "LS", None)
    assert refused.status_code == 429 and tried == [A, B]  # type: ignore[union-attr]
    assert refused.headers["retry-after"] == "3"  # type: ignore[union-attr]
    assert json.loads(refused.body)["error"]["type"] == "rate_limit_error"  # type: ignore[union-attr]
    tried.clear()
    bad = await _router_with_replicas({A: 400, B: 200}, tried).open({"model": "chat"}, 3, "LS", None)
    assert bad.status_code == 400 and tried == [A]  # type: ignore[union-attr]  # a bad request is bad everywhere
