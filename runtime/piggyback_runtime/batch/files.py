"""Batch input files: JSONL, one request per line, checked line by line at upload (errors name the line).

A line is `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`; the body
is what the endpoint takes live (the same pydantic models validate it, so a line that uploads is a request the
server would accept), `stream` is not allowed, and `model` names a BE service of this runtime.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.server.protocol import ChatCompletionRequest, CompletionRequest

CHAT_ENDPOINT, COMPLETIONS_ENDPOINT = "/v1/chat/completions", "/v1/completions"
BODY_MODELS: dict[str, type[BaseModel]] = {CHAT_ENDPOINT: ChatCompletionRequest,
                                           COMPLETIONS_ENDPOINT: CompletionRequest}  # fmt: skip
ENDPOINTS = tuple(BODY_MODELS)
LINE_FIELDS = {"custom_id", "method", "url", "body"}


class LineError(ValueError):
    """A line that cannot run: `line` is 1-based, `param` the field at fault."""

    def __init__(self, line: int, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(f"line {line}: {message}")
        self.line, self.message, self.param, self.code = line, message, param, code

    def as_batch_error(self) -> dict[str, Any]:
        """The entry of a failed batch's `errors.data`, as OpenAI's client parses it."""
        return {"code": self.code, "line": self.line, "message": str(self), "param": self.param}


def _pydantic_problem(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field (not an OpenAI parameter this runtime accepts)"
    return f"body.{param}: {message}" if param else message, f"body.{param}" if param else "body"


def parse_line(number: int, raw: bytes, config: RuntimeConfig, endpoint: str | None = None) -> tuple[str, str, str]:
    """One input line -> (custom_id, model, body as JSON text), or LineError naming the line and the field.
    With `endpoint`, the line's url must be that batch's endpoint."""
    try:
        line = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineError(number, f"not valid JSON ({exc}); each line must be one JSON object") from None
    if not isinstance(line, dict):
        raise LineError(number, "each line must be a JSON object with custom_id, method, url and body")
    unknown = sorted(set(line) - LINE_FIELDS)
    if unknown:
        raise LineError(number, f"unknown field(s) {', '.join(unknown)}; a line has custom_id, method, url, body",
                        unknown[0])  # fmt: skip
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError(number, "custom_id must be a non-empty string", "custom_id")
    if line.get("method") != "POST":
        raise LineError(number, f"method must be \"POST\" (got {line.get('method')!r})", "method")
    url = line.get("url")
    if url not in BODY_MODELS:
        raise LineError(number, f"url {url!r} is not supported; use one of {', '.join(ENDPOINTS)}", "url")
    if endpoint is not None and url != endpoint:
        raise LineError(number, f"url {url!r} differs from the batch's endpoint {endpoint!r}; every line of a "
                                "batch must use its endpoint", "url", "mismatched_endpoint")  # fmt: skip
    body = line.get("body")
    if not isinstance(body, dict):
        raise LineError(number, "body must be a JSON object (the request the url takes)", "body")
    try:
        request = BODY_MODELS[url].model_validate(body)
    except ValidationError as exc:
        message, param = _pydantic_problem(exc)
        raise LineError(number, message, param) from None
    if getattr(request, "stream", False):
        raise LineError(number, "stream must be false in a batch line (results go to the output file)", "body.stream")
    model = str(body["model"])
    service = config.service(model)
    if service is None:
        hosted = ", ".join(s.name for s in config.services if s.service_class == "BE")
        raise LineError(number, f"the model `{model}` does not exist; batch lines name a BE service: "
                                f"{hosted or '(none hosted)'}", "body.model", "model_not_found")  # fmt: skip
    if service.service_class != "BE":
        raise LineError(number, f"the model `{model}` is an LS (latency-sensitive) service; batch lines run as "
                                "best-effort work and must name a BE service", "body.model",
                        "model_not_batchable")  # fmt: skip
    return custom_id, model, json.dumps(body, separators=(",", ":"))


def split_lines(content: bytes) -> list[bytes]:
    """The file's lines; a final newline ends the last line (it does not start an empty one)."""
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.removesuffix(b"\r") for line in lines]


def parse_file(content: bytes, config: RuntimeConfig, max_lines: int, endpoint: str | None = None,
               on_error: Callable[[LineError], None] | None = None) -> list[tuple[str, str, str]]:  # fmt: skip
    """Every line of a batch input file, or the first LineError (or each one to `on_error`, which collects)."""
    raw_lines = split_lines(content)
    if not raw_lines:
        raise LineError(1, "the file is empty; a batch file has one JSON request per line")
    if len(raw_lines) > max_lines:
        raise LineError(max_lines + 1, f"the file has {len(raw_lines)} lines, above the limit of {max_lines} "
                                       "(batch.max_lines_per_file); split it into several batches")  # fmt: skip
    parsed: list[tuple[str, str, str]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(raw_lines, start=1):
        try:
            item = parse_line(number, raw, config, endpoint)
            if item[0] in seen:
                raise LineError(number, f"custom_id {item[0]!r} repeats line {seen[item[0]]}; each line needs its "
                                        "own custom_id", "custom_id", "duplicate_custom_id")  # fmt: skip
        except LineError as exc:
            if on_error is None:
                raise
            on_error(exc)
            continue
        seen[item[0]] = number
        parsed.append(item)
    return parsed
