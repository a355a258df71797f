"""The Batch API's HTTP endpoints, as OpenAI documents them: /v1/files and /v1/batches.

Every answer is built by server/protocol.py; errors are its envelope (the app's handlers turn APIError and
validation errors into it).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Row

from piggyback_runtime.batch import store as st
from piggyback_runtime.batch.files import ENDPOINTS, LineError, parse_file
from piggyback_runtime.batch.runner import BatchRunner
from piggyback_runtime.config import BatchConfig
from piggyback_runtime.server.app import POST_ERROR_RESPONSES, Runtime, api_key_error, draining_error
from piggyback_runtime.server.protocol import APIError, batch_object, cursor_page, file_deleted, file_object

COMPLETION_WINDOWS_S = {"24h": 24 * 3600}
UPLOAD_CHUNK_BYTES = 1 << 20
_BATCH_ID_TIMESTAMPS = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at",
                        "failed_at", "expired_at", "cancelling_at", "cancelled_at")  # fmt: skip


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[str, Field(min_length=1)]
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None

    @field_validator("endpoint")
    @classmethod
    def _supported_endpoint(cls, endpoint: str) -> str:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"{endpoint!r} is not supported for batches here; use one of {', '.join(ENDPOINTS)}")
        return endpoint

    @field_validator("completion_window")
    @classmethod
    def _known_window(cls, window: str) -> str:
        if window not in COMPLETION_WINDOWS_S:
            raise ValueError(f"{window!r} is not supported; use {', '.join(COMPLETION_WINDOWS_S)}")
        return window

    @field_validator("metadata")
    @classmethod
    def _openai_metadata_limits(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None and (len(metadata) > 16 or any(len(k) > 64 or len(v) > 512
                                                               for k, v in metadata.items())):  # fmt: skip
            raise ValueError("at most 16 keys, keys of at most 64 characters and values of at most 512")
        return metadata


class BatchService:
    """What the routes share: the store, the runner, the limits."""

    def __init__(self, runtime: Runtime, store: st.BatchStore, runner: BatchRunner, config: BatchConfig) -> None:
        self.runtime, self.store, self.runner, self.config = runtime, store, runner, config

    async def batch_json(self, rows: list[Row[Any]]) -> list[dict[str, Any]]:
        counts = await self.store.line_counts([row.id for row in rows])
        out = []
        for row in rows:
            c = counts[row.id]
            fields = {"id": row.id, "endpoint": row.endpoint, "input_file_id": row.input_file_id,
                      "completion_window": row.completion_window, "status": row.status,
                      "output_file_id": row.output_file_id, "error_file_id": row.error_file_id,
                      **{name: getattr(row, name) for name in _BATCH_ID_TIMESTAMPS},
                      "metadata": json.loads(row.metadata) if row.metadata else None}  # fmt: skip
            errors = json.loads(row.errors) if row.errors else None
            out.append(batch_object(fields, errors, row.total, c[st.LINE_COMPLETED], c[st.LINE_FAILED]))
        return out


def _service(http: Request) -> BatchService:
    service: BatchService = http.app.state.batch
    return service


@dataclass(frozen=True)
class Caller:
    """Who asks: the BE services whose API key the request did not present. Files and batches are scoped to
    the services their lines name: a caller sees one only if its key opens every one of them."""

    locked: frozenset[str]

    def may_see(self, row: Row[Any]) -> bool:
        # A row from before schema version 2 names no services: only a caller with every key sees it.
        return not self.locked or (row.services is not None and not st.services_of(row.services) & self.locked)


def caller(http: Request) -> Caller:
    """Every Batch API route's API-key check (a FastAPI dependency): the runtime's per-service keys
    (Runtime.may_use, as /v1/completions checks them). A request whose key opens no BE service is a 401."""
    runtime = _service(http).runtime
    authorization = http.headers.get("authorization")
    be_services = [s.name for s in runtime.config.services if s.service_class == "BE"]
    locked = frozenset(name for name in be_services if not runtime.may_use(name, authorization))
    if be_services and len(locked) == len(be_services):
        raise api_key_error("the Batch API (it takes the key of a BE service)")
    return Caller(locked)


CallerDep = Annotated[Caller, Depends(caller)]
_KINDS = {"File": "file_id", "Batch": "batch_id"}


def _no_such(kind: Literal["File", "Batch"], row_id: str) -> APIError:
    """A 404 for an id that names nothing, or something of services this caller's key does not open."""
    return APIError(404, f"No such {kind} object: {row_id}", "invalid_request_error", f"{kind.lower()}_not_found",
                    _KINDS[kind])  # fmt: skip


