"""FastAPI app: OpenAI-compatible completions and chat completions, models, health, readiness, metrics.

The request's `model` field names the service (the LLMService name). The model loads in the background
after the server starts, so /healthz answers at once and /readyz turns ready when the engine can serve.

Every answer other than a 200 carries OpenAI's error envelope `{"error": {message, type, param, code}}`
(never FastAPI's `{"detail": ...}`, never 422), and the OpenAPI document at /openapi.json lists each status an
endpoint can return. Services whose `api_key_env` names a non-empty variable need `Authorization: Bearer`.
On SIGTERM `piggyback serve` drains (`Runtime.drain`): readiness fails, new requests get 503, requests in
flight get `server.drain_timeout_s` to finish and are then ended with a retryable error.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from piggyback_runtime.config import RuntimeConfig, ServiceClass, ServiceConfig
from piggyback_runtime.engine import Engine, RequestError, UnknownServiceError
from piggyback_runtime.metrics import RuntimeMetrics
from piggyback_runtime.request import FINISH_ABORT, FINISH_ERROR, FINISH_REJECTED, RequestOutput, SLOTarget
from piggyback_runtime.request import Request as EngineRequest
from piggyback_runtime.server.async_engine import AsyncEngine, EngineDeadError
from piggyback_runtime.server.early_refusal import EarlyRefusal
from piggyback_runtime.server.internal import register_internal_routes
from piggyback_runtime.server.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelList,
    chat_role_choice,
    completion_body,
    error_response,
    health_body,
    model_card,
    model_list,
    resolve_max_tokens,
    sse_error,
    stream_choice,
    stream_chunk,
    usage,
)

log = logging.getLogger(__name__)

SLO_TTFT_HEADER = "x-slo-ttft-ms"
SLO_TPOT_HEADER = "x-slo-tpot-ms"

# A draining replica is going away: a client should retry at once (elsewhere, through the Service).
DRAIN_RETRY_AFTER_S = 1
# After the drain deadline, how long the handlers get to write the retryable errors out.
DRAIN_CUTOFF_GRACE_S = 1.0


class Runtime:
    """Everything the HTTP layer needs; the engine appears once the model has loaded."""

    def __init__(self, config: RuntimeConfig, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.config = config
        self.metrics = RuntimeMetrics()
        self.metrics.export_slo_targets(config.services)  # before the model loads: thresholds show at once
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self._factory = engine_factory or (lambda: Engine(config, metrics=self.metrics))
        self.created = int(time.time())
        # Keys are read once at start-up from the environment the operator fills from Secrets.
        self.api_keys: dict[str, bytes] = {}
        for service in config.services:
            if service.api_key_env is None:
                continue
            key = os.environ.get(service.api_key_env, "")
            if key:
                self.api_keys[service.name] = key.encode()
            else:
                log.warning("service %s: api_key_env %s is unset or empty: the service is open to every client",
                            service.name, service.api_key_env)  # fmt: skip
        # Drain state: the request ids whose responses are still being written, and those cut off at the
        # drain deadline (their engine error becomes a retryable 503 / SSE error instead of a 500).
        self.in_flight: dict[str, ServiceClass] = {}
        self.cut_off: set[str] = set()
        self.draining = False

    def load(self) -> None:
        try:
            engine = AsyncEngine(self._factory())
            engine.start()
            self.engine = engine
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model load failed")

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="model-load", daemon=True)
        thread.start()
        return thread

    def ready_engine(self) -> AsyncEngine:
        if self.draining:
            raise draining_error()
        if self.engine is None:
            detail = f"model load failed: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, f"Not ready: {detail}", "service_unavailable", "not_ready")
        if not self.engine.alive:
            raise APIError(503, f"Engine stopped: {self.engine.dead_reason}", "service_unavailable", "engine_dead")
        return self.engine

    # --- API keys --------------------------------------------------------------------------------------------
    def may_use(self, service: str, authorization: str | None) -> bool:
        """Whether a caller presenting this Authorization header may use the service."""
        key = self.api_keys.get(service)
        if key is None:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        # compare_digest: the time taken does not reveal how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)

    def visible_services(self, authorization: str | None) -> list[ServiceConfig]:
        return [s for s in self.config.services if self.may_use(s.name, authorization)]

    # --- drain -------------------------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Readiness fails and new requests get 503 from now on (safe to call from a signal handler)."""
        if not self.draining:
            self.draining = True
            log.info("draining: readiness fails, new requests get 503, %d in flight", len(self.in_flight))

    async def drain(self, timeout_s: float) -> None:
        """Let requests in flight finish for up to `timeout_s`, then end the rest with a retryable error."""
        self.begin_drain()
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            ids = list(self.in_flight)
            log.warning("drain timeout (%.1f s) reached: ending %d request(s) with a retryable error",
                        timeout_s, len(ids))  # fmt: skip
            self.cut_off.update(ids)
            if self.engine is not None and self.engine.alive:
                self.engine.fail(ids, f"the runtime is shutting down and its drain timeout ({timeout_s:g} s) "
                                      "ended this request before it finished; retry it")  # fmt: skip
            grace_end = time.monotonic() + DRAIN_CUTOFF_GRACE_S
            while self.in_flight and time.monotonic() < grace_end:
                await asyncio.sleep(0.02)
        log.info("drain complete (%d request(s) still open)", len(self.in_flight))

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Stop the engine loop and the CPU workers, waiting at most about `timeout_s`."""
        engine = self.engine
        if engine is None:
            return
        stopper = threading.Thread(target=engine.stop, args=(timeout_s,), name="engine-stop", daemon=True)
        stopper.start()
        stopper.join(timeout_s + 1.0)


def draining_error() -> APIError:
    return APIError(503, "The runtime is shutting down (draining) and takes no new requests; retry the request "
                         "(another replica will take it)", "service_unavailable", "draining",
                    headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})  # fmt: skip


def api_key_error(subject: str) -> APIError:
    """The 401 for a caller whose key does not open `subject` (a service, or what needs one)."""
    return APIError(401, f"Incorrect or missing API key for {subject}: send the service's key as "
                         "`Authorization: Bearer <key>`", "invalid_request_error", "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def _slo_from_headers(headers: Mapping[str, str], runtime: Runtime, service: str) -> SLOTarget | None:
    ttft, tpot = headers.get(SLO_TTFT_HEADER), headers.get(SLO_TPOT_HEADER)
    if ttft is None and tpot is None:
        return None
    base = runtime.config.service(service)
    base_slo = base.slo if base is not None else None
    try:
        ttft_s = float(ttft) / 1000 if ttft is not None else (base_slo.ttft_s if base_slo else None)
        tpot_s = float(tpot) / 1000 if tpot is not None else (base_slo.tpot_s if base_slo else None)
    except ValueError:
        raise APIError(
            400, f"{SLO_TTFT_HEADER}/{SLO_TPOT_HEADER} must be numbers of milliseconds", "invalid_request_error"
        ) from None
    if ttft_s is None or tpot_s is None or ttft_s <= 0 or tpot_s <= 0:
        raise APIError(
            400,
            f"{SLO_TTFT_HEADER} and {SLO_TPOT_HEADER} must both be positive (or come from the service's SLO)",
            "invalid_request_error",
        )
    return SLOTarget(ttft_s, tpot_s)


# What the OpenAPI document says each endpoint can answer (the fuzz test in tests/runtime/test_api_fuzz.py
# holds the server to it).
_ERROR = {"model": ErrorResponse}
POST_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        **_ERROR,
        "description": "Invalid request: unparseable body, a bad or unsupported field (`param` names "
        "it), max_tokens over the service's limit, a prompt longer than the context",
    },
    401: {**_ERROR, "description": "The service needs `Authorization: Bearer <key>` (code `invalid_api_key`)"},
    404: {**_ERROR, "description": "No hosted service of that name (code `model_not_found`)"},
    429: {
        **_ERROR,
        "description": "Rejected at arrival: an LS request predicted to miss its SLO, or the BE queue "
        "is full; see `Retry-After`",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    },
    500: {**_ERROR, "description": "The runtime failed the request (an engine error)"},
    503: {
        **_ERROR,
        "description": "Not ready (loading), engine stopped, or draining for shutdown (code "
        "`draining`, with `Retry-After`); also a request cut off by the drain timeout",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    },
}
_SSE = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "`stream: true`: server-sent events, "
            "each `data: <chunk JSON>`, ending with `data: [DONE]`; a failure is "
            'a `data: {"error": ...}` event before `[DONE]`',
        }
    }
}
_UNION_TAG = re.compile(
    r"^(str|int|float|bool|none|literal\[.*\]|list\[.*\]|dict\[.*\]|tuple\[.*\]|function-.*|"
    r"[A-Z]\w*)$"
)


def _param(loc: Sequence[int | str]) -> str | None:
    """The dotted field path of a validation error (`messages.0.content`), without pydantic's union tags."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and _UNION_TAG.match(p))]
    return ".".join(parts) or None


