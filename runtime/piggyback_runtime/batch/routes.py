"""The Batch API's HTTP endpoints, as OpenAI documents them: /v1/files and /v1/batches.

Every answer is built by server/protocol.py; errors are its envelope (the app's handlers turn APIError and
validation errors into it).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Row

from piggyback_runtime.batch import store as st
from piggyback_runtime.batch.files import ENDPOINTS, LineError, parse_file
from piggyback_runtime.batch.runner import BatchRunner
from piggyback_runtime.config import BatchConfig
from piggyback_runtime.server.app import POST_ERROR_RESPONSES, Runtime, draining_error
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


def _not_draining(service: BatchService) -> None:
    if service.runtime.draining:
        raise draining_error()


def _file_json(row: Row[Any]) -> dict[str, Any]:
    return file_object(row.id, row.bytes, row.created_at, row.filename, row.purpose)


def _no_file(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", "invalid_request_error", "file_not_found", "file_id")


def _no_batch(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", "invalid_request_error", "batch_not_found", "batch_id")


# --- files ---------------------------------------------------------------------------------------------------------
async def upload_file(http: Request, file: Annotated[UploadFile, File()],
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
    authorization = http.headers.get("authorization")
    for model in sorted({model for _, model, _ in lines}):
        if not service.runtime.may_use(model, authorization):
            raise APIError(401, f"Incorrect or missing API key for the model `{model}` that lines of this file "
                                "name: send the service's key as `Authorization: Bearer <key>`",
                           "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    row = await service.store.add_file("batch", file.filename or "upload.jsonl", content, len(lines))
    return JSONResponse(_file_json(row))


async def list_files(http: Request, purpose: str | None = None, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     order: Literal["asc", "desc"] = "desc") -> JSONResponse:  # fmt: skip
    try:
        rows, has_more = await _service(http).store.list_files(purpose, after, limit, order == "asc")
    except KeyError:
        raise _no_file(after or "") from None
    return JSONResponse(cursor_page([_file_json(row) for row in rows], has_more))


async def get_file(http: Request, file_id: str) -> JSONResponse:
    row = await _service(http).store.get_file(file_id)
    if row is None:
        raise _no_file(file_id)
    return JSONResponse(_file_json(row))


async def delete_file(http: Request, file_id: str) -> JSONResponse:
    if not await _service(http).store.delete_file(file_id):
        raise _no_file(file_id)
    return JSONResponse(file_deleted(file_id))


async def file_content(http: Request, file_id: str) -> Response:
    store = _service(http).store
    row = await store.get_file(file_id)
    if row is None:
        raise _no_file(file_id)
    return Response(await store.file_content(row), media_type="application/octet-stream")


# --- batches -------------------------------------------------------------------------------------------------------
async def create_batch(http: Request, body: CreateBatchRequest) -> JSONResponse:
    service = _service(http)
    _not_draining(service)
    file_row = await service.store.get_file(body.input_file_id)
    if file_row is None:
        raise APIError(400, f"input_file_id {body.input_file_id!r} names no uploaded file; upload one with "
                            "POST /v1/files (purpose \"batch\")", "invalid_request_error", "file_not_found",
                       "input_file_id")  # fmt: skip
    if file_row.purpose != "batch":
        raise APIError(400, f"input_file_id {body.input_file_id!r} has purpose {file_row.purpose!r}; a batch "
                            "reads a file uploaded with purpose \"batch\"", "invalid_request_error",
                       "invalid_request", "input_file_id")  # fmt: skip
    row = await service.store.create_batch(body.endpoint, body.input_file_id,
                                           COMPLETION_WINDOWS_S[body.completion_window], body.metadata)  # fmt: skip
    service.runner.wake()
    return JSONResponse((await service.batch_json([row]))[0])


async def get_batch(http: Request, batch_id: str) -> JSONResponse:
    service = _service(http)
    row = await service.store.get_batch(batch_id)
    if row is None:
        raise _no_batch(batch_id)
    return JSONResponse((await service.batch_json([row]))[0])


async def cancel_batch(http: Request, batch_id: str) -> JSONResponse:
    service = _service(http)
    try:
        row = await service.store.cancel(batch_id)
    except st.NotCancellable as exc:
        raise APIError(409, f"Cannot cancel a batch with status {exc.status!r}: only a validating or in_progress "
                            "batch can be cancelled", "invalid_request_error", "batch_not_cancellable") from None
    if row is None:
        raise _no_batch(batch_id)
    service.runner.wake()
    return JSONResponse((await service.batch_json([row]))[0])


async def list_batches(http: Request, after: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JSONResponse:  # fmt: skip
    service = _service(http)
    try:
        rows, has_more = await service.store.list_batches(after, limit)
    except KeyError:
        raise _no_batch(after or "") from None
    return JSONResponse(cursor_page(await service.batch_json(rows), has_more))


_GET_ERRORS = {404: POST_ERROR_RESPONSES[404] | {"description": "No such file or batch"}}


def register_routes(app: FastAPI) -> None:
    post_errors = {400: POST_ERROR_RESPONSES[400], 401: POST_ERROR_RESPONSES[401],
                   413: {**POST_ERROR_RESPONSES[400], "description": "The file is above batch.max_file_bytes"},
                   503: POST_ERROR_RESPONSES[503]}  # fmt: skip
    add = app.add_api_route
    add("/v1/files", upload_file, methods=["POST"], response_model=None, responses=post_errors)
    add("/v1/files", list_files, methods=["GET"], response_model=None, responses=_GET_ERRORS)
    add("/v1/files/{file_id}", get_file, methods=["GET"], response_model=None, responses=_GET_ERRORS)
    add("/v1/files/{file_id}", delete_file, methods=["DELETE"], response_model=None, responses=_GET_ERRORS)
    add("/v1/files/{file_id}/content", file_content, methods=["GET"], response_model=None, responses=_GET_ERRORS)
    add("/v1/batches", create_batch, methods=["POST"], response_model=None, responses=post_errors)
    add("/v1/batches", list_batches, methods=["GET"], response_model=None, responses=_GET_ERRORS)
    add("/v1/batches/{batch_id}", get_batch, methods=["GET"], response_model=None, responses=_GET_ERRORS)
    add("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"], response_model=None,
        responses={**_GET_ERRORS, 409: {**POST_ERROR_RESPONSES[400], "description": "The batch is finished"}})
