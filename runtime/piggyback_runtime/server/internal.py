"""The runtime's internal HTTP endpoints, under /internal/v1/, for the pool router (router/app.py), never clients.

- POST /internal/v1/generate: a completions or chat body (as the OpenAI endpoints take it, plus `kind`);
  answers NDJSON, one line per engine output (`output_line`): {"request_id", "token_ids", "text",
  "num_prompt_tokens", "num_output_tokens", "finished", "finish_reason", "error"}; a request migrated away
  ends its stream with {"migrated_to": "<target base url>", "request_id": ...}. Rejections answer 429 before
  the stream starts.
- POST /internal/v1/requests/{id}/migrate {"target": url}: the source freezes the request between two
  iterations, exports it, pushes it to the target's import, then frees its KV and ends its stream with
  `migrated_to` — only after the target said 200. Refused (4xx), timed out or unreachable target: the source
  resumes the request where it was, and answers 409 (refused) or 502 (target failed), outcome in the body.
- POST /internal/v1/import: the body migration.encode_import writes. The target holds the request's output
  stream until the router picks it up.
- GET /internal/v1/requests/{id}/stream: that stream (NDJSON as above), continuing where the source stopped.
- GET /internal/v1/load: this replica's load for routing (router.policy.ReplicaLoad's fields).
- GET /internal/v1/profile: what the router's stage planner needs (router/app.py ReplicaProfile): the SLO
  controller's latency model (LatencyModel.to_dict), KV capacity, max batch rows, max context; 503 without one.

The engine's side of a migration (freeze, export, import, commit, resume) is migration.Migrator; errors are
OpenAI's envelope (server/protocol.py).

Authentication: the internal endpoints need `Authorization: Bearer $PIGGYBACK_INTERNAL_TOKEN` when that
variable is set (the operator fills it from a per-pool Secret); a separate token from the services' API
keys, because the router must reach every service and clients must not reach these endpoints.

Failure semantics: a frozen request the router never resolves (router died mid-migration) is resumed after
migration.FROZEN_TIMEOUT_S; an imported stream nobody picks up within PICKUP_TIMEOUT_S is aborted (its KV freed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from piggyback_runtime import metrics as m
from piggyback_runtime.config import CLIENT_AUTHORIZATION_HEADER, INTERNAL_TOKEN_ENV
from piggyback_runtime.engine import AdmissionRejected, RequestError, UnknownServiceError
from piggyback_runtime.migration import (
    FINISH_MIGRATED,
    FROZEN_TIMEOUT_S,
    MigrationRefused,
    Migrator,
    NotBetweenSteps,
    decode_import,
    encode_import,
)
from piggyback_runtime.request import FINISH_REJECTED, RequestOutput
from piggyback_runtime.request import Request as EngineRequest
from piggyback_runtime.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_response,
    resolve_max_tokens,
)

if TYPE_CHECKING:
    from piggyback_runtime.server.app import Runtime
    from piggyback_runtime.server.async_engine import AsyncEngine

log = logging.getLogger(__name__)

EXPORT_WAIT_S = 5.0  # how long the source waits for the request to be between two tokens before giving up
IMPORT_TIMEOUT_S = 10.0  # the source waits this long for the target's import before resuming the request
PICKUP_TIMEOUT_S = 30.0  # an imported request whose stream nobody picks up is aborted


def output_line(output: RequestOutput) -> str:
    return json.dumps({
        "request_id": output.request_id, "token_ids": output.new_token_ids, "text": output.text_delta,
        "num_prompt_tokens": output.num_prompt_tokens, "num_output_tokens": output.num_output_tokens,
        "finished": output.finished, "finish_reason": output.finish_reason, "error": output.error,
    }) + "\n"  # fmt: skip


def migrated_line(request_id: str, target: str | None) -> str:
    return json.dumps({"request_id": request_id, "migrated_to": target}) + "\n"


def _outcome(outcome: str, status: int = 200, **fields: Any) -> JSONResponse:
    """A migration's answer to the router: its outcome (metrics.MIGRATION_*) and details."""
    return JSONResponse({"outcome": outcome, **fields}, status_code=status)