def _validation_problems(errors: Sequence[Any], content_type: str) -> tuple[str, str | None]:
    """(message, param) for a body that did not validate; the body-level cases get a sentence of their own."""
    problems: list[str] = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return f"The request body is not valid JSON ({detail}); send a JSON object", None
        if loc in ((), ("body",)):
            if err["type"] == "missing":
                return "The request body is missing; send a JSON object (content-type: application/json)", None
            got = f" (got content-type {content_type!r})" if "json" not in content_type else ""
            return f"The request body must be a JSON object sent as content-type application/json{got}", None
        param = _param(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not an OpenAI parameter this runtime accepts)"
        text = f"{param}: {msg}" if param else msg
        if text not in problems:  # one line per union member would repeat the same field
            problems.append(text)
    first = _param(errors[0]["loc"]) if errors else None
    return "Invalid request: " + "; ".join(problems), first


def custom_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less the 422 it adds to every body-taking route (this server answers 400)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "only for services with an API key"}
    }
    app.openapi_schema = schema
    return schema


# --- error handlers: every non-200 answer is OpenAI's envelope ----------------------------------------------
async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_problems(exc.errors(), request.headers.get("content-type", ""))
    return error_response(400, message, "invalid_request_error", "invalid_request", param)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own errors: unknown path (404), wrong method (405), and a body it cannot even decode
    # (invalid UTF-8), which it reports as a bare 400 "There was an error parsing the body".
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    if exc.status_code == 400:
        message = "The request body could not be parsed; send a JSON object encoded as UTF-8"
    return error_response(exc.status_code, message, "invalid_request_error", code,
                          headers=getattr(exc, "headers", None))  # fmt: skip


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in a request handler")
    return error_response(500, f"Internal error: {type(exc).__name__}", "server_error", "internal_error")


