"""The HTTP API's contract around errors, limits and keys, against an in-process runtime on a tiny model.

- every error is OpenAI's envelope `{"error": {message, type, param, code}}`, `param` naming the field;
  never FastAPI's `{"detail": ...}` and never a 422;
- `/v1/models` reports the runtime's real context length;
- max_tokens: a service's default when a request sends none (a bounded one for BE chat), and its limit;
- API keys: per service, `Authorization: Bearer`, 401 `invalid_api_key` otherwise; probes stay open;
- an admission rejection's numbers add up.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import RequestError
from piggyback_runtime.scheduler.latency_model import LatencyModel
from piggyback_runtime.scheduler.slo_control import REASON_TTFT, LSRequestState, NewLSRequest, SLOController
from piggyback_runtime.server import app as app_module
from piggyback_runtime.server.app import Runtime, create_app
from piggyback_runtime.server.protocol import BE_DEFAULT_MAX_TOKENS, COMPLETIONS_DEFAULT_MAX_TOKENS
from tests.runtime.configs import runtime_config
from tests.runtime.helpers import LS_SLO
from tests.runtime.test_slo_control import decoding, demand_of, linear_model

KEY_A, KEY_B = "sk-test-alpha-0123456789", "sk-test-beta-9876543210"
ENV_A, ENV_B, ENV_EMPTY = "PIGGYBACK_TEST_KEY_A", "PIGGYBACK_TEST_KEY_B", "PIGGYBACK_TEST_KEY_EMPTY"


def _config() -> RuntimeConfig:
    # No max_model_len: /v1/models must report the model's own context, not the config's null.
    return runtime_config(
        services=[
            {"name": "chat", "class": "LS", "slo": LS_SLO},
            {"name": "batch", "class": "BE"},
            {"name": "capped", "class": "LS", "slo": LS_SLO, "default_max_tokens": 3, "max_tokens_limit": 5},
            {"name": "capped-be", "class": "BE", "max_tokens_limit": 7},
            {"name": "strict", "class": "LS", "slo": {"ttft_ms": 0.001, "tpot_ms": 0.001}},
            {"name": "keyed", "class": "LS", "slo": LS_SLO, "api_key_env": ENV_A},
            {"name": "keyed-be", "class": "BE", "api_key_env": ENV_B},
            {"name": "empty-key", "class": "BE", "api_key_env": ENV_EMPTY},  # variable empty: open
        ],
        policy="priority",
        engine={"block_size": 8, "num_kv_blocks": 512, "max_num_batched_tokens": 64, "max_num_seqs": 64},
    )  # fmt: skip


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_A, KEY_A)
        env.setenv(ENV_B, KEY_B)
        env.setenv(ENV_EMPTY, "")
        runtime = Runtime(_config())  # keys are read here, once
    runtime.load()
    assert runtime.engine is not None, runtime.load_error
    yield runtime
    runtime.engine.stop()


@pytest.fixture(scope="module")
def http(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is `status` with exactly OpenAI's envelope; returns its `error` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --- 1. every error in the envelope, `param` naming the field ---------------------------------------------------
JSON = {"content-type": "application/json"}
UNPARSEABLE = [
    pytest.param(b"{not json", JSON, "not valid JSON", id="bad-json"),
    pytest.param(b'{"model": "chat", "prompt": "\xff\xfe"}', JSON, "UTF-8", id="invalid-utf8"),
    pytest.param(b'{"model": "chat", "prompt": "hi"}', {"content-type": "text/plain"}, "content-type",
                 id="wrong-content-type"),
    pytest.param(b"", JSON, "missing", id="empty-body"),
    pytest.param(b"[1, 2]", JSON, "JSON object", id="array-body"),
]  # fmt: skip


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("content", "headers", "says"), UNPARSEABLE)
def test_an_unparseable_body_is_a_400_in_the_openai_envelope(
    http: TestClient, path: str, content: bytes, headers: dict[str, str], says: str
) -> None:
    error = _error(http.post(path, content=content, headers=headers), 400)
    assert error["type"] == "invalid_request_error"
    assert says in error["message"]
    assert error["param"] is None  # about the body as a whole, not one field


FIELD_ERRORS = [
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/chat/completions", {"model": "chat"}, "messages"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": "chat", "messages": []}, "messages"),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "n": 2}, "n"),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "temperature": 7}, "temperature"),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "temprature": 0.5}, "temprature"),
    ("/v1/completions", {"model": "chat", "prompt": []}, "prompt"),
    ("/v1/completions", {"model": "chat", "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "echo": True}, "echo"),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "presence_penalty": 1}, "presence_penalty"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), FIELD_ERRORS, ids=[f"{p}-{f}" for p, _, f in FIELD_ERRORS])
def test_a_bad_field_is_a_400_whose_param_names_it(http: TestClient, path: str, body: dict[str, Any],
                                                   param: str) -> None:  # fmt: skip
    error = _error(http.post(path, json=body), 400)
    assert error["param"] == param
    assert param in error["message"]


def test_unknown_paths_and_methods_are_in_the_envelope_too(http: TestClient) -> None:
    assert _error(http.get("/v1/no-such-endpoint"), 404)["code"] == "not_found"
    assert _error(http.get("/v1/completions"), 405)["code"] == "method_not_allowed"
    assert _error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)["code"] == (
        "model_not_found"
    )


# --- 4. /v1/models reports the real context length --------------------------------------------------------------
def test_models_report_the_runtimes_max_model_len(http: TestClient, runtime: Runtime) -> None:
    real = runtime.engine.engine.loaded.max_model_len  # type: ignore[union-attr]
    assert runtime.config.model.max_model_len is None and isinstance(real, int) and real > 0
    models = http.get("/v1/models").json()["data"]
    assert models and all(m["max_model_len"] == real for m in models)


# --- 5. max_tokens: per-service default and limit ----------------------------------------------------------------
def _usage(response: httpx.Response) -> dict[str, int]:
    assert response.status_code == 200, response.text
    return response.json()["usage"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_request_without_max_tokens_gets_its_services_default(http: TestClient, path: str) -> None:
    body: dict[str, Any] = {"model": "capped", "ignore_eos": True, "temperature": 0}
    body |= {"prompt": "hello"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    assert _usage(http.post(path, json=body))["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "field"),
    [("/v1/completions", "max_tokens"), ("/v1/chat/completions", "max_tokens"),
     ("/v1/chat/completions", "max_completion_tokens")],
)  # fmt: skip
def test_max_tokens_above_the_services_limit_is_a_400_naming_it_and_the_limit(
    http: TestClient, path: str, field: str
) -> None:
    body: dict[str, Any] = {"model": "capped", field: 6}
    body |= {"prompt": "hello"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    error = _error(http.post(path, json=body), 400)
    assert error["param"] == field
    assert "max_tokens" in error["message"] and "limit of 5" in error["message"]
    body[field] = 5  # at the limit is fine
    assert _usage(http.post(path, json={**body, "ignore_eos": True}))["completion_tokens"] == 5


def _max_tokens_sent(http: TestClient, runtime: Runtime, path: str, body: dict[str, Any]) -> int:
    """The max_tokens the server gave the engine (a spy that then refuses the request: nothing is generated)."""
    engine = runtime.engine
    assert engine is not None
    seen: list[int] = []
    original = engine.generate

    def spy(request: Any) -> Any:
        seen.append(request.params.max_tokens)
        raise RequestError("spied")

    engine.generate = spy  # type: ignore[method-assign]
    try:
        _error(http.post(path, json=body), 400)
    finally:
        engine.generate = original  # type: ignore[method-assign]
    return seen[0]


def test_be_chat_without_max_tokens_does_not_reserve_the_whole_context(http: TestClient, runtime: Runtime) -> None:
    chat = {"messages": [{"role": "user", "content": "summarise"}]}
    max_len = runtime.engine.engine.loaded.max_model_len  # type: ignore[union-attr]
    assert max_len > BE_DEFAULT_MAX_TOKENS + 100  # so the two defaults differ here
    be = _max_tokens_sent(http, runtime, "/v1/chat/completions", {"model": "batch", **chat})
    assert be == BE_DEFAULT_MAX_TOKENS
    # LS chat keeps OpenAI's behaviour (the rest of the context); a BE limit caps the BE default.
    ls = _max_tokens_sent(http, runtime, "/v1/chat/completions", {"model": "chat", **chat})
    assert BE_DEFAULT_MAX_TOKENS < ls < max_len
    assert _max_tokens_sent(http, runtime, "/v1/chat/completions", {"model": "capped-be", **chat}) == 7
    legacy = _max_tokens_sent(http, runtime, "/v1/completions", {"model": "batch", "prompt": "x"})
    assert legacy == COMPLETIONS_DEFAULT_MAX_TOKENS


def test_a_default_never_turns_into_a_context_length_error(http: TestClient, runtime: Runtime) -> None:
    max_len = runtime.engine.engine.loaded.max_model_len  # type: ignore[union-attr]
    prompt = [5] * (max_len - 2)  # room for 2 tokens; the BE default of 1024 must shrink to them
    assert _max_tokens_sent(http, runtime, "/v1/completions", {"model": "capped", "prompt": prompt}) == 2


# --- 6. API keys ------------------------------------------------------------------------------------------------
def _complete(http: TestClient, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, headers=headers)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Bearer {KEY_B}", f"Basic {KEY_A}", f"Bearer {KEY_A}x", KEY_A],
    ids=["none", "wrong", "other-services-key", "basic-scheme", "key-plus-a-char", "no-scheme"],
)
def test_a_keyed_service_without_its_key_is_a_401(http: TestClient, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else None
    response = _complete(http, "keyed", headers)
    error = _error(response, 401)
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert response.headers["www-authenticate"] == "Bearer"


def test_the_right_key_opens_its_service_and_only_that(http: TestClient) -> None:
    assert _complete(http, "keyed", {"authorization": f"Bearer {KEY_A}"}).status_code == 200
    assert _complete(http, "keyed", {"authorization": f"bearer  {KEY_A} "}).status_code == 200  # scheme any case
    assert _complete(http, "keyed-be", {"authorization": f"Bearer {KEY_B}"}).status_code == 200
    assert _complete(http, "keyed-be", {"authorization": f"Bearer {KEY_A}"}).status_code == 401
    # Services without a key (or whose key variable is empty) are open, whatever the caller sends.
    assert _complete(http, "chat").status_code == 200
    assert _complete(http, "empty-key").status_code == 200
    assert _complete(http, "chat", {"authorization": "Bearer anything"}).status_code == 200


def test_keys_are_compared_in_constant_time(http: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = app_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    assert _complete(http, "keyed", {"authorization": "Bearer guess"}).status_code == 401
    assert calls == [(b"guess", KEY_A.encode())]


def test_models_lists_only_the_services_the_caller_may_use(http: TestClient) -> None:
    def ids(headers: dict[str, str] | None = None) -> set[str]:
        response = http.get("/v1/models", headers=headers)
        assert response.status_code == 200
        return {m["id"] for m in response.json()["data"]}

    open_services = {"chat", "batch", "capped", "capped-be", "strict", "empty-key"}
    assert ids() == open_services
    assert ids({"authorization": f"Bearer {KEY_A}"}) == open_services | {"keyed"}
    assert ids({"authorization": f"Bearer {KEY_B}"}) == open_services | {"keyed-be"}
    # An unknown model's 404 does not reveal keyed services either.
    error = _error(_complete(http, "nope"), 404)
    assert "keyed" not in error["message"] and "chat" in error["message"]


def test_probes_and_metrics_need_no_key(http: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http.get(path).status_code == 200, path


def test_the_official_openai_client_sends_the_key_as_bearer(http: TestClient) -> None:
    keyed = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY_A, http_client=http, max_retries=0)
    result = keyed.completions.create(model="keyed", prompt="hi", max_tokens=2)
    assert result.choices[0].finish_reason in ("stop", "length")
    assert "keyed" in {m.id for m in keyed.models.list()}
    stranger = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-wrong", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        stranger.chat.completions.create(model="keyed", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.code == "invalid_api_key"
    assert "keyed" not in {m.id for m in stranger.models.list()}


# --- 9. admission rejections whose numbers add up ----------------------------------------------------------------
TTFT_FORMULA = re.compile(r"predicted TTFT ([\d.]+) ms = waited ([\d.]+) ms \+ (\d+) iterations × ([\d.]+) ms")


def assert_adds_up(message: str, predicted_ttft_s: float | None = None) -> None:
    match = TTFT_FORMULA.search(message)
    assert match, message
    total, waited, iterations, each = Decimal(match[1]), Decimal(match[2]), int(match[3]), Decimal(match[4])
    assert total == waited + iterations * each, message
    if predicted_ttft_s is not None:  # and the total is the prediction the decision used, to display precision
        assert abs(float(total) / 1000 - predicted_ttft_s) <= 0.00005 * (iterations + 1)


@pytest.mark.parametrize(("waited_s", "queued_ahead"), [(0.0, 0), (0.2345, 0), (0.05, 1000), (1.23456, 3333)])
def test_a_ttft_rejection_shows_a_prediction_whose_parts_sum_to_it(waited_s: float, queued_ahead: int) -> None:
    model: LatencyModel = linear_model()
    controller = SLOController(model, ls_chunk_tokens=100)
    state = [LSRequestState(1.0, 100.0, queued_ahead, 0)] if queued_ahead else []
    state += decoding(3, tpot_s=10.0)
    new = NewLSRequest(prompt_tokens=250, ttft_s=0.001, tpot_s=10.0, arrival_s=0.0)
    decision = controller.admit_ls(new, state, demand_of(state), now_s=waited_s)
    assert not decision.admitted and decision.reason == REASON_TTFT
    assert_adds_up(decision.message, decision.predicted_ttft_s)
    assert "exceeds the TTFT SLO 1.0 ms" in decision.message
