"""The OpenAI layer: request bodies, and every response body, stream event and error envelope that the
runtime's server (server/app.py) and the pool router (router/app.py) send; neither builds one by hand.

Fields OpenAI defines but this runtime cannot honour (n > 1, logprobs, penalties, tools) are accepted only
at their neutral value, and rejected otherwise with a message naming the field, rather than ignored.
Unknown fields are rejected too: a typo in a parameter name should not silently change nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from piggyback_runtime.config import ServiceConfig
from piggyback_runtime.request import SamplingParams

# max_tokens of a request that sends none, when its service sets no default_max_tokens:
# - legacy completions: OpenAI's documented default;
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# - chat on a BE service: a BE request reserves host KV for prompt + max_tokens when admitted, so "the rest
#   of the context" would reserve 16 GiB per request for Llama-3.1-8B's 128k context. LS chat gets the rest.
BE_DEFAULT_MAX_TOKENS = 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Body):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions, accepted under the same names
    top_k: Annotated[int, Field(ge=-1)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    # Field validators (not one model validator) so that a refusal's error location, and so the error's
    # `param`, names the field.
    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send separate requests for several completions")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value:
            raise ValueError("penalties are not supported; leave presence_penalty and frequency_penalty at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        values = [stop] if isinstance(stop, str) else (stop or [])
        if any(s == "" for s in values):
            raise ValueError("stop strings must not be empty")
        if len(values) > 16:
            raise ValueError("at most 16 stop strings")
        return stop

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    # None: the service's default_max_tokens, else OpenAI's 16 for completions (server/app.py).
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("must not be empty")
        if isinstance(prompt, list) and not isinstance(prompt[0], int) and len(prompt) != 1:
            raise ValueError("send one prompt per request (batches of prompts are not supported)")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: int | None) -> int | None:
        if logprobs is not None:
            raise ValueError("logprobs are not supported")
        return logprobs

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix

    def single_prompt(self) -> str | list[int]:
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]
        return prompt


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients echo back fields like `refusal` or `annotations`

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if tools:
            raise ValueError("tools are not supported by this runtime")
        return tools

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
        if response_format and response_format.get("type") != "text":
            raise ValueError("only {'type': 'text'} is supported")
        return response_format

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        """The field the request's output limit came from (what a 400 about it names as `param`)."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def message_dicts(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        return [
            {"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()} for msg in self.messages
        ]


# --- response bodies (for the OpenAPI document; handlers build the same shapes as plain dicts) --------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the offending request field, dotted (`messages.0.content`), if any")
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every non-200 answer of this server has this body."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    service_class: Literal["LS", "BE"]
    max_model_len: int | None = Field(
        description="the runtime's maximum context (prompt + output tokens); null only while the model is still loading"
    )


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    reason: str | None = None


class APIError(Exception):
    """A request the server answers with OpenAI's error envelope (`error_response`) and this status."""

    def __init__(
        self, status: int, message: str, err_type: str, code: str | None = None, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.err_type, self.code, self.param = status, message, err_type, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.err_type, self.code, self.param, self.headers)