# --- health, metrics, models ------------------------------------------------------------------------------------
def _runtime(http: Request) -> Runtime:
    runtime: Runtime = http.app.state.runtime
    return runtime


async def healthz(http: Request) -> JSONResponse:
    """Liveness: the process and its engine loop work (draining is still healthy)."""
    runtime = _runtime(http)
    if runtime.engine is not None and not runtime.engine.alive:
        return JSONResponse(health_body("unhealthy", runtime.engine.dead_reason), status_code=503)
    if runtime.load_error:
        return JSONResponse(health_body("unhealthy", runtime.load_error), status_code=503)
    return JSONResponse(health_body("ok"))


async def readyz(http: Request) -> JSONResponse:
    """Readiness: the model has loaded and the runtime is not draining."""
    try:
        _runtime(http).ready_engine()
    except APIError as exc:
        return JSONResponse(health_body("not ready", exc.message), status_code=503)
    return JSONResponse(health_body("ready"))


async def metrics(http: Request) -> Response:
    return Response(_runtime(http).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def models(http: Request) -> JSONResponse:
    """The hosted services; when API keys are configured, only those the caller's key (or none) opens."""
    runtime = _runtime(http)
    max_len = runtime.engine.engine.loaded.max_model_len if runtime.engine is not None else None
    model = runtime.config.model
    return JSONResponse(model_list([
        model_card(service.name, runtime.created, model.served_model_name or model.uri, service.service_class,
                   max_len if max_len is not None else model.max_model_len)
        for service in runtime.visible_services(http.headers.get("authorization"))
    ]))  # fmt: skip


# --- completions ----------------------------------------------------------------------------------------------
def _admit(runtime: Runtime, name: str, http: Request) -> ServiceConfig:
    """Draining (503), unknown service (404) and API key (401) checks, in that order."""
    if runtime.draining:
        raise draining_error()
    authorization = http.headers.get("authorization")
    service = runtime.config.service(name)
    if service is None:
        hosted = ", ".join(s.name for s in runtime.visible_services(authorization))
        raise APIError(
            404,
            f"The model `{name}` does not exist. Hosted models: {hosted or '(none for this API key)'}",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    if not runtime.may_use(name, authorization):
        raise api_key_error(f"the model `{name}`")
    return service


async def _start(engine: AsyncEngine, request: EngineRequest) -> tuple[AsyncGenerator[RequestOutput, None],
                                                                       RequestOutput]:  # fmt: skip
    """Submit the request and wait for its first output; APIError if it is refused or rejected at arrival."""
    try:
        stream = engine.generate(request)
        first = await anext(stream)
    except RequestError as exc:
        raise APIError(400, str(exc), "invalid_request_error", "invalid_request") from None
    except UnknownServiceError as exc:
        raise APIError(404, str(exc), "invalid_request_error", "model_not_found", "model") from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), "service_unavailable") from None
    if first.finish_reason == FINISH_REJECTED:
        raise rejection_error(first)
    return stream, first