def _engine_request(runtime: Runtime, engine: AsyncEngine, raw: Any, authorization: str | None) -> EngineRequest:
    """The engine request a /generate body describes; APIError (with its status) when it cannot be served."""
    kind = raw.pop("kind", "completions") if isinstance(raw, dict) else None
    request_id = raw.pop("request_id", None) if isinstance(raw, dict) else None
    tokenizer = engine.engine.tokenizer
    try:
        if kind == "chat":
            chat_body = ChatCompletionRequest.model_validate(raw)
            text = tokenizer.apply_chat_template(chat_body.message_dicts())
            prompt_ids = tokenizer.encode(text, add_special_tokens=False)
            body: CompletionRequest | ChatCompletionRequest = chat_body
            requested, field = chat_body.requested_max_tokens(), chat_body.max_tokens_field
        elif kind == "completions":
            body = CompletionRequest.model_validate(raw)
            prompt = body.single_prompt()
            prompt_ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
            requested, field = body.max_tokens, "max_tokens"
        else:
            raise APIError(400, "kind must be `completions` or `chat`", "invalid_request_error")
        service = runtime.config.service(body.model)
        if service is None:
            raise APIError(404, f"the model `{body.model}` is not hosted here", "invalid_request_error",
                           "model_not_found")  # fmt: skip
        # The router passes the client's own Authorization on: the service's API key still applies.
        if not runtime.may_use(service.name, authorization):
            raise APIError(401, f"Incorrect or missing API key for the model `{service.name}`",
                           "invalid_request_error", "invalid_api_key")  # fmt: skip
        max_tokens = resolve_max_tokens(service, requested, field, len(prompt_ids),
                                        engine.engine.loaded.max_model_len, kind == "chat")  # fmt: skip
        params = body.sampling_params(max_tokens)
    except (ValidationError, ValueError) as exc:
        raise APIError(400, str(exc), "invalid_request_error", "invalid_request") from None
    return EngineRequest(str(request_id or f"rt-{time.monotonic_ns()}"), service.name, service.service_class,
                         prompt_ids, params)  # fmt: skip


