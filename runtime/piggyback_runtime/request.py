"""A request's state inside the runtime: prompt, progress through its tokens, outputs, timing."""

from __future__ import annotations

import enum
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from piggyback_runtime.config import ServiceClass
from piggyback_runtime.metrics import RequestTiming

# OpenAI finish reasons, plus "abort" (client went away) and "error" (the runtime failed the request).
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"
FINISH_REJECTED = "rejected"  # refused at arrival (HTTP 429); never produced a token


# A UTF-8 character is at most 4 bytes: split over tokens of at least one byte each, it spans at most 4.
_MAX_CHAR_TOKENS = 4


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SLOTarget:
    """The latency targets one request is held to (the service's SLO, or per-request overrides)."""

    ttft_s: float
    tpot_s: float


@dataclass(eq=False)
class Request:
    request_id: str
    service: str
    service_class: ServiceClass
    prompt_token_ids: list[int]
    params: SamplingParams
    slo: SLOTarget | None = None
    arrival_s: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache; the next step computes tokens [num_computed_tokens, ...).
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    # Where its KV lives while it decodes (the planner decides; scheduler/planner.py): "gpu" (accelerator KV,
    # attention on the accelerator) or "host" (host DRAM, attention on the CPU path). Policy `hybrid` moves
    # BE requests between the two (IterationPlan.be_to_host / be_to_gpu).
    placement: str = "gpu"

    # The seeded request's torch.Generator (typed loosely: this module stays torch-free for the planner).
    generator: object | None = None
    # Incremental detokenisation state (`append_token`).
    output_text: str = ""
    sent_text_len: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def is_ls(self) -> bool:
        return self.service_class == "LS"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_num_tokens(self) -> int:
        """Its tokens at full length (prompt + max_tokens): the KV a reservation at full length holds."""
        return len(self.prompt_token_ids) + self.params.max_tokens

    @property
    def num_remaining_tokens(self) -> int:
        """Tokens to compute before this request samples its next token."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_decode(self) -> bool:
        return self.num_remaining_tokens == 1 and bool(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    # --- output handling: detokenising, stop strings, finish reasons ---------------------------------------
    def append_token(
        self, token: int, tokenizer: Detokenizer, eos_token_ids: Collection[int], max_model_len: int
    ) -> str | None:
        """Take a sampled token; returns the finish reason if the request is done now, else None."""
        self.output_token_ids.append(token)
        params = self.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
            self._flush(tokenizer, len(self.output_token_ids) - 1)  # the stop token's own text is not output
            return FINISH_STOP
        if self._detokenize(tokenizer):
            return FINISH_STOP
        if len(self.output_token_ids) >= params.max_tokens or self.num_tokens >= max_model_len:
            # Bytes still held back as a possible partial character never will complete: out as U+FFFD.
            return FINISH_STOP if self._flush(tokenizer, len(self.output_token_ids)) else FINISH_LENGTH
        return None

    def _detokenize(self, tokenizer: Detokenizer) -> bool:
        """Extend output_text with the newest token; True when a stop string completed (text cut before it).

        A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives, so text
        ending in U+FFFD is held back. Not for ever: a character has at most 4 bytes and a token at least one,
        so once 4 tokens are pending, everything before the last 3 is final (bytes that never form valid
        UTF-8 go out as U+FFFD, as OpenAI and vLLM send them); `_flush` releases the rest at the end.
        """
        ids = self.output_token_ids
        end = len(ids)
        full = tokenizer.decode(ids[self.prefix_offset : end])
        if full.endswith("\ufffd"):
            if end - self.read_offset < _MAX_CHAR_TOKENS:
                return False
            end -= _MAX_CHAR_TOKENS - 1
            full = tokenizer.decode(ids[self.prefix_offset : end])
        prefix = tokenizer.decode(ids[self.prefix_offset : self.read_offset])
        if len(full) <= len(prefix):
            return False
        return self._commit(full[len(prefix) :], end)

    def _flush(self, tokenizer: Detokenizer, end: int) -> bool:
        """Release the text of tokens [read_offset, end) as it decodes now, U+FFFD included."""
        ids = self.output_token_ids
        if end <= self.read_offset:
            return False
        prefix = tokenizer.decode(ids[self.prefix_offset : self.read_offset])
        full = tokenizer.decode(ids[self.prefix_offset : end])
        if len(full) <= len(prefix):
            return False
        return self._commit(full[len(prefix) :], end)

    def _commit(self, new_text: str, read_to: int) -> bool:
        previous_len = len(self.output_text)
        self.output_text += new_text
        self.prefix_offset, self.read_offset = self.read_offset, read_to
        for stop in self.params.stop:
            index = self.output_text.find(stop, max(0, previous_len - len(stop) + 1))
            if index != -1:
                self.output_text = self.output_text[:index]
                return True
        return False

    def take_text(self, final: bool) -> str:
        """The text not yet sent. While running, what could be the start of a stop string is held back, so
        it is never streamed."""
        holdback = 0 if final or not self.params.stop else max(len(s) for s in self.params.stop) - 1
        end = max(self.sent_text_len, len(self.output_text) - holdback)
        delta = self.output_text[self.sent_text_len : end]
        self.sent_text_len = end
        return delta

    def timing(self) -> RequestTiming:
        return RequestTiming(
            arrival_s=self.arrival_s,
            scheduled_s=self.scheduled_s,
            first_token_s=self.first_token_s,
            last_token_s=self.last_token_s,
            num_output_tokens=len(self.output_token_ids),
        )

    # --- wire form: a request moving to another runtime (live migration, migration.py) -------------------
    _WIRE_AGES: ClassVar[tuple[str, ...]] = ("arrival_s", "scheduled_s", "first_token_s", "last_token_s")
    _WIRE_DETOK: ClassVar[tuple[str, ...]] = ("output_text", "sent_text_len", "prefix_offset", "read_offset")

    def to_wire(self, num_computed_tokens: int, now_s: float) -> dict[str, Any]:
        """Everything but the KV, as JSON: timings as ages (seconds before `now_s`, this process's monotonic
        clock) since monotonic clocks differ between processes. `generator` must hold the seed by now
        (sampling.request_seed), so the random stream continues on the other side."""
        p = self.params
        return {
            "request_id": self.request_id, "service": self.service, "service_class": self.service_class,
            "prompt_token_ids": self.prompt_token_ids, "output_token_ids": self.output_token_ids,
            "num_computed_tokens": num_computed_tokens,
            "params": {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                       "seed": p.seed, "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids),
                       "ignore_eos": p.ignore_eos},
            "generator": self.generator,
            "slo": None if self.slo is None else {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            "ages_s": {name: None if (value_s := getattr(self, name)) is None else now_s - value_s
                       for name in self._WIRE_AGES},
            "detok": {name: getattr(self, name) for name in self._WIRE_DETOK},
            "num_preemptions": self.num_preemptions,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, wire: dict[str, Any], now_s: float) -> Request:
        """The request `to_wire` described, its timings re-based onto this process's clock at `now_s`.
        Raises KeyError, TypeError or ValueError on a malformed description."""
        raw_params = wire["params"]
        params = SamplingParams(**{**raw_params, "stop": tuple(raw_params["stop"]),
                                   "stop_token_ids": tuple(raw_params["stop_token_ids"])})  # fmt: skip
        ages = wire["ages_s"]
        request = cls(
            wire["request_id"], wire["service"], wire["service_class"], list(wire["prompt_token_ids"]), params,
            slo=SLOTarget(**wire["slo"]) if wire["slo"] else None, arrival_s=now_s - ages["arrival_s"],
        )  # fmt: skip
        request.output_token_ids = list(wire["output_token_ids"])
        request.num_computed_tokens = int(wire["num_computed_tokens"])
        request.generator = wire["generator"]
        request.num_preemptions = int(wire["num_preemptions"])
        for name in cls._WIRE_AGES[1:]:
            setattr(request, name, None if ages[name] is None else now_s - ages[name])
        detok = wire["detok"]
        for name in cls._WIRE_DETOK:
            setattr(request, name, detok[name])
        return request


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request, delivered to whoever waits on it."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    retry_after_s: float | None = None  # rejections: when a retry may succeed
    reject_reason: str | None = None