def rejection_error(output: RequestOutput) -> APIError:
    """The 429 for a request refused at arrival, with its reason as `code` and a whole-second Retry-After."""
    retry_after = str(max(1, math.ceil(output.retry_after_s or 1)))
    return APIError(429, output.error or "rejected", "rate_limit_error", output.reject_reason,
                    headers={"Retry-After": retry_after})  # fmt: skip


async def _collect(first: RequestOutput, stream: AsyncGenerator[RequestOutput, None],
                   http: Request) -> tuple[str, RequestOutput]:  # fmt: skip
    """A non-streamed request's whole text and its last output."""
    text, last = first.text_delta, first
    async for output in stream:
        text += output.text_delta
        last = output
        if await http.is_disconnected():  # nobody to answer: free the KV now, not at max_tokens
            await stream.aclose()
            raise APIError(499, "client disconnected", "client_closed_request")
    return text, last


def _prompt_ids(body: CompletionRequest | ChatCompletionRequest, engine: AsyncEngine) -> list[int]:
    """The request's prompt as token ids: a completion's ids as sent or its text tokenised, a chat's messages
    through the chat template (APIError 400 when the template refuses them)."""
    tokenizer = engine.engine.tokenizer
    if isinstance(body, CompletionRequest):
        prompt = body.single_prompt()
        return list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
    try:
        text = tokenizer.apply_chat_template(body.message_dicts())
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_request_error", param="messages") from None
    # The template writes BOS itself; adding it again would double it.
    return tokenizer.encode(text, add_special_tokens=False)


