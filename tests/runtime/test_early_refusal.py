"""LS refusals answered before FastAPI (server/early_refusal.py, `refuse_before_routing`), in-process.

The early path must be invisible to clients and to the runtime's books: the same 429 (body, headers,
Retry-After, reason) as the handler's own refusal, the same counters and the same arrival record; a request
it does not refuse reaches the handler untouched; a bad body still gets the handler's 400; it never refuses a
BE request, an unknown model, a request without its service's key, or anything while draining.

The engine's clock stands still: a refusal's message shows how long the request waited (arrival to decision),
which would otherwise differ by microseconds between two requests; every request here waits zero.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import Engine
from piggyback_runtime.request import Request, RequestOutput, SamplingParams, SLOTarget
from piggyback_runtime.scheduler.batching import IterationPlan
from piggyback_runtime.scheduler.planner import Planner
from piggyback_runtime.server import app as app_module
from piggyback_runtime.server.app import Runtime, create_app
from piggyback_runtime.server.early_refusal import EarlyRefusal
from piggyback_runtime.server.protocol import error_response
from tests.runtime.configs import runtime_config, runtime_config_dict
from tests.runtime.helpers import LS_SLO
from tests.runtime.test_slo_control import linear_model

KEY, KEY_ENV = "sk-early-0123456789", "PIGGYBACK_TEST_EARLY_KEY"
STRICT_SLO = {"ttft_ms": 0.001, "tpot_ms": 0.001}  # no iteration is this fast: every LS request is refused


def _config() -> RuntimeConfig:
    return runtime_config(
        model={"max_model_len": 256},
        services=[
            {"name": "chat", "class": "LS", "slo": LS_SLO},
            {"name": "strict", "class": "LS", "slo": STRICT_SLO, "max_tokens_limit": 64},
            {"name": "keyed", "class": "LS", "slo": STRICT_SLO, "api_key_env": KEY_ENV},
            {"name": "batch", "class": "BE"},
        ],
        policy="headroom-admit",  # LS admission from the latency model, no CPU attention workers
        engine={"block_size": 8, "num_kv_blocks": 512, "max_num_batched_tokens": 64, "max_num_seqs": 64},
    )  # fmt: skip


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    config = _config()
    frozen_s = time.monotonic()  # before any request: each arrives "after" now, so waited is 0
    made: list[Runtime] = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, KEY)
        runtime = Runtime(config, engine_factory=lambda: Engine(config, metrics=made[0].metrics,
                                                                latency_model=linear_model(),
                                                                clock=lambda: frozen_s))  # fmt: skip
    made.append(runtime)
    runtime.load()
    assert runtime.engine is not None, runtime.load_error
    yield runtime
    runtime.engine.stop()


def _without_early_refusal(app: FastAPI) -> FastAPI:
    """The same app as before this layer existed: every request through FastAPI to the handler."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not EarlyRefusal]
    return app


