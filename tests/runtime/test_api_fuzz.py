"""Property-based fuzz of the whole HTTP API, generated from the server's own OpenAPI document.

Schemathesis reads /openapi.json from the in-process app and, for every operation, generates requests that
follow the schema (positive) and requests that break it (negative). Every answer must: not be a 5xx, have a
status the document lists for that operation, the content type the document gives for it, and a body that
validates against the documented schema (the error envelope for every error). Examples are few and derived
deterministically (derandomized), so this runs in seconds and the same way on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from piggyback_runtime.server.app import Runtime, create_app
from tests.runtime.configs import runtime_config
from tests.runtime.helpers import LS_SLO

pytestmark = pytest.mark.slow  # property-based fuzz of the HTTP API

HOSTED = ("chat", "batch", "keyed")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def fuzz_runtime() -> Iterator[Runtime]:
    config = runtime_config(
        # A short context and small output limits keep every generated request cheap: longer ones are 400s.
        model={"max_model_len": 96},
        services=[
            {"name": "chat", "class": "LS", "slo": LS_SLO, "default_max_tokens": 2, "max_tokens_limit": 3},
            {"name": "batch", "class": "BE", "default_max_tokens": 2, "max_tokens_limit": 3},
            {"name": "keyed", "class": "LS", "slo": LS_SLO, "max_tokens_limit": 3,
             "api_key_env": "PIGGYBACK_FUZZ_KEY"},
        ],
        policy="priority",
        engine={"block_size": 8, "num_kv_blocks": 256, "max_num_batched_tokens": 128, "max_num_seqs": 128},
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PIGGYBACK_FUZZ_KEY", "sk-fuzz")
        runtime = Runtime(config)
    runtime.load()
    assert runtime.engine is not None, runtime.load_error
    yield runtime
    runtime.engine.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_runtime: Runtime) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzz_runtime))


@pytest.fixture(scope="module")
def asgi_client(fuzz_runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(fuzz_runtime)) as client:
        yield client


# Every operation of the document (the test below fails if the document grows one not listed here).
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")]  # fmt: skip


# The GETs take no parameters: there is nothing to break, so they get positive cases only.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


# Schemathesis' own pytest integration does not run under this pytest (9.x); its strategies drive Hypothesis
# directly instead, one test per operation and generation mode.
@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_every_answer_conforms_to_the_openapi_document(
    api_schema: schemathesis.schemas.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]
    statuses: set[int] = set()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=60 if method == "POST" else 5, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case: schemathesis.Case) -> None:
        # Random `model` strings would almost always be 404s: steer most string ones to hosted services,
        # deterministically (by the generated string's length), so generation and admission run too.
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) % 4 != 3:
            body["model"] = HOSTED[len(body["model"]) % 4 % len(HOSTED)]
        statuses.add(case.call_and_validate(checks=CHECKS).status_code)

    check()
    # The fuzz reached past validation: some generated requests were served, others refused.
    if method == "POST":
        assert 400 in statuses
        if mode == GenerationMode.POSITIVE:
            assert 200 in statuses, statuses


def test_the_fuzz_covers_every_operation(api_schema: schemathesis.schemas.BaseSchema) -> None:
    listed = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert listed == set(OPERATIONS)


def test_the_document_lists_every_status_and_no_422(asgi_client: TestClient) -> None:
    document = asgi_client.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = document["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "429", "500", "503"}
        for status in set(responses) - {"200"}:
            schema_ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert schema_ref == "#/components/schemas/ErrorResponse"
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert "Retry-After" in responses["429"]["headers"] and "Retry-After" in responses["503"]["headers"]
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    for probe in ("/healthz", "/readyz"):
        assert {"200", "503"} <= set(document["paths"][probe]["get"]["responses"])
    assert "HTTPValidationError" not in document["components"]["schemas"]
    error = document["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