def _engine_request(runtime: Runtime, engine: AsyncEngine, body: CompletionRequest | ChatCompletionRequest,
                    headers: Mapping[str, str], prompt_ids: list[int]) -> EngineRequest:  # fmt: skip
    """The engine's request for a body of a hosted service; APIError 400 for a max_tokens, sampling field or SLO
    header it cannot take."""
    chat = isinstance(body, ChatCompletionRequest)
    service = runtime.config.service(body.model)
    assert service is not None
    requested, field = (body.requested_max_tokens(), body.max_tokens_field) if chat else (body.max_tokens, "max_tokens")
    max_tokens = resolve_max_tokens(service, requested, field, len(prompt_ids), engine.engine.loaded.max_model_len,
                                    chat)  # fmt: skip
    try:
        params = body.sampling_params(max_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_request_error") from None
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    slo = _slo_from_headers(headers, runtime, service.name)
    return EngineRequest(request_id, service.name, service.service_class, prompt_ids, params, slo=slo)


async def _run(body: CompletionRequest | ChatCompletionRequest, http: Request, prompt_ids: list[int]) -> Response:
    runtime = _runtime(http)
    engine = runtime.ready_engine()
    chat = isinstance(body, ChatCompletionRequest)
    request = _engine_request(runtime, engine, body, http.headers, prompt_ids)
    request_id = request.request_id
    runtime.in_flight[request_id] = request.service_class
    handed_to_stream = False
    try:
        stream, first = await _start(engine, request)
        created = int(time.time())
        if body.stream:
            handed_to_stream = True  # the SSE generator leaves in_flight when the stream ends
            return StreamingResponse(
                _sse(first, stream, request_id, created, body.model, chat, body.include_usage, runtime),
                media_type="text/event-stream",
            )
        text, last = await _collect(first, stream, http)
        _raise_for_failure(last, request_id in runtime.cut_off)
    finally:
        if not handed_to_stream:
            runtime.in_flight.pop(request_id, None)
            runtime.cut_off.discard(request_id)
    return JSONResponse(completion_body(request_id, chat, created, body.model, text, last.finish_reason,
                                        _usage(last)))  # fmt: skip


async def completions(body: CompletionRequest, http: Request) -> Response:
    runtime = _runtime(http)
    _admit(runtime, body.model, http)
    return await _run(body, http, _prompt_ids(body, runtime.ready_engine()))


async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
    runtime = _runtime(http)
    _admit(runtime, body.model, http)
    return await _run(body, http, _prompt_ids(body, runtime.ready_engine()))


# --- LS refusals before routing (server/early_refusal.py) ------------------------------------------------------
COMPLETIONS_PATH, CHAT_COMPLETIONS_PATH = "/v1/completions", "/v1/chat/completions"
_BODY_MODELS: dict[str, type[CompletionRequest] | type[ChatCompletionRequest]] = {
    COMPLETIONS_PATH: CompletionRequest, CHAT_COMPLETIONS_PATH: ChatCompletionRequest,
}  # fmt: skip


def refuse_before_routing(runtime: Runtime, scope: Scope, body: bytes) -> Response | None:
    """The 429 the handler would answer this generate request, decided without FastAPI; None: the handler
    decides (anything else it may answer, an admission, or a body or request out of the ordinary).

    The handler's own steps (`_prompt_ids`, `_engine_request`, `validate`; any that fails sends the request on
    to the handler, which answers the error) and its refusal (`AsyncEngine.refuse_early`: the body,
    Retry-After, counters and the planner's arrival record are those of a refusal in the handler). Before
    it tokenises, it asks whether even a one-token prompt would be refused now (`refuses_every_prompt`):
    an LS request that would be admitted costs it a JSON parse and that question."""
    headers = Headers(scope=scope)
    if headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
        return None  # FastAPI's content-type rules decide the rest
    try:  # as FastAPI reads it: json.loads, then the body model's validation
        parsed = _BODY_MODELS[scope["path"]].model_validate(json.loads(body))
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, a bad field: FastAPI's 400 names it
        return None
    service = runtime.config.service(parsed.model)
    engine = runtime.engine
    if service is None or service.service_class != "LS" or runtime.draining or engine is None or not engine.alive:
        return None
    try:
        slo = _slo_from_headers(headers, runtime, service.name)
        # The key after the question: a request it lets through has its key checked once, by the handler.
        if not engine.engine.refuses_every_prompt(service.name, slo) or not runtime.may_use(
            service.name, headers.get("authorization")
        ):
            return None
        request = _engine_request(runtime, engine, parsed, headers, _prompt_ids(parsed, engine))
        engine.engine.validate(request)
    except (APIError, RequestError, UnknownServiceError):
        return None
    refused = engine.refuse_early(request, forwarding=False)
    return rejection_error(refused).response() if refused is not None else None


# --- the app ----------------------------------------------------------------------------------------------------
_METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format (version 0.0.4)",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
_POST_SECURITY: list[dict[str, list[str]]] = [{}, {"bearer": []}]  # the key is per service, optional
_NOT_READY = {503: {"model": Health, "description": "loading, engine stopped, or draining"}}
_COMPLETION_RESPONSES = {200: {"model": CompletionResponse, "content": _SSE}, **POST_ERROR_RESPONSES}
_CHAT_RESPONSES = {200: {"model": ChatCompletionResponse, "content": _SSE}, **POST_ERROR_RESPONSES}


# A feature built on the server (the Batch API, batch/): it adds its routes to the app and returns what runs
# while the app serves (entered at start-up, left at shutdown).
AppExtension = Callable[[FastAPI, Runtime], AbstractAsyncContextManager[None]]


def create_app(runtime: Runtime, extensions: Sequence[AppExtension] = ()) -> FastAPI:
    running: list[AbstractAsyncContextManager[None]] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for context in running:
                await stack.enter_async_context(context)
            yield

    app = FastAPI(
        title="Piggyback runtime",
        version="0.1.0",
        description="OpenAI-compatible API of a Piggyback runtime: one `model` per hosted service.",
        lifespan=lifespan,
    )
    app.openapi = lambda: custom_openapi(app)  # type: ignore[method-assign]
    app.state.runtime = runtime
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

    app.add_api_route("/healthz", healthz, methods=["GET"], response_model=Health,
                      responses={503: {"model": Health, "description": "not healthy"}})  # fmt: skip
    app.add_api_route("/readyz", readyz, methods=["GET"], response_model=Health,
                      responses=_NOT_READY)  # fmt: skip
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse,
                      responses=_METRICS_RESPONSES)  # fmt: skip
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=ModelList)
    app.add_api_route(COMPLETIONS_PATH, completions, methods=["POST"], response_model=None,
                      openapi_extra={"security": _POST_SECURITY},
                      responses=_COMPLETION_RESPONSES)  # fmt: skip
    app.add_api_route(CHAT_COMPLETIONS_PATH, chat_completions, methods=["POST"], response_model=None,
                      openapi_extra={"security": _POST_SECURITY},
                      responses=_CHAT_RESPONSES)  # fmt: skip
    # Under overload most LS requests are refused: answered before FastAPI's stack (server/early_refusal.py).
    app.add_middleware(EarlyRefusal, paths=tuple(_BODY_MODELS),
                       refuse=lambda scope, body: refuse_before_routing(runtime, scope, body))  # fmt: skip
    # The pool router's endpoints: token-level streams and live migration (server/internal.py).
    register_internal_routes(app, runtime)
    running.extend(extend(app, runtime) for extend in extensions)
    return app