@pytest.fixture(scope="module")
def early(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as client:
        yield client


@pytest.fixture(scope="module")
def plain(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(_without_early_refusal(create_app(runtime))) as client:
        yield client


@pytest.fixture
def answered_early(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per generate request the layer looked at: whether it answered it itself."""
    seen: list[bool] = []
    real = app_module.refuse_before_routing

    def spy(runtime: Runtime, scope: Scope, body: bytes) -> Any:
        response = real(runtime, scope, body)
        seen.append(response is not None)
        return response

    monkeypatch.setattr(app_module, "refuse_before_routing", spy)
    return seen


def _counters(runtime: Runtime) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in runtime.metrics.registry.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def _delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}


def _arrivals(runtime: Runtime) -> list[tuple[float, int]]:
    assert runtime.engine is not None
    return list(runtime.engine.engine.planner._ls_arrivals)


def _wait_for_arrivals(runtime: Runtime, count: int) -> list[tuple[float, int]]:
    """The planner's LS arrival record once it holds `count` entries (the engine thread adds a refusal's at
    its next pass over its commands: within its 0.5 s idle wait)."""
    deadline = time.monotonic() + 10.0
    while len(_arrivals(runtime)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return _arrivals(runtime)


REFUSED = [
    pytest.param("/v1/completions", {"model": "strict", "prompt": "hello there, a refused request"}, {},
                 id="completion"),
    pytest.param("/v1/completions", {"model": "strict", "prompt": [5, 6, 7, 8], "stream": True, "max_tokens": 9}, {},
                 id="token-ids-streamed"),
    pytest.param("/v1/chat/completions",
                 {"model": "strict", "messages": [{"role": "user", "content": "refuse me"}], "max_tokens": 4}, {},
                 id="chat"),
    pytest.param("/v1/completions", {"model": "chat", "prompt": "tight SLO sent by the client"},
                 {"x-slo-ttft-ms": "0.001"}, id="slo-header"),
    pytest.param("/v1/completions", {"model": "keyed", "prompt": "with its key"}, {"authorization": f"Bearer {KEY}"},
                 id="keyed"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "headers"), REFUSED)
def test_an_early_refusal_is_the_handlers_refusal_byte_for_byte_and_counted_the_same(
    runtime: Runtime, early: TestClient, plain: TestClient, answered_early: list[bool], path: str,
    body: dict[str, Any], headers: dict[str, str],
) -> None:  # fmt: skip
    answers: list[httpx.Response] = []
    deltas: list[dict[Any, float]] = []
    records: list[tuple[float, int]] = []
    for client in (early, plain):
        before, arrivals = _counters(runtime), len(_arrivals(runtime))
        answers.append(client.post(path, json=body, headers=headers))
        deltas.append(_delta(before, _counters(runtime)))
        records.append(_wait_for_arrivals(runtime, arrivals + 1)[-1])
    by_layer, by_handler = answers
    assert answered_early == [True]  # the plain app has no layer: its request went to the handler
    assert by_handler.status_code == 429, by_handler.text
    assert by_layer.status_code == 429
    assert by_layer.content == by_handler.content
    assert by_layer.headers.multi_items() == by_handler.headers.multi_items()
    assert "retry-after" in by_layer.headers
    assert deltas[0] == deltas[1]
    service = body["model"]
    rejected = [k for k in deltas[0] if k[0] == "piggyback_requests_total" and ("outcome", "rejected") in k[1]]
    assert rejected and ("model_name", service) in rejected[0][1]
    assert any(k[0] == "piggyback_admission_rejections_total" for k in deltas[0])
    assert records[0][1] == records[1][1]  # the arrival recorded with the request's own prompt length


def test_a_request_it_would_admit_goes_on_untouched_and_streams(
    runtime: Runtime, early: TestClient, answered_early: list[bool]
) -> None:
    body = {"model": "chat", "prompt": "hello world", "max_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with early.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert answered_early == [False]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    assert runtime.engine is not None
    # The handler saw the body the layer had read: the prompt and max_tokens as sent.
    assert usage["prompt_tokens"] == len(runtime.engine.engine.tokenizer.encode("hello world"))
    assert usage["completion_tokens"] == 5


def test_a_non_streamed_admitted_request_and_chat_go_on_too(early: TestClient, answered_early: list[bool]) -> None:
    completion = early.post("/v1/completions", json={"model": "chat", "prompt": "hi", "max_tokens": 3,
                                                     "ignore_eos": True})  # fmt: skip
    chat = early.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 3, "ignore_eos": True,
                                                    "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert (completion.status_code, chat.status_code) == (200, 200), (completion.text, chat.text)
    assert completion.json()["usage"]["completion_tokens"] == chat.json()["usage"]["completion_tokens"] == 3
    assert answered_early == [False, False]


STILL_400 = [
    pytest.param("/v1/completions", b'{"model": "strict", "prompt": "hi"', "application/json", "not valid JSON",
                 id="bad-json"),
    pytest.param("/v1/completions", b'{"model": "strict", "prompt": "\xff\xfe"}', "application/json", "UTF-8",
                 id="invalid-utf8"),
    pytest.param("/v1/completions", b'{"model": "strict", "prompt": "hi"}', "text/plain", "content-type",
                 id="wrong-content-type"),
    pytest.param("/v1/completions", b'{"model": "strict", "prompt": "hi", "temperature": 7}', "application/json",
                 "temperature", id="bad-field"),
    pytest.param("/v1/chat/completions", b'{"model": "strict", "messages": []}', "application/json", "messages",
                 id="no-messages"),
    pytest.param("/v1/completions", b'{"model": "strict", "prompt": "hi", "max_tokens": 65}', "application/json",
                 "max_tokens_limit", id="over-the-services-limit"),
    pytest.param("/v1/completions", json.dumps({"model": "strict", "prompt": "word " * 300}).encode(),
                 "application/json", "maximum context length", id="prompt-longer-than-the-context"),
    pytest.param("/v1/completions", b'{"model": "strict", "prompt": [1, 99999999]}', "application/json",
                 "token ids", id="token-id-out-of-the-vocabulary"),
    pytest.param("/v1/completions", b"[1, 2]", "application/json", "JSON object", id="array-body"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "content", "content_type", "says"), STILL_400)
def test_a_bad_request_to_an_overloaded_service_still_gets_the_handlers_400(
    early: TestClient, answered_early: list[bool], path: str, content: bytes, content_type: str, says: str
) -> None:
    response = early.post(path, content=content, headers={"content-type": content_type})
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"]
    assert answered_early == [False]


def test_it_never_refuses_be_unknown_models_missing_keys_or_while_draining(
    runtime: Runtime, early: TestClient, answered_early: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert early.post("/v1/completions", json={"model": "batch", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert early.post("/v1/completions", json={"model": "nope", "prompt": "hi"}).status_code == 404
    assert early.post("/v1/completions", json={"model": "keyed", "prompt": "hi"}).status_code == 401
    wrong_key = {"authorization": "Bearer sk-wrong"}
    assert early.post("/v1/completions", json={"model": "keyed", "prompt": "hi"}, headers=wrong_key).status_code == 401
    monkeypatch.setattr(runtime, "draining", True)
    assert early.post("/v1/completions", json={"model": "strict", "prompt": "hi"}).status_code == 503
    assert answered_early == [False] * 5


def test_the_one_token_question_agrees_with_refuse_early_and_records_nothing() -> None:
    """`refuses_every_prompt` (what the layer asks before it tokenises) is `refuse_early` for a one-token
    prompt: when it says yes, every prompt is refused. Asking (it, or `refuse_early(forwarding=False)`)
    records nothing, while each request `refuse_early` lets through counts in the next decision."""
    slo = SLOTarget(0.3, 1.0)
    services = [{"name": "chat", "class": "LS", "slo": {"ttft_ms": 300, "tpot_ms": 1000}},
                {"name": "batch", "class": "BE"}]
    config = runtime_config(services=services, policy="headroom-admit",
                            engine={"max_num_batched_tokens": 64, "max_num_seqs": 64})  # fmt: skip
    planner = Planner(config, num_kv_blocks=4096, latency_model=linear_model(), clock=lambda: 100.0)

    def ls(i: int, prompt: int) -> Request:
        return Request(f"r{i}", "chat", "LS", [1] * prompt, SamplingParams(max_tokens=8), slo=slo, arrival_s=100.0)

    def refused(prompt: int, i: int = 999) -> bool:
        return planner.refuse_early(ls(i, prompt), forwarding=False) is not None

    assert not planner.refuses_every_prompt("chat")  # an idle engine
    queued = 0
    while not planner.refuses_every_prompt("chat") and queued < 500:  # queue LS prompts until one token cannot fit
        planner.add(ls(queued, 48))
        planner.publish_admission_view(IterationPlan())
        queued += 1
    assert 1 < queued < 500
    assert all(refused(prompt) for prompt in (1, 2, 17, 64, 200))
    assert not planner.refuses_every_prompt("batch")  # a BE service: never
    planner.add(ls(queued, 48))  # one more, unpublished: the layer decides on the view it has
    assert planner.refuses_every_prompt("chat")

    planner.scheduler.waiting.clear()
    planner.publish_admission_view(IterationPlan())
    assert not any(refused(48, i) for i in range(queued + 5))  # only asked: the queue stays empty
    let_through = 0
    while planner.refuse_early(ls(10_000 + let_through, 48)) is None and let_through <= queued + 5:
        let_through += 1
    assert 0 < let_through <= queued  # each one let through lengthened the queue, until one no longer fit


# --- the ASGI layer itself ------------------------------------------------------------------------------------
def test_the_layer_replays_the_body_as_read_then_hands_on_the_clients_messages() -> None:
    """A request it does not answer reaches the app with every message it read, in order, then the client's
    next ones (a disconnect must still be seen by a streaming response)."""
    client_messages: list[Message] = [
        {"type": "http.request", "body": b'{"a": ', "more_body": True},
        {"type": "http.request", "body": b"1}", "more_body": False},
        {"type": "http.disconnect"},
    ]
    bodies: list[bytes] = []
    app_saw: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(3):
            app_saw.append(await receive())

    def refuse(scope: Scope, body: bytes) -> None:
        bodies.append(body)

    async def run() -> None:
        pending = list(client_messages)

        async def receive() -> Message:
            return pending.pop(0)

        async def send(message: Message) -> None:
            raise AssertionError("the layer must not answer")

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await EarlyRefusal(app, ["/v1/completions"], refuse)(scope, receive, send)

    asyncio.run(run())
    assert bodies == [b'{"a": 1}']
    assert app_saw == client_messages


def test_the_layer_answers_only_generate_posts_and_a_client_gone_mid_body_goes_on() -> None:
    answered: list[Message] = []
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(f"{scope['method']} {scope['path']}")

    def refuse(scope: Scope, body: bytes) -> Any:
        return error_response(429, "refused", "rate_limit_error", "TTFTUnattainable", headers={"Retry-After": "1"})

    async def call(method: str, path: str, messages: list[Message]) -> None:
        pending = list(messages)

        async def receive() -> Message:
            return pending.pop(0)

        async def send(message: Message) -> None:
            answered.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": []}
        await EarlyRefusal(app, ["/v1/completions"], refuse)(scope, receive, send)

    whole = [{"type": "http.request", "body": b"{}", "more_body": False}]
    asyncio.run(call("GET", "/v1/completions", whole))
    asyncio.run(call("POST", "/v1/models", whole))
    asyncio.run(call("POST", "/v1/completions", [{"type": "http.request", "body": b"{", "more_body": True},
                                                 {"type": "http.disconnect"}]))  # fmt: skip
    assert reached == ["GET /v1/completions", "POST /v1/models", "POST /v1/completions"] and not answered
    asyncio.run(call("POST", "/v1/completions", whole))
    assert reached == ["GET /v1/completions", "POST /v1/models", "POST /v1/completions"]
    assert answered[0]["type"] == "http.response.start" and answered[0]["status"] == 429


# --- server-sent events: fewer writes, none later -----------------------------------------------------------------
def _output(text: str, finished: bool = False, reason: str | None = None) -> RequestOutput:
    return RequestOutput("r1", [1], text, finished, reason, num_prompt_tokens=3, num_output_tokens=2)


@pytest.mark.parametrize("chat", [False, True])
def test_each_token_is_written_as_soon_as_it_comes_and_the_end_in_one_write(chat: bool) -> None:
    """The role goes with the first text and the last text with the usage and [DONE], but no text waits for
    the next token: after each output the stream has written everything it can."""

    async def run() -> list[str]:
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        async def rest() -> AsyncIterator[RequestOutput]:
            while True:
                output = await outputs.get()
                yield output
                if output.finished:
                    return

        def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            return f"data: {json.dumps({'choice': choice, 'usage': usage})}\n\n"

        def choice(output: RequestOutput) -> dict[str, Any]:
            return {"text": output.text_delta, "finish_reason": output.finish_reason if output.finished else None}

        stream = app_module._sse_events(_output("a"), rest(), event, choice, lambda o: "error\n\n", chat, True)
        # Each write must come before the next output exists (a stream that held it back would hang here).
        writes = [await asyncio.wait_for(anext(stream), 30)]
        outputs.put_nowait(_output("b"))
        writes.append(await asyncio.wait_for(anext(stream), 30))
        outputs.put_nowait(_output("c", finished=True, reason="length"))
        writes += [w async for w in stream]
        return writes

    writes = asyncio.run(run())
    assert len(writes) == 3
    assert writes[0].count("data: ") == (2 if chat else 1) and '"text": "a"' in writes[0]
    assert '"text": "b"' in writes[1] and writes[1].count("data: ") == 1
    assert '"text": "c"' in writes[2] and '"usage": {' in writes[2] and writes[2].endswith("data: [DONE]\n\n")


# --- the GIL the HTTP thread and the engine thread share ----------------------------------------------------------
def test_piggyback_serve_sets_the_processs_gil_switch_interval_from_the_config_before_the_engine_starts(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`server.gil_switch_interval_s` (default 0.5 ms, Python's is 5 ms) is the whole process's: set before the
    runtime (and its engine thread) exists. A value outside 0.1 ms..100 ms is refused naming the field."""
    import sys

    from piggyback_runtime import cli

    assert runtime_config().server.gil_switch_interval_s == 0.0005
    path = tmp_path / "runtime.yaml"
    path.write_text(json.dumps(runtime_config_dict(server={"gil_switch_interval_s": 0.002})))
    seen: list[float] = []

    class StopBeforeLoading(Exception):
        pass

    def runtime_seen(config: RuntimeConfig) -> None:
        seen.append(sys.getswitchinterval())
        raise StopBeforeLoading

    monkeypatch.setattr(app_module, "Runtime", runtime_seen)
    before = sys.getswitchinterval()
    try:
        with pytest.raises(StopBeforeLoading):
            cli.main(["serve", "--config", str(path)])
    finally:
        sys.setswitchinterval(before)
    assert seen == [pytest.approx(0.002)]
    for bad in (0.0, 0.5):
        with pytest.raises(ValueError, match=r"server\.gil_switch_interval_s"):
            RuntimeConfig.from_dict(runtime_config_dict(server={"gil_switch_interval_s": bad}))