async def _visible(http: Request, who: Caller, kind: Literal["File", "Batch"], row_id: str) -> Row[Any]:
    store = _service(http).store
    row = await (store.get_file(row_id) if kind == "File" else store.get_batch(row_id))
    if row is None or not who.may_see(row):
        raise _no_such(kind, row_id)
    return row


async def _page(kind: Literal["File", "Batch"], after: str | None, rows: Awaitable[tuple[list[Row[Any]], bool]],
                to_json: Callable[[list[Row[Any]]], Awaitable[list[dict[str, Any]]]]) -> JSONResponse:  # fmt: skip
    """A list endpoint's answer: one cursor page; an unknown `after` is a 404."""
    try:
        page, has_more = await rows
    except KeyError:
        raise _no_such(kind, after or "") from None
    return JSONResponse(cursor_page(await to_json(page), has_more))


def _not_draining(service: BatchService) -> None:
    if service.runtime.draining:
        raise draining_error()


async def _files_json(rows: list[Row[Any]]) -> list[dict[str, Any]]:
    return [file_object(row.id, row.bytes, row.created_at, row.filename, row.purpose) for row in rows]


async def _batch_response(service: BatchService, row: Row[Any]) -> JSONResponse:
    return JSONResponse((await service.batch_json([row]))[0])


