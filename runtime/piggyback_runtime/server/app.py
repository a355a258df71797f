"""FastAPI app: OpenAI-compatible completions and chat completions, models, health, readiness, metrics.

The request's `model` field names the service (the LLMService name). The model loads in the background
after the server starts, so /healthz answers at once and /readyz turns ready when the engine can serve.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import Engine, RequestError, UnknownServiceError
from piggyback_runtime.metrics import RuntimeMetrics
from piggyback_runtime.request import FINISH_ABORT, FINISH_ERROR, FINISH_REJECTED, RequestOutput, SLOTarget
from piggyback_runtime.request import Request as EngineRequest
from piggyback_runtime.server.async_engine import AsyncEngine, EngineDeadError
from piggyback_runtime.server.protocol import ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger(__name__)

SLO_TTFT_HEADER = "x-slo-ttft-ms"
SLO_TPOT_HEADER = "x-slo-tpot-ms"


class APIError(Exception):
    def __init__(
        self, status: int, message: str, err_type: str, code: str | None = None, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.err_type, self.code, self.param = status, message, err_type, code, param
        self.headers = headers


class Runtime:
    """Everything the HTTP layer needs; the engine appears once the model has loaded."""

    def __init__(self, config: RuntimeConfig, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.config = config
        self.metrics = RuntimeMetrics()
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self._factory = engine_factory or (lambda: Engine(config, metrics=self.metrics))
        self.created = int(time.time())

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
        if self.engine is None:
            detail = f"model load failed: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, f"Not ready: {detail}", "service_unavailable", "not_ready")
        if not self.engine.alive:
            raise APIError(503, f"Engine stopped: {self.engine.dead_reason}", "service_unavailable", "engine_dead")
        return self.engine


def _slo_from_headers(request: Request, runtime: Runtime, service: str) -> SLOTarget | None:
    ttft, tpot = request.headers.get(SLO_TTFT_HEADER), request.headers.get(SLO_TPOT_HEADER)
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


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="Piggyback runtime", version="0.1.0")
    app.state.runtime = runtime

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.err_type, exc.code, exc.param), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if p != "body")
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (not an OpenAI parameter this runtime accepts)"
            problems.append(f"{loc}: {msg}" if loc else msg)
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return JSONResponse(
            error_body("Invalid request: " + "; ".join(problems), "invalid_request_error", "invalid_request", param),
            status_code=400,
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if runtime.engine is not None and not runtime.engine.alive:
            return JSONResponse({"status": "unhealthy", "reason": runtime.engine.dead_reason}, status_code=503)
        if runtime.load_error:
            return JSONResponse({"status": "unhealthy", "reason": runtime.load_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            runtime.ready_engine()
        except APIError as exc:
            return JSONResponse({"status": "not ready", "reason": exc.message}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": service.name,
                    "object": "model",
                    "created": runtime.created,
                    "owned_by": "piggyback",
                    "root": runtime.config.model.served_model_name or runtime.config.model.uri,
                    "service_class": service.service_class,
                    "max_model_len": runtime.config.model.max_model_len,
                }
                for service in runtime.config.services
            ],
        }

    def _check_service(name: str) -> None:
        if runtime.config.service(name) is None:
            hosted = ", ".join(s.name for s in runtime.config.services)
            raise APIError(
                404,
                f"The model `{name}` does not exist. Hosted models: {hosted}",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    async def _run(
        body: CompletionRequest | ChatCompletionRequest,
        http: Request,
        prompt_ids: list[int],
        max_tokens: int | None,
        chat: bool,
    ) -> Response:
        engine = runtime.ready_engine()
        service = runtime.config.service(body.model)
        assert service is not None
        max_len = engine.engine.loaded.max_model_len
        if max_tokens is None:
            max_tokens = max(1, max_len - len(prompt_ids))
        try:
            params = body.sampling_params(max_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_request_error") from None
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        request = EngineRequest(
            request_id,
            service.name,
            service.service_class,
            prompt_ids,
            params,
            slo=_slo_from_headers(http, runtime, service.name),
        )
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
            retry_after = str(max(1, math.ceil(first.retry_after_s or 1)))
            raise APIError(429, first.error or "rejected", "rate_limit_error", first.reject_reason,
                           headers={"Retry-After": retry_after})  # fmt: skip
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                _sse(first, stream, request_id, created, body.model, chat, body.include_usage),
                media_type="text/event-stream",
            )
        text, last = first.text_delta, first
        async for output in stream:
            text += output.text_delta
            last = output
            if await http.is_disconnected():  # nobody to answer: free the KV now, not at max_tokens
                await stream.aclose()
                raise APIError(499, "client disconnected", "client_closed_request")
        _raise_for_failure(last)
        usage = _usage(last)
        if chat:
            return JSONResponse({
                "id": request_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": last.finish_reason}],
                "usage": usage,
            })  # fmt: skip
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": usage,
        })  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Response:
        _check_service(body.model)
        engine = runtime.ready_engine()
        prompt = body.single_prompt()
        prompt_ids = list(prompt) if isinstance(prompt, list) else engine.engine.tokenizer.encode(prompt)
        return await _run(body, http, prompt_ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
        _check_service(body.model)
        tokenizer = runtime.ready_engine().engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(body.message_dicts())
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_request_error", param="messages") from None
        # The template writes BOS itself; adding it again would double it.
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        return await _run(body, http, prompt_ids, body.requested_max_tokens(), chat=True)

    return app


def _raise_for_failure(output: RequestOutput) -> None:
    if output.finish_reason == FINISH_ERROR:
        raise APIError(500, f"The runtime failed this request: {output.error}", "server_error", "engine_error")
    if output.finish_reason == FINISH_ABORT:
        raise APIError(503, "The request was aborted by the runtime", "service_unavailable")


def _usage(output: RequestOutput) -> dict[str, int]:
    return {
        "prompt_tokens": output.num_prompt_tokens,
        "completion_tokens": output.num_output_tokens,
        "total_tokens": output.num_prompt_tokens + output.num_output_tokens,
    }


async def _sse(
    first: RequestOutput,
    rest: AsyncGenerator[RequestOutput, None],
    request_id: str,
    created: int,
    model: str,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events exactly as OpenAI sends them, ending with `data: [DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
        payload: dict[str, Any] = {
            "id": request_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice] if choice is not None else [],
        }
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(output: RequestOutput) -> dict[str, Any]:
        finish = output.finish_reason if output.finished else None
        if chat:
            delta: dict[str, Any] = {"content": output.text_delta} if output.text_delta else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": output.text_delta, "logprobs": None, "finish_reason": finish}

    try:
        async for chunk in _sse_events(first, rest, event, choice, chat, include_usage):
            yield chunk
    finally:
        await rest.aclose()  # a client that went away mid-stream aborts its request and frees its KV


async def _sse_events(
    first: RequestOutput,
    rest: AsyncIterator[RequestOutput],
    event: Callable[..., str],
    choice: Callable[..., dict[str, Any]],
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    last = first
    if chat:
        yield event(
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )
    if first.finished and first.finish_reason in (FINISH_ERROR, FINISH_ABORT):
        yield _sse_error(first)
        return
    if first.text_delta or first.finished:
        yield event(choice(first))
    async for output in rest:
        last = output
        if output.finished and output.finish_reason in (FINISH_ERROR, FINISH_ABORT):
            yield _sse_error(output)
            return
        if output.text_delta or output.finished:
            yield event(choice(output))
    if include_usage:
        yield event(None, _usage(last))
    yield "data: [DONE]\n\n"


def _sse_error(output: RequestOutput) -> str:
    message = f"The runtime failed this request: {output.error or output.finish_reason}"
    return f"data: {json.dumps(error_body(message, 'server_error', 'engine_error'))}\n\n"