def error_body(message: str, err_type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_type_for(status: int) -> str:
    """The envelope's `type` for a status when nothing more specific applies."""
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(status: int, message: str, err_type: str | None = None, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(message, err_type or error_type_for(status), code, param), status_code=status,
                        headers=headers)  # fmt: skip


def resolve_max_tokens(
    service: ServiceConfig, requested: int | None, field: str, prompt_len: int, max_model_len: int, chat: bool
) -> int:
    """The request's output limit: as sent (at most the service's max_tokens_limit), else the service default.
    `field` is the body field the request sent it in (what a 400 names as `param`)."""
    limit = service.max_tokens_limit
    if requested is not None:
        if limit is not None and requested > limit:
            also = "" if field == "max_tokens" else " (max_tokens)"
            raise APIError(400, f"{field}{also} is {requested}, above the limit of {limit} for the model "
                                f"`{service.name}` (its max_tokens_limit); ask for at most {limit}",
                           "invalid_request_error", "invalid_request", field)  # fmt: skip
        return requested
    remaining = max(1, max_model_len - prompt_len)
    if service.default_max_tokens is not None:
        default = service.default_max_tokens
    elif not chat:
        default = COMPLETIONS_DEFAULT_MAX_TOKENS
    elif service.service_class == "BE":
        default = BE_DEFAULT_MAX_TOKENS
    else:
        default = remaining
    # A default the client never asked for must not turn into a context-length 400: clamp it to what fits.
    return max(1, min(default, remaining, limit or default))


# -- response bodies -------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion_body(request_id: str, chat: bool, created: int, model: str, text: str, finish_reason: str | None,
                    usage: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """A non-streamed answer: a `chat.completion` or a `text_completion` with its one choice."""
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason=finish_reason)
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage}  # fmt: skip


def model_card(name: str, created: int, root: str, service_class: str, max_model_len: int | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "piggyback", "root": root,
            "service_class": service_class, "max_model_len": max_model_len}  # fmt: skip


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}


def health_body(status: str, reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """/healthz and /readyz: `status`, and `reason` when not healthy or not ready."""
    return {"status": status, **({"reason": reason} if reason is not None else {}), **extra}


# -- streaming: the runtime's server and the pool router send the same events ---------------------------------
SSE_DONE = "data: [DONE]\n\n"  # every stream ends with it, a failed one too (clients wait for it)


def sse_data(payload: dict[str, Any], ensure_ascii: bool = False) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=ensure_ascii)}\n\n"


def sse_error(message: str, err_type: str, code: str | None) -> str:
    """A stream's failure: an error envelope as one event (ASCII-escaped, as before [DONE])."""
    return sse_data(error_body(message, err_type, code), ensure_ascii=True)


def stream_chunk(request_id: str, chat: bool, created: int, model: str, choice: dict[str, Any] | None,
                 include_usage: bool, usage: dict[str, int] | None = None) -> str:  # fmt: skip
    """One streamed event as OpenAI sends it; with include_usage every chunk carries `usage` (null but the last)."""
    payload: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice] if choice is not None else [],
    }
    if include_usage:
        payload["usage"] = usage
    return sse_data(payload)


def stream_choice(chat: bool, text: str, finish_reason: str | None) -> dict[str, Any]:
    if chat:
        delta = {"content": text} if text else {}  # the closing chunk carries only finish_reason
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_role_choice() -> dict[str, Any]:
    """The first chunk of a chat stream: the role, no content yet."""
    return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


# -- the Batch API's objects (batch/ package): files, batches, pages, output and error lines --------------------
def file_object(file_id: str, size_bytes: int, created_at: int, filename: str, purpose: str) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size_bytes, "created_at": created_at, "filename": filename,
            "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None}  # fmt: skip


def file_deleted(file_id: str) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "deleted": True}


def cursor_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A list answer that the client pages through with `after=<last_id>` while `has_more`."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}  # fmt: skip


def batch_object(fields: dict[str, Any], errors: list[dict[str, Any]] | None, total: int, completed: int,
                 failed: int) -> dict[str, Any]:  # fmt: skip
    """A batch as OpenAI's client parses it; `fields` holds the id, endpoint, status, file ids, metadata and the
    `*_at` timestamps (None where the batch never passed that point)."""
    return {"object": "batch", **fields, "errors": {"object": "list", "data": errors} if errors else None,
            "request_counts": {"total": total, "completed": completed, "failed": failed}}  # fmt: skip


def batch_output_line(line_id: str, custom_id: str, status_code: int | None, request_id: str | None,
                      body: dict[str, Any] | None, error: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """One line of a batch's output file (status 200) or error file (another status, or no response at all and
    an `error` {code, message}: a line the batch never ran because it was cancelled or expired)."""
    response = None if status_code is None else {"status_code": status_code, "request_id": request_id, "body": body}
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": error}