# --- files ---------------------------------------------------------------------------------------------------------
async def upload_file(http: Request, who: CallerDep, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> JSONResponse:  # fmt: skip
    service = _service(http)
    _not_draining(service)
    if purpose != "batch":
        raise APIError(400, f"purpose {purpose!r} is not supported; this runtime takes files with purpose \"batch\"",
                       "invalid_request_error", "invalid_request", "purpose")  # fmt: skip
    limit = service.config.max_file_bytes
    chunks: list[bytes] = []
    size = 0
    while chunk := await file.read(UPLOAD_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The file is larger than this runtime's limit of {limit} bytes "
                                "(batch.max_file_bytes); split it into several files", "invalid_request_error",
                           "file_too_large", "file")  # fmt: skip
        chunks.append(chunk)
    content = b"".join(chunks)
    try:
        lines = parse_file(content, service.runtime.config, service.config.max_lines_per_file)
    except LineError as exc:
        raise APIError(400, f"Invalid batch file, {exc}", "invalid_request_error", exc.code, exc.param) from None
    models = {model for _, model, _ in lines}
    if locked := sorted(models & who.locked):
        raise api_key_error(f"the model `{locked[0]}` that lines of this file name")
    row = await service.store.add_file("batch", file.filename or "upload.jsonl", content, len(lines),
                                       st.services_text(models))  # fmt: skip
    return JSONResponse((await _files_json([row]))[0])


async def list_files(http: Request, who: CallerDep, purpose: str | None = None, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     order: Literal["asc", "desc"] = "desc") -> JSONResponse:  # fmt: skip
    rows = _service(http).store.list_files(purpose, after, limit, order == "asc", who.locked)
    return await _page("File", after, rows, _files_json)


async def get_file(http: Request, who: CallerDep, file_id: str) -> JSONResponse:
    return JSONResponse((await _files_json([await _visible(http, who, "File", file_id)]))[0])


async def delete_file(http: Request, who: CallerDep, file_id: str) -> JSONResponse:
    await _visible(http, who, "File", file_id)
    if not await _service(http).store.delete_file(file_id):
        raise _no_such("File", file_id)
    return JSONResponse(file_deleted(file_id))


async def file_content(http: Request, who: CallerDep, file_id: str) -> Response:
    row = await _visible(http, who, "File", file_id)
    return Response(await _service(http).store.file_content(row), media_type="application/octet-stream")


# --- batches -------------------------------------------------------------------------------------------------------
async def create_batch(http: Request, who: CallerDep, body: CreateBatchRequest) -> JSONResponse:
    service = _service(http)
    _not_draining(service)
    file_row = await service.store.get_file(body.input_file_id)
    if file_row is None or not who.may_see(file_row):
        raise APIError(400, f"input_file_id {body.input_file_id!r} names no uploaded file; upload one with "
                            "POST /v1/files (purpose \"batch\")", "invalid_request_error", "file_not_found",
                       "input_file_id")  # fmt: skip
    if file_row.purpose != "batch":
        raise APIError(400, f"input_file_id {body.input_file_id!r} has purpose {file_row.purpose!r}; a batch "
                            "reads a file uploaded with purpose \"batch\"", "invalid_request_error",
                       "invalid_request", "input_file_id")  # fmt: skip
    row = await service.store.create_batch(body.endpoint, body.input_file_id,
                                           COMPLETION_WINDOWS_S[body.completion_window], body.metadata,
                                           file_row.services)  # fmt: skip
    service.runner.wake()
    return await _batch_response(service, row)


async def get_batch(http: Request, who: CallerDep, batch_id: str) -> JSONResponse:
    return await _batch_response(_service(http), await _visible(http, who, "Batch", batch_id))


async def cancel_batch(http: Request, who: CallerDep, batch_id: str) -> JSONResponse:
    service = _service(http)
    await _visible(http, who, "Batch", batch_id)
    try:
        row = await service.store.cancel(batch_id)
    except st.NotCancellable as exc:
        raise APIError(409, f"Cannot cancel a batch with status {exc.status!r}: only a validating or in_progress "
                            "batch can be cancelled", "invalid_request_error", "batch_not_cancellable") from None
    if row is None:
        raise _no_such("Batch", batch_id)
    service.runner.wake()
    return await _batch_response(service, row)


async def list_batches(http: Request, who: CallerDep, after: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JSONResponse:  # fmt: skip
    service = _service(http)
    return await _page("Batch", after, service.store.list_batches(after, limit, who.locked), service.batch_json)


_GET_ERRORS = {401: POST_ERROR_RESPONSES[401],
               404: POST_ERROR_RESPONSES[404] | {"description": "No such file or batch"}}  # fmt: skip
_SECURITY = [{}, {"bearer": []}]  # the key is per service, optional where a BE service has none


def register_routes(app: FastAPI) -> None:
    post_errors = {400: POST_ERROR_RESPONSES[400], 401: POST_ERROR_RESPONSES[401],
                   413: {**POST_ERROR_RESPONSES[400], "description": "The file is above batch.max_file_bytes"},
                   503: POST_ERROR_RESPONSES[503]}  # fmt: skip
    cancel_errors = {**_GET_ERRORS, 409: {**POST_ERROR_RESPONSES[400], "description": "The batch is finished"}}
    routes = [("/v1/files", upload_file, "POST", post_errors), ("/v1/files", list_files, "GET", _GET_ERRORS),
              ("/v1/files/{file_id}", get_file, "GET", _GET_ERRORS),
              ("/v1/files/{file_id}", delete_file, "DELETE", _GET_ERRORS),
              ("/v1/files/{file_id}/content", file_content, "GET", _GET_ERRORS),
              ("/v1/batches", create_batch, "POST", post_errors), ("/v1/batches", list_batches, "GET", _GET_ERRORS),
              ("/v1/batches/{batch_id}", get_batch, "GET", _GET_ERRORS),
              ("/v1/batches/{batch_id}/cancel", cancel_batch, "POST", cancel_errors)]  # fmt: skip
    for path, handler, method, responses in routes:
        app.add_api_route(path, handler, methods=[method], response_model=None, responses=responses,
                          openapi_extra={"security": _SECURITY})  # fmt: skip