def _raise_for_failure(output: RequestOutput, cut_off: bool = False) -> None:
    if output.finish_reason == FINISH_ERROR and cut_off:
        raise APIError(503, f"The runtime is shutting down: {output.error}", "service_unavailable", "draining",
                       headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})  # fmt: skip
    if output.finish_reason == FINISH_ERROR:
        raise APIError(500, f"The runtime failed this request: {output.error}", "server_error", "engine_error")
    if output.finish_reason == FINISH_ABORT:
        raise APIError(503, "The request was aborted by the runtime", "service_unavailable")


def _usage(output: RequestOutput) -> dict[str, int]:
    return usage(output.num_prompt_tokens, output.num_output_tokens)


async def _sse(
    first: RequestOutput,
    rest: AsyncGenerator[RequestOutput, None],
    request_id: str,
    created: int,
    model: str,
    chat: bool,
    include_usage: bool,
    runtime: Runtime,
) -> AsyncIterator[str]:
    """Server-sent events exactly as OpenAI sends them, ending with `data: [DONE]`."""

    def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
        return stream_chunk(request_id, chat, created, model, choice, include_usage, usage)

    def choice(output: RequestOutput) -> dict[str, Any]:
        return stream_choice(chat, output.text_delta, output.finish_reason if output.finished else None)

    def error(output: RequestOutput) -> str:
        return _sse_error(output, request_id in runtime.cut_off)

    try:
        async for chunk in _sse_events(first, rest, event, choice, error, chat, include_usage):
            yield chunk
    finally:
        runtime.in_flight.pop(request_id, None)
        runtime.cut_off.discard(request_id)
        await rest.aclose()  # a client that went away mid-stream aborts its request and frees its KV


async def _sse_events(
    first: RequestOutput,
    rest: AsyncIterator[RequestOutput],
    event: Callable[..., str],
    choice: Callable[..., dict[str, Any]],
    error: Callable[[RequestOutput], str],
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The events, one write per engine output, sent as soon as it came: the role goes with the first text,
    and the last text with the usage and [DONE] (the stream ends right after it; each write costs the HTTP
    thread a trip through the response machinery)."""
    pending = event(chat_role_choice()) if chat else ""
    # A failure ends the stream with an error event, then [DONE] as for any stream (clients wait for it).
    if first.finished and first.finish_reason in (FINISH_ERROR, FINISH_ABORT):
        yield pending + error(first) + SSE_DONE
        return
    if first.text_delta or first.finished:
        pending += event(choice(first))
    if pending and not first.finished:
        yield pending
        pending = ""
    last = first
    async for output in rest:
        last = output
        if output.finished and output.finish_reason in (FINISH_ERROR, FINISH_ABORT):
            # Text the request produced before it failed is still sent, then the error.
            if output.text_delta:
                pending += event({**choice(output), "finish_reason": None})
            yield pending + error(output) + SSE_DONE
            return
        if output.text_delta or output.finished:
            pending += event(choice(output))
        if pending and not output.finished:
            yield pending
            pending = ""
    if include_usage:
        pending += event(None, _usage(last))
    yield pending + SSE_DONE


def _sse_error(output: RequestOutput, cut_off: bool = False) -> str:
    if cut_off and output.finish_reason == FINISH_ERROR:
        # Retryable: the request did nothing wrong; the replica is going away.
        return sse_error(f"The runtime is shutting down: {output.error}", "service_unavailable", "draining")
    message = f"The runtime failed this request: {output.error or output.finish_reason}"
    return sse_error(message, "server_error", "engine_error")