class InternalEndpoints:
    """The state the internal endpoints share (the migrator, imported streams awaiting pick-up, where
    migrated requests went) and one method per endpoint."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.token = os.environ.get(INTERNAL_TOKEN_ENV, "").encode()
        self._migrator: Migrator | None = None
        self._expiry: asyncio.Future[None] | None = None
        self.pending: dict[str, tuple[AsyncIterator[RequestOutput], Any]] = {}  # imported: stream, class
        self.targets: dict[str, str] = {}  # request id -> the runtime it migrated to, until its stream ends

    # --- plumbing -------------------------------------------------------------------------------------------
    # A dependency, not an HTTP middleware: a middleware would wrap every public stream too (Starlette's
    # BaseHTTPMiddleware buffers streaming and hides client disconnects from the handlers).
    def require_token(self, http: Request) -> None:
        if not self.token:
            return
        scheme, _, presented = (http.headers.get("authorization") or "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self.token)):
            raise HTTPException(401, f"internal endpoint: send `Authorization: Bearer ${INTERNAL_TOKEN_ENV}`")

    def migrator(self) -> Migrator:
        engine = self.runtime.ready_engine()
        if self._migrator is None:
            self._migrator = Migrator(engine.engine, self.runtime.metrics)
            # Called from a handler, so on the server's loop: resume what a vanished router left frozen.
            self._expiry = asyncio.ensure_future(self._expire_frozen_forever())
        return self._migrator

    async def on_engine(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.runtime.ready_engine().call(fn))

    def ndjson(self, stream: AsyncIterator[RequestOutput], first: RequestOutput | None, request_id: str,
               service_class: Any) -> StreamingResponse:  # fmt: skip
        # In flight like a public request: a drain waits for it, and cuts it off with an error line at the end.
        runtime = self.runtime
        runtime.in_flight[request_id] = service_class

        async def lines() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield output_line(first)
                    if first.finished:
                        return
                async for output in stream:
                    if output.finish_reason == FINISH_MIGRATED:
                        yield migrated_line(output.request_id, self.targets.pop(output.request_id, None))
                        return
                    yield output_line(output)
            finally:
                runtime.in_flight.pop(request_id, None)
                runtime.cut_off.discard(request_id)
                await stream.aclose()  # type: ignore[attr-defined]

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # --- routing information --------------------------------------------------------------------------------
    async def load(self) -> JSONResponse:
        runtime = self.runtime
        engine = runtime.ready_engine().engine
        running = len(engine.scheduler.running)
        pb = engine.runner.piggyback
        if pb is not None:
            running += len(pb.rows)
        host_kv = engine.planner.host_kv
        host_free = 0 if host_kv is None else host_kv.allocator.num_free * host_kv.block_size
        return JSONResponse({
            "running": running, "waiting": len(engine.scheduler.waiting) + len(engine.host_kv_waiting),
            "kv_free_tokens": engine.allocator.num_free * engine.allocator.block_size,
            "host_kv_free_tokens": host_free, "admitting": not runtime.draining,
            "services": {s.name: s.service_class for s in runtime.config.services},
        })  # fmt: skip

    async def profile(self) -> JSONResponse:
        # What the router's stage planner needs to know of this replica's speed: the latency model the SLO
        # controller predicts iterations with (its coefficients; the router rebuilds it, torch-free, with
        # LatencyModel.from_dict), and the capacity limits that bound a decode batch.
        engine = self.runtime.ready_engine().engine
        slo = engine.planner.slo
        if slo is None:
            return error_response(503, "this replica has no latency model: its SLO control is off "
                                       "(slo_control.enabled false, or a policy without SLO control); the router "
                                       "keeps its stage plan", "service_unavailable")  # fmt: skip
        return JSONResponse({
            "latency_model": slo.latency_model.to_dict(),
            "kv_capacity_tokens": engine.allocator.num_blocks * engine.allocator.block_size,
            "max_batch_rows": engine.config.engine.max_num_seqs,
            "max_context_tokens": engine.loaded.max_model_len,
        })  # fmt: skip

    # --- token streams --------------------------------------------------------------------------------------
    async def generate(self, http: Request) -> Response:
        engine = self.runtime.ready_engine()
        try:
            request = _engine_request(self.runtime, engine, await http.json(),
                                      http.headers.get(CLIENT_AUTHORIZATION_HEADER))  # fmt: skip
            try:
                stream = engine.generate(request)
                first = await anext(stream)
            except RequestError as exc:
                raise APIError(400, str(exc), "invalid_request_error", "invalid_request") from None
            except UnknownServiceError as exc:
                raise APIError(404, str(exc), "invalid_request_error", "model_not_found") from None
        except APIError as exc:
            return exc.response()
        if first.finish_reason == FINISH_REJECTED:
            await stream.aclose()
            return error_response(429, first.error or "rejected", "rate_limit_error", first.reject_reason,
                                  headers={"Retry-After": str(max(1, round(first.retry_after_s or 1)))})  # fmt: skip
        return self.ndjson(stream, first, request.request_id, request.service_class)

    async def pick_up(self, request_id: str) -> Response:
        entry = self.pending.pop(request_id, None)
        if entry is None:
            return error_response(404, f"no imported request {request_id!r} waits for pick-up here")
        return self.ndjson(entry[0], None, request_id, entry[1])

    # --- migration: source side -----------------------------------------------------------------------------
    async def migrate(self, request_id: str, http: Request) -> JSONResponse:
        target = str((await http.json()).get("target", "")).rstrip("/")
        if not target.startswith(("http://", "https://")):
            return error_response(400, 'body must be {"target": "http://host:port"}')
        mig = self.migrator()
        metrics = self.runtime.metrics
        started = time.monotonic()
        try:
            header, payload = await self._export_between_steps(mig, request_id, started + EXPORT_WAIT_S)
        except MigrationRefused as exc:
            metrics.migrations.labels("out", m.MIGRATION_NOT_READY).inc()
            return _outcome(m.MIGRATION_NOT_READY, 409, detail=str(exc))
        headers = {"content-type": "application/octet-stream"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token.decode()}"
        try:
            async with httpx.AsyncClient(timeout=IMPORT_TIMEOUT_S) as client:
                answer = await client.post(f"{target}/internal/v1/import", content=encode_import(header, payload),
                                           headers=headers)  # fmt: skip
        except httpx.HTTPError as exc:
            await self.on_engine(lambda: mig.resume(request_id))
            metrics.migrations.labels("out", m.MIGRATION_FAILED).inc()
            return _outcome(m.MIGRATION_FAILED, 502, detail=f"target unreachable: {exc!r}")
        if answer.status_code != 200:
            await self.on_engine(lambda: mig.resume(request_id))
            metrics.migrations.labels("out", m.MIGRATION_REFUSED).inc()
            return _outcome(m.MIGRATION_REFUSED, 409, detail=answer.text[:500])
        self.targets[request_id] = target
        output = await self.on_engine(lambda: mig.commit(request_id))
        if output is not None:
            self.runtime.ready_engine().deliver(output)
        metrics.migrations.labels("out", m.MIGRATION_DONE).inc()
        metrics.migration_seconds.observe(time.monotonic() - started)
        return _outcome(m.MIGRATION_DONE, kv_bytes=len(payload))

    async def _export_between_steps(self, mig: Migrator, request_id: str,
                                    deadline_s: float) -> tuple[dict[str, Any], bytes]:  # fmt: skip
        # A BE token walks the layers over several iterations and can leave only between two tokens: ask
        # again before each iteration until it is there (a command runs between two iterations).
        while True:
            try:
                return await self.on_engine(lambda: mig.export(request_id))  # type: ignore[no-any-return]
            except NotBetweenSteps:
                if time.monotonic() > deadline_s:
                    raise
                await asyncio.sleep(0.001)

    async def _expire_frozen_forever(self) -> None:
        while True:
            await asyncio.sleep(FROZEN_TIMEOUT_S / 4)
            runtime = self.runtime
            if self._migrator is not None and runtime.engine is not None and runtime.engine.alive:
                await self.on_engine(self._migrator.expire_frozen)

    # --- migration: target side -----------------------------------------------------------------------------
    async def import_(self, http: Request) -> JSONResponse:
        runtime = self.runtime
        engine = runtime.ready_engine()
        if runtime.draining:
            return error_response(409, "draining: not taking migrations")
        mig = self.migrator()
        try:
            header, payload = decode_import(await http.body())
            request_id = str(header.get("request_id"))
            stream = engine.attach(request_id)  # listen before the request exists: no output is missed
            try:
                await self.on_engine(lambda: mig.import_request(header, payload))
            except BaseException:
                engine.detach(request_id, abort=False)  # the request never entered this engine
                raise
        except (MigrationRefused, AdmissionRejected) as exc:
            runtime.metrics.migrations.labels("in", m.MIGRATION_REFUSED).inc()
            return error_response(409, str(exc))
        except (RequestError, UnknownServiceError) as exc:
            runtime.metrics.migrations.labels("in", m.MIGRATION_REFUSED).inc()
            return error_response(400, str(exc))
        self.pending[request_id] = (stream, header.get("service_class"))
        runtime.metrics.migrations.labels("in", m.MIGRATION_DONE).inc()
        asyncio.get_running_loop().call_later(PICKUP_TIMEOUT_S, lambda: self._expire_pickup(request_id))
        return _outcome(m.MIGRATION_DONE)

    def _expire_pickup(self, request_id: str) -> None:
        entry = self.pending.pop(request_id, None)
        if entry is not None:
            log.warning("imported request %s: nobody picked up its stream in %.0f s; aborting it", request_id,
                        PICKUP_TIMEOUT_S)  # fmt: skip
            if self.runtime.engine is not None:  # the stream never started: closing it would skip its cleanup
                self.runtime.engine.detach(request_id, abort=True)


def register_internal_routes(app: FastAPI, runtime: Runtime) -> InternalEndpoints:
    """Add the /internal/v1/ endpoints (see the module docstring) to the runtime's app."""
    endpoints = InternalEndpoints(runtime)
    guarded: dict[str, Any] = {"include_in_schema": False, "dependencies": [Depends(endpoints.require_token)]}
    app.add_api_route("/internal/v1/load", endpoints.load, methods=["GET"], **guarded)
    app.add_api_route("/internal/v1/profile", endpoints.profile, methods=["GET"], **guarded)
    app.add_api_route("/internal/v1/generate", endpoints.generate, methods=["POST"], **guarded)
    app.add_api_route("/internal/v1/requests/{request_id}/migrate", endpoints.migrate, methods=["POST"], **guarded)
    app.add_api_route("/internal/v1/import", endpoints.import_, methods=["POST"], **guarded)
    app.add_api_route("/internal/v1/requests/{request_id}/stream", endpoints.pick_up, methods=["GET"], **guarded)
    return endpoints
