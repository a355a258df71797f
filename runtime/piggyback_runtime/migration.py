"""Live migration of a running request, with its KV, from one runtime to another (L4's stage hand-over).

Internal HTTP endpoints, under /internal/v1/, used by the pool router (router/app.py), never by clients:
- POST /internal/v1/generate: a completions or chat body (as the OpenAI endpoints take it, plus `kind`);
  answers NDJSON, one line per engine output: {"request_id", "token_ids", "text", "num_prompt_tokens",
  "num_output_tokens", "finished", "finish_reason", "error"}; a request migrated away ends its stream with
  {"migrated_to": "<target base url>", "request_id": ...}. Rejections answer 429 before the stream starts.
- POST /internal/v1/requests/{id}/migrate {"target": url}: the source freezes the request between two
  iterations, exports it, pushes it to the target's import, then frees its KV and ends its stream with
  `migrated_to` — only after the target said 200. Refused (4xx), timed out or unreachable target: the source
  resumes the request where it was, and answers 409 (refused) or 502 (target failed), outcome in the body.
- POST /internal/v1/import: binary body (a 4-byte big-endian header length, a JSON header, then raw K and V
  bytes). The target holds the request's output stream until the router picks it up.
- GET /internal/v1/requests/{id}/stream: that stream (NDJSON as above), continuing where the source stopped.
- GET /internal/v1/load: this replica's load for routing (router.policy.ReplicaLoad's fields).
- GET /internal/v1/profile: what the router's stage planner needs (router/app.py ReplicaProfile): the SLO
  controller's latency model (LatencyModel.to_dict), KV capacity, max batch rows, max context; 503 without one.

What moves: prompt and output token ids, sampling params (the seed too: sampling draws from a hash of
(seed, token index), sampling.py, so an exported seed continues the same random stream), the incremental
detokeniser state, the SLO target and the request's timings (re-based onto the target's clock), and its KV:
accelerator KV for requests that decode on the accelerator (LS), host KV for those on the CPU path (BE), in
both cases the rows of positions [0, num_computed_tokens). The next token is computed on the target from
exactly these bytes, so a greedy request continues token for token as it would have without migrating.

Authentication: the internal endpoints need `Authorization: Bearer $PIGGYBACK_INTERNAL_TOKEN` when that
variable is set (the operator fills it from a per-pool Secret); a separate token from the services' API
keys, because the router must reach every service and clients must not reach these endpoints.

Failure semantics: a frozen request the router never resolves (router died mid-migration) is resumed after
FROZEN_TIMEOUT_S; an imported stream nobody picks up within PICKUP_TIMEOUT_S is aborted (its KV freed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from piggyback_runtime import metrics as m
from piggyback_runtime.engine import AdmissionRejected, Engine, RequestError, UnknownServiceError
from piggyback_runtime.request import FINISH_REJECTED, RequestOutput, RequestStatus, SamplingParams, SLOTarget
from piggyback_runtime.request import Request as EngineRequest
from piggyback_runtime.router import CLIENT_AUTHORIZATION_HEADER, INTERNAL_TOKEN_ENV
from piggyback_runtime.sampling import request_seed

if TYPE_CHECKING:
    from piggyback_runtime.server.app import Runtime

log = logging.getLogger(__name__)

FINISH_MIGRATED = "migrated"  # the source's stream ends so: the request goes on elsewhere
EXPORT_WAIT_S = 5.0  # how long the source waits for the request to be between two tokens before giving up
IMPORT_TIMEOUT_S = 10.0  # the source waits this long for the target's import before resuming the request
FROZEN_TIMEOUT_S = 30.0  # a frozen request nobody commits or resumes is resumed (the router died)
PICKUP_TIMEOUT_S = 30.0  # an imported request whose stream nobody picks up is aborted
_HEADER_LEN = struct.Struct(">I")


class MigrationRefused(Exception):
    """The request cannot be exported or imported now (unknown, not in decode, no room); HTTP 409."""


class NotBetweenSteps(MigrationRefused):
    """The request is mid-token (a BE token walking the layers, or still prefilling): try again shortly."""


@dataclass
class Frozen:
    request: EngineRequest
    on_host_path: bool
    be_row: Any  # the BE row taken off the CPU path (piggyback.be_path.BERow), None for accelerator requests
    frozen_s: float


# --- on the engine thread -------------------------------------------------------------------------------------
def _positions(blocks: list[int], num_tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, offset) of every position in [0, num_tokens)."""
    positions = torch.arange(num_tokens)
    table = torch.tensor(blocks, dtype=torch.long)
    return table[positions // block_size], positions % block_size


def _cache_and_blocks(engine: Engine, request_id: str, on_host_path: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[int], int]:  # fmt: skip
    if on_host_path:
        pb = engine.runner.piggyback
        assert pb is not None
        return pb.buffers.key_cache, pb.buffers.value_cache, pb.host_kv.blocks_of(request_id), pb.block_size
    cache = engine.runner.kv_cache
    return cache.key, cache.value, engine.allocator.blocks_of(request_id), cache.block_size


class Migrator:
    """Freeze / export / commit / resume on the source and import on the target; methods run on the engine
    thread (through AsyncEngine.call), so they see the engine between two iterations, never inside one."""

    def __init__(self, engine: Engine, metrics: m.RuntimeMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.frozen: dict[str, Frozen] = {}

    def export(self, request_id: str) -> tuple[dict[str, Any], bytes]:
        """Freeze the request (it stops being scheduled, keeps its KV) and return its header and KV bytes."""
        engine = self.engine
        request = engine.requests.get(request_id)
        if request is None or request_id in self.frozen:
            raise MigrationRefused(f"request {request_id!r} is not running here")
        on_host_path = engine.planner.on_host_path(request)
        be_row = None
        if on_host_path:
            pb = engine.runner.piggyback
            be_row = pb.rows.get(request_id) if pb is not None else None
            # Only between tokens (the row waits to enter layer 0): no CPU task of it is in flight.
            if be_row is None or be_row.state != "enter" or be_row.released:
                raise NotBetweenSteps(f"request {request_id!r} is not between two decode steps; retry")
            assert pb is not None
            del pb.rows[request_id]
        else:
            if request not in engine.scheduler.running or not request.in_decode:
                raise NotBetweenSteps(f"request {request_id!r} is not decoding (still prefilling); retry")
            engine.scheduler.running.remove(request)
        request_seed(request)  # an unseeded request gets its seed now, so it travels with it
        # On the CPU path the row's position counts the computed tokens (the request's counter stays at its
        # value from when it left the accelerator).
        num_computed = be_row.position if be_row is not None else request.num_computed_tokens
        key, value, blocks, block_size = _cache_and_blocks(engine, request_id, on_host_path)
        block_index, offset = _positions(blocks, num_computed, block_size)
        key_rows = key[:, block_index, offset].contiguous().cpu()  # [layers, tokens, heads, dim]
        value_rows = value[:, block_index, offset].contiguous().cpu()
        self.frozen[request_id] = Frozen(request, on_host_path, be_row, time.monotonic())
        now = time.monotonic()
        p = request.params
        header = {
            "request_id": request.request_id, "service": request.service, "service_class": request.service_class,
            "prompt_token_ids": request.prompt_token_ids, "output_token_ids": request.output_token_ids,
            "num_computed_tokens": num_computed,
            "params": {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                       "seed": p.seed, "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids),
                       "ignore_eos": p.ignore_eos},
            "generator": request.generator,
            "slo": None if request.slo is None else {"ttft_s": request.slo.ttft_s, "tpot_s": request.slo.tpot_s},
            # Timings as ages (seconds before now): monotonic clocks differ between processes.
            "ages_s": {name: None if (value_s := getattr(request, name)) is None else now - value_s
                       for name in ("arrival_s", "scheduled_s", "first_token_s", "last_token_s")},
            "detok": {"output_text": request.output_text, "sent_text_len": request.sent_text_len,
                      "prefix_offset": request.prefix_offset, "read_offset": request.read_offset},
            "num_preemptions": request.num_preemptions,
            "kv": {"dtype": str(key_rows.dtype).removeprefix("torch."), "shape": list(key_rows.shape)},
        }  # fmt: skip
        payload = _tensor_bytes(key_rows) + _tensor_bytes(value_rows)
        return header, payload

    def resume(self, request_id: str) -> bool:
        """Put a frozen request back where it was (the migration failed); False if it is no longer frozen."""
        frozen = self.frozen.pop(request_id, None)
        if frozen is None:
            return False
        if request_id not in self.engine.requests:  # aborted while frozen (client gone): its KV is freed
            self._forget_row(frozen)
            return False
        if frozen.on_host_path:
            pb = self.engine.runner.piggyback
            assert pb is not None
            pb.rows[request_id] = frozen.be_row
        else:
            frozen.request.status = RequestStatus.RUNNING
            self.engine.scheduler.running.append(frozen.request)
        return True

    def commit(self, request_id: str) -> RequestOutput | None:
        """The target holds the request now: free its KV here and end its stream here with FINISH_MIGRATED."""
        frozen = self.frozen.pop(request_id, None)
        if frozen is None:
            return None
        engine = self.engine
        if request_id not in engine.requests:  # aborted while frozen; the target's copy expires unclaimed
            self._forget_row(frozen)
            return None
        request = frozen.request
        if frozen.on_host_path:
            pb = engine.runner.piggyback
            assert pb is not None
            pb._free(frozen.be_row)
        else:
            engine.allocator.free(request_id)
        engine.requests.pop(request_id, None)
        request.status = RequestStatus.FINISHED
        request.finish_reason = FINISH_MIGRATED
        engine.refresh_gauges()
        return RequestOutput(request_id, [], "", True, FINISH_MIGRATED, num_prompt_tokens=len(request.prompt_token_ids),
                             num_output_tokens=len(request.output_token_ids))  # fmt: skip

    def _forget_row(self, frozen: Frozen) -> None:
        """An aborted frozen BE request: the engine freed its host KV, but its row still held the slot."""
        pb = self.engine.runner.piggyback
        if frozen.be_row is not None and pb is not None:
            pb.row_by_slot.pop(frozen.be_row.slot, None)
            pb.pool.forget(frozen.be_row.worker, frozen.be_row.slot)

    def expire_frozen(self) -> list[str]:
        now = time.monotonic()
        stale = [rid for rid, f in self.frozen.items() if now - f.frozen_s > FROZEN_TIMEOUT_S]
        for rid in stale:
            log.warning("request %s was frozen for migration for over %.0f s: resuming it here", rid, FROZEN_TIMEOUT_S)
            self.resume(rid)
        return stale

    def import_request(self, header: dict[str, Any], payload: bytes) -> EngineRequest:
        """Take a request exported by another runtime; its next step is a decode step on this one."""
        engine = self.engine
        try:
            params = SamplingParams(**{**header["params"], "stop": tuple(header["params"]["stop"]),
                                       "stop_token_ids": tuple(header["params"]["stop_token_ids"])})  # fmt: skip
            now = time.monotonic()
            ages = header["ages_s"]
            request = EngineRequest(
                header["request_id"], header["service"], header["service_class"], list(header["prompt_token_ids"]),
                params, slo=SLOTarget(**header["slo"]) if header["slo"] else None, arrival_s=now - ages["arrival_s"],
            )  # fmt: skip
            request.output_token_ids = list(header["output_token_ids"])
            request.num_computed_tokens = int(header["num_computed_tokens"])
            request.generator = header["generator"]
            request.num_preemptions = int(header["num_preemptions"])
            for name in ("scheduled_s", "first_token_s", "last_token_s"):
                setattr(request, name, None if ages[name] is None else now - ages[name])
            for name, value in header["detok"].items():
                setattr(request, name, value)
            dtype = getattr(torch, header["kv"]["dtype"])
            shape = tuple(header["kv"]["shape"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RequestError(f"malformed migration header: {exc}") from None
        if request.request_id in engine.requests:
            raise MigrationRefused(f"request {request.request_id!r} already runs here")
        engine.validate(request)  # service hosted here, fits this runtime's caches
        num_tokens = request.num_computed_tokens
        if request.num_tokens - num_tokens != 1 or not request.output_token_ids:
            raise RequestError("only a request in decode (all but its newest token computed) can be imported")
        key_rows, value_rows = _tensors_from(payload, dtype, shape)
        if shape[0] != engine.arch.num_hidden_layers or shape[1] != num_tokens:
            raise RequestError(f"KV shape {list(shape)} does not fit this model and request")
        on_host_path = engine.planner.on_host_path(request)
        if on_host_path:
            pb = engine.runner.piggyback
            assert pb is not None and engine.planner.host_kv is not None
            reserved_tokens = len(request.prompt_token_ids) + params.max_tokens
            if not engine.planner.host_kv.reserve(request.request_id, reserved_tokens):
                raise MigrationRefused("no host KV memory or BE slot free for this request")
        else:
            allocator = engine.allocator
            if not allocator.can_hold(request.request_id, num_tokens + 1):
                raise MigrationRefused(f"no room for {num_tokens + 1} tokens of accelerator KV")
            allocator.ensure(request.request_id, num_tokens + 1)
        key, value, blocks, block_size = _cache_and_blocks(engine, request.request_id, on_host_path)
        block_index, offset = _positions(blocks, num_tokens, block_size)
        key[:, block_index, offset] = key_rows.to(key.device, key.dtype)
        value[:, block_index, offset] = value_rows.to(value.device, value.dtype)
        engine.requests[request.request_id] = request
        request.status = RequestStatus.RUNNING
        if on_host_path:
            assert engine.runner.piggyback is not None
            engine.runner.piggyback.start_decode(request)
        else:
            engine.scheduler.running.append(request)
        return request


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _tensors_from(payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    element = torch.empty((), dtype=dtype).element_size()
    size = element
    for dim in shape:
        size *= dim
    if len(payload) != 2 * size:
        raise RequestError(f"KV payload has {len(payload)} bytes; header promises {2 * size}")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return raw[:size].view(dtype).reshape(shape), raw[size:].view(dtype).reshape(shape)


def encode_import(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return _HEADER_LEN.pack(len(head)) + head + payload


def decode_import(body: bytes) -> tuple[dict[str, Any], bytes]:
    if len(body) < _HEADER_LEN.size:
        raise RequestError("import body too short")
    (length,) = _HEADER_LEN.unpack_from(body)
    try:
        header = json.loads(body[_HEADER_LEN.size : _HEADER_LEN.size + length])
    except ValueError as exc:
        raise RequestError(f"import header is not JSON: {exc}") from None
    return header, body[_HEADER_LEN.size + length :]


# --- HTTP ------------------------------------------------------------------------------------------------------
def output_line(output: RequestOutput) -> str:
    return json.dumps({
        "request_id": output.request_id, "token_ids": output.new_token_ids, "text": output.text_delta,
        "num_prompt_tokens": output.num_prompt_tokens, "num_output_tokens": output.num_output_tokens,
        "finished": output.finished, "finish_reason": output.finish_reason, "error": output.error,
    }) + "\n"  # fmt: skip


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, **extra}}, status_code=status)


def register_internal_routes(app: FastAPI, runtime: Runtime) -> None:
    """Add the /internal/v1/ endpoints (see the module docstring) to the runtime's app."""
    from piggyback_runtime.server.app import APIError, _max_tokens
    from piggyback_runtime.server.protocol import ChatCompletionRequest, CompletionRequest

    token = os.environ.get(INTERNAL_TOKEN_ENV, "").encode()
    state: dict[str, Any] = {"migrator": None}
    pending: dict[str, tuple[AsyncIterator[RequestOutput], Any]] = {}  # imported: stream, class; not picked up

    def authorised(http: Request) -> bool:
        if not token:
            return True
        scheme, _, presented = (http.headers.get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token)

    def migrator() -> Migrator:
        engine = runtime.ready_engine()
        if state["migrator"] is None:
            state["migrator"] = Migrator(engine.engine, runtime.metrics)
            # Called from a handler, so on the server's loop: resume what a vanished router left frozen.
            state["expiry"] = asyncio.ensure_future(expire_frozen_forever())
        return state["migrator"]

    async def on_engine(fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(runtime.ready_engine().call(fn))

    def ndjson(stream: AsyncIterator[RequestOutput], first: RequestOutput | None, request_id: str,
               service_class: Any) -> StreamingResponse:  # fmt: skip
        # In flight like a public request: a drain waits for it, and cuts it off with an error line at the end.
        runtime.in_flight[request_id] = service_class

        async def lines() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield output_line(first)
                    if first.finished:
                        return
                async for output in stream:
                    if output.finish_reason == FINISH_MIGRATED:
                        yield json.dumps({"request_id": output.request_id,
                                          "migrated_to": targets.pop(output.request_id, None)}) + "\n"  # fmt: skip
                        return
                    yield output_line(output)
            finally:
                runtime.in_flight.pop(request_id, None)
                runtime.cut_off.discard(request_id)
                await stream.aclose()  # type: ignore[attr-defined]

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    targets: dict[str, str] = {}

    # A dependency, not an HTTP middleware: a middleware would wrap every public stream too (Starlette's
    # BaseHTTPMiddleware buffers streaming and hides client disconnects from the handlers).
    def require_token(http: Request) -> None:
        if not authorised(http):
            raise HTTPException(401, f"internal endpoint: send `Authorization: Bearer ${INTERNAL_TOKEN_ENV}`")

    guarded = {"include_in_schema": False, "dependencies": [Depends(require_token)]}

    @app.get("/internal/v1/load", **guarded)  # type: ignore[arg-type]
    async def load() -> JSONResponse:
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

    @app.get("/internal/v1/profile", **guarded)  # type: ignore[arg-type]
    async def profile() -> JSONResponse:
        # What the router's stage planner needs to know of this replica's speed: the latency model the SLO
        # controller predicts iterations with (its coefficients; the router rebuilds it, torch-free, with
        # LatencyModel.from_dict), and the capacity limits that bound a decode batch.
        engine = runtime.ready_engine().engine
        slo = engine.planner.slo
        if slo is None:
            return _error(503, "this replica has no latency model: its SLO control is off (slo_control.enabled "
                               "false, or a policy without SLO control); the router keeps its stage plan")  # fmt: skip
        return JSONResponse({
            "latency_model": slo.latency_model.to_dict(),
            "kv_capacity_tokens": engine.allocator.num_blocks * engine.allocator.block_size,
            "max_batch_rows": engine.config.engine.max_num_seqs,
            "max_context_tokens": engine.loaded.max_model_len,
        })  # fmt: skip

    @app.post("/internal/v1/generate", **guarded)  # type: ignore[arg-type]
    async def generate(http: Request) -> Response:
        engine = runtime.ready_engine()
        raw = await http.json()
        kind = raw.pop("kind", "completions") if isinstance(raw, dict) else None
        request_id = raw.pop("request_id", None) if isinstance(raw, dict) else None
        try:
            if kind == "chat":
                chat_body = ChatCompletionRequest.model_validate(raw)
                text = engine.engine.tokenizer.apply_chat_template(chat_body.message_dicts())
                prompt_ids = engine.engine.tokenizer.encode(text, add_special_tokens=False)
                body: CompletionRequest | ChatCompletionRequest = chat_body
                requested, field = chat_body.requested_max_tokens(), chat_body.max_tokens_field
            elif kind == "completions":
                body = CompletionRequest.model_validate(raw)
                prompt = body.single_prompt()
                prompt_ids = list(prompt) if isinstance(prompt, list) else engine.engine.tokenizer.encode(prompt)
                requested, field = body.max_tokens, "max_tokens"
            else:
                return _error(400, "kind must be `completions` or `chat`")
            service = runtime.config.service(body.model)
            if service is None:
                return _error(404, f"the model `{body.model}` is not hosted here", code="model_not_found")
            # The router passes the client's own Authorization on: the service's API key still applies.
            if not runtime.may_use(service.name, http.headers.get(CLIENT_AUTHORIZATION_HEADER)):
                return _error(401, f"Incorrect or missing API key for the model `{service.name}`",
                              code="invalid_api_key")  # fmt: skip
            max_tokens = _max_tokens(service, requested, field, len(prompt_ids), engine.engine.loaded.max_model_len,
                                     kind == "chat")  # fmt: skip
            params = body.sampling_params(max_tokens)
        except (ValidationError, ValueError) as exc:
            return _error(400, str(exc), code="invalid_request")
        except APIError as exc:
            return _error(exc.status, exc.message, code=exc.code)
        request = EngineRequest(str(request_id or f"rt-{time.monotonic_ns()}"), service.name, service.service_class,
                                prompt_ids, params)  # fmt: skip
        try:
            stream = engine.generate(request)
            first = await anext(stream)
        except RequestError as exc:
            return _error(400, str(exc), code="invalid_request")
        except UnknownServiceError as exc:
            return _error(404, str(exc), code="model_not_found")
        if first.finish_reason == FINISH_REJECTED:
            await stream.aclose()
            return JSONResponse({"error": {"message": first.error, "code": first.reject_reason}}, status_code=429,
                                headers={"Retry-After": str(max(1, round(first.retry_after_s or 1)))})  # fmt: skip
        return ndjson(stream, first, request.request_id, request.service_class)

    @app.post("/internal/v1/requests/{request_id}/migrate", **guarded)  # type: ignore[arg-type]
    async def migrate(request_id: str, http: Request) -> JSONResponse:
        target = str((await http.json()).get("target", "")).rstrip("/")
        if not target.startswith(("http://", "https://")):
            return _error(400, "body must be {\"target\": \"http://host:port\"}")
        mig = migrator()
        started = time.monotonic()
        try:
            # A BE token walks the layers over several iterations and can leave only between two tokens:
            # ask again before each iteration until it is there (a command runs between two iterations).
            deadline = started + EXPORT_WAIT_S
            while True:
                try:
                    header, payload = await on_engine(lambda: mig.export(request_id))
                    break
                except NotBetweenSteps:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.001)
        except MigrationRefused as exc:
            runtime.metrics.migrations.labels("out", m.MIGRATION_NOT_READY).inc()
            return JSONResponse({"outcome": m.MIGRATION_NOT_READY, "detail": str(exc)}, status_code=409)
        headers = {"content-type": "application/octet-stream"}
        if token:
            headers["authorization"] = f"Bearer {token.decode()}"
        try:
            async with httpx.AsyncClient(timeout=IMPORT_TIMEOUT_S) as client:
                answer = await client.post(f"{target}/internal/v1/import", content=encode_import(header, payload),
                                           headers=headers)  # fmt: skip
        except httpx.HTTPError as exc:
            await on_engine(lambda: mig.resume(request_id))
            runtime.metrics.migrations.labels("out", m.MIGRATION_FAILED).inc()
            return JSONResponse({"outcome": m.MIGRATION_FAILED, "detail": f"target unreachable: {exc!r}"},
                                status_code=502)  # fmt: skip
        if answer.status_code != 200:
            await on_engine(lambda: mig.resume(request_id))
            runtime.metrics.migrations.labels("out", m.MIGRATION_REFUSED).inc()
            return JSONResponse({"outcome": m.MIGRATION_REFUSED, "detail": answer.text[:500]}, status_code=409)
        targets[request_id] = target
        output = await on_engine(lambda: mig.commit(request_id))
        if output is not None:
            runtime.ready_engine().deliver(output)
        runtime.metrics.migrations.labels("out", m.MIGRATION_DONE).inc()
        runtime.metrics.migration_seconds.observe(time.monotonic() - started)
        return JSONResponse({"outcome": m.MIGRATION_DONE, "kv_bytes": len(payload)})

    @app.post("/internal/v1/import", **guarded)  # type: ignore[arg-type]
    async def import_(http: Request) -> JSONResponse:
        engine = runtime.ready_engine()
        if runtime.draining:
            return _error(409, "draining: not taking migrations")
        mig = migrator()
        try:
            header, payload = decode_import(await http.body())
            request_id = str(header.get("request_id"))
            stream = engine.attach(request_id)  # listen before the request exists: no output is missed
            try:
                await on_engine(lambda: mig.import_request(header, payload))
            except BaseException:
                engine.detach(request_id, abort=False)  # the request never entered this engine
                raise
        except (MigrationRefused, AdmissionRejected) as exc:
            runtime.metrics.migrations.labels("in", m.MIGRATION_REFUSED).inc()
            return _error(409, str(exc))
        except (RequestError, UnknownServiceError) as exc:
            runtime.metrics.migrations.labels("in", m.MIGRATION_REFUSED).inc()
            return _error(400, str(exc))
        pending[request_id] = (stream, header.get("service_class"))
        runtime.metrics.migrations.labels("in", m.MIGRATION_DONE).inc()
        asyncio.get_running_loop().call_later(PICKUP_TIMEOUT_S, lambda: _expire_pickup(request_id))
        return JSONResponse({"outcome": m.MIGRATION_DONE})

    def _expire_pickup(request_id: str) -> None:
        entry = pending.pop(request_id, None)
        if entry is not None:
            log.warning("imported request %s: nobody picked up its stream in %.0f s; aborting it", request_id,
                        PICKUP_TIMEOUT_S)  # fmt: skip
            if runtime.engine is not None:  # the stream never started: closing it would skip its cleanup
                runtime.engine.detach(request_id, abort=True)

    @app.get("/internal/v1/requests/{request_id}/stream", **guarded)  # type: ignore[arg-type]
    async def pick_up(request_id: str) -> Response:
        entry = pending.pop(request_id, None)
        if entry is None:
            return _error(404, f"no imported request {request_id!r} waits for pick-up here")
        return ndjson(entry[0], None, request_id, entry[1])

    async def expire_frozen_forever() -> None:
        while True:
            await asyncio.sleep(FROZEN_TIMEOUT_S / 4)
            if state["migrator"] is not None and runtime.engine is not None and runtime.engine.alive:
                await on_engine(state["migrator"].expire_frozen)
