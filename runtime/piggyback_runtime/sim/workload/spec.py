"""The workload spec (pydantic, the style of config.py) and the request it produces: `SimRequest`.

The YAML keys and kinds are described in the package's docstring (sim/workload/__init__.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from piggyback_runtime.config import ServiceClass, format_validation_error

CLASSES: tuple[str, ...] = ("LS", "BE")


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request offered to the simulated runtime."""

    arrival_s: float
    service: str
    service_class: ServiceClass
    prompt_tokens: int
    output_tokens: int
    request_id: str

    def __post_init__(self) -> None:
        if not (isinstance(self.arrival_s, int | float) and math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if self.service_class not in CLASSES:
            raise ValueError(f"service_class must be 'LS' or 'BE', got {self.service_class!r}")
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.service:
            raise ValueError("service must be a non-empty string")
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")


def clip_tokens(value: int, low: int, high: int | None) -> int:
    """`value` within [low, high] (no upper bound when high is None)."""
    value = max(low, value)
    return value if high is None else min(high, value)


# ----------------------------------------------------------------------------------------------------------------
# Spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FixedLengths(_Strict):
    kind: Literal["fixed"]
    prompt_tokens: Annotated[int, Field(ge=1)]
    output_tokens: Annotated[int, Field(ge=1)]


class LognormalLengths(_Strict):
    """Independent lognormal prompt and output lengths, clipped, with the mean after clipping as given."""

    kind: Literal["lognormal"]
    mean_prompt_tokens: Annotated[float, Field(gt=0)]
    mean_output_tokens: Annotated[float, Field(gt=0)]
    sigma_prompt: Annotated[float, Field(ge=0, le=5)] = 1.0
    sigma_output: Annotated[float, Field(ge=0, le=5)] = 1.0
    min_prompt_tokens: Annotated[int, Field(ge=1)] = 1
    max_prompt_tokens: Annotated[int, Field(ge=1)] | None = None
    min_output_tokens: Annotated[int, Field(ge=1)] = 1
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _mean_inside_clip(self) -> LognormalLengths:
        for what in ("prompt", "output"):
            mean = getattr(self, f"mean_{what}_tokens")
            low = getattr(self, f"min_{what}_tokens")
            high = getattr(self, f"max_{what}_tokens")
            # Clipping to [low, high] can only reach a mean strictly inside it (or any mean with sigma 0).
            if high is not None and high < low:
                raise ValueError(f"max_{what}_tokens ({high}) is below min_{what}_tokens ({low})")
            if not (low < mean and (high is None or mean < high)):
                raise ValueError(
                    f"mean_{what}_tokens ({mean}) must lie strictly between min_{what}_tokens ({low}) and "
                    f"max_{what}_tokens ({high if high is not None else 'none'})"
                )
        return self


PresetName = Literal["longbench-v2", "dailymail", "sharegpt-like"]

# Each preset is a lognormal fit of published MEAN lengths — not the dataset, whose shape is unknown here.
# The sigmas and clip bounds are our assumptions; the solver keeps the stated means after clipping.
PRESETS: dict[str, LognormalLengths] = {
    # OmniServe (arXiv 2603.12831, ../shared/reference/omniserve.md) BE workload: LongBench-v2, average
    # input/output 8,952 / 136 tokens, max context 12K — applied here as a 12,000-token cap on the input.
    # About a fifth of an unclipped σ=0.5 lognormal lies above 12,000, which would pull the mean down ~3 %;
    # μ is solved for the clipped mean, so the mean stays at 8,952.
    "longbench-v2": LognormalLengths(
        kind="lognormal",
        mean_prompt_tokens=8952,
        mean_output_tokens=136,
        sigma_prompt=0.5,
        sigma_output=0.6,
        max_prompt_tokens=12_000,
        max_output_tokens=1024,
    ),
    # OmniServe's second BE workload, DailyMail(s) summarisation: average 1,964 / 397 tokens (same source).
    "dailymail": LognormalLengths(
        kind="lognormal",
        mean_prompt_tokens=1964,
        mean_output_tokens=397,
        sigma_prompt=0.5,
        sigma_output=0.5,
        max_prompt_tokens=8192,
        max_output_tokens=2048,
    ),
    # A ShareGPT-like chat: round figures of ~300 input / ~250 output tokens with a heavy tail (σ = 1).
    # OmniServe and L4 use ShareGPT-derived LS lengths without giving means; published ShareGPT means vary
    # with filtering and tokenizer, so these are illustrative, not measured. For a measured LS length mix use
    # the Splitwise conversation trace (kind: trace, ../shared/data/vidur/processed_traces/splitwise_conv.csv).
    "sharegpt-like": LognormalLengths(
        kind="lognormal",
        mean_prompt_tokens=300,
        mean_output_tokens=250,
        sigma_prompt=1.0,
        sigma_output=1.0,
        min_prompt_tokens=4,
        max_prompt_tokens=4096,
        min_output_tokens=4,
        max_output_tokens=2048,
    ),
}


class PresetLengths(_Strict):
    kind: Literal["preset"]
    name: PresetName


LengthsSpec = Annotated[FixedLengths | LognormalLengths | PresetLengths, Field(discriminator="kind")]


class _SourceBase(_Strict):
    service: Annotated[str, Field(min_length=1)]
    service_class: ServiceClass = Field(alias="class")
    start_s: Annotated[float, Field(ge=0)] = 0.0
    # None: the source runs until the workload's horizon.
    duration_s: Annotated[float, Field(gt=0)] | None = None
    # Offset mixed into this source's random streams: re-rolls it without touching the others.
    seed: int | None = None


class PoissonSource(_SourceBase):
    kind: Literal["poisson"]
    rate_per_s: Annotated[float, Field(gt=0)]
    lengths: LengthsSpec


class BurstySource(_SourceBase):
    kind: Literal["bursty"]
    rate_per_s: Annotated[float, Field(gt=0)]
    burst_factor: Annotated[float, Field(ge=1)]
    burst_duration_s: Annotated[float, Field(gt=0)]
    period_s: Annotated[float, Field(gt=0)]
    lengths: LengthsSpec

    @model_validator(mode="after")
    def _burst_inside_period(self) -> BurstySource:
        if self.burst_duration_s >= self.period_s:
            raise ValueError(
                f"burst_duration_s ({self.burst_duration_s}) must be shorter than period_s ({self.period_s})"
            )
        return self

    @property
    def base_rate_per_s(self) -> float:
        """Off-burst rate that makes the mean over a period equal rate_per_s."""
        on, period = self.burst_duration_s, self.period_s
        return self.rate_per_s * period / (self.burst_factor * on + (period - on))


class DiurnalSource(_SourceBase):
    kind: Literal["diurnal"]
    min_rate_per_s: Annotated[float, Field(ge=0)]
    max_rate_per_s: Annotated[float, Field(gt=0)]
    period_s: Annotated[float, Field(gt=0)]
    lengths: LengthsSpec

    @model_validator(mode="after")
    def _ordered_rates(self) -> DiurnalSource:
        if self.max_rate_per_s < self.min_rate_per_s:
            raise ValueError(f"max_rate_per_s ({self.max_rate_per_s}) is below min_rate_per_s ({self.min_rate_per_s})")
        return self

    def rate_at(self, t_s: float) -> float:
        phase = 2 * math.pi * (t_s - self.start_s) / self.period_s
        return self.min_rate_per_s + (self.max_rate_per_s - self.min_rate_per_s) * (1 + math.sin(phase)) / 2


class BatchSource(_SourceBase):
    kind: Literal["batch"]
    count: Annotated[int, Field(ge=1)]
    # 0: all at start_s; else evenly over [start_s, start_s + spread_s).
    spread_s: Annotated[float, Field(ge=0)] = 0.0
    lengths: LengthsSpec


class TraceSource(_SourceBase):
    kind: Literal["trace"]
    # CSV or JSONL; relative paths resolve against generate()'s base_dir.
    path: Annotated[str, Field(min_length=1)]
    # Defaults for rows without service / class columns (rows that have them win).
    service: Annotated[str, Field(min_length=1)] | None = None
    service_class: ServiceClass | None = Field(default=None, alias="class")
    time_scale: Annotated[float, Field(gt=0)] = 1.0
    rate_per_s: Annotated[float, Field(gt=0)] | None = None
    batch: bool = False
    spread_s: Annotated[float, Field(ge=0)] = 0.0
    limit: Annotated[int, Field(ge=1)] | None = None
    max_prompt_tokens: Annotated[int, Field(ge=1)] | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one_arrival_rule(self) -> TraceSource:
        if self.rate_per_s is not None and self.batch:
            raise ValueError("set rate_per_s (Poisson arrivals) or batch: true (all at start_s), not both")
        if "time_scale" in self.model_fields_set and (self.rate_per_s is not None or self.batch):
            raise ValueError("time_scale scales the trace's own arrivals; it has no effect with rate_per_s or batch")
        if "spread_s" in self.model_fields_set and not self.batch:
            raise ValueError("spread_s only applies with batch: true")
        return self


SourceSpec = Annotated[
    PoissonSource | BurstySource | DiurnalSource | BatchSource | TraceSource, Field(discriminator="kind")
]


class WorkloadSpec(_Strict):
    seed: int = 0
    # The horizon: no request arrives at or after it.
    duration_s: Annotated[float, Field(gt=0)]
    sources: Annotated[list[SourceSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _sources_start_inside(self) -> WorkloadSpec:
        # A source that starts at or past the horizon would silently contribute nothing.
        for index, source in enumerate(self.sources):
            if source.start_s >= self.duration_s:
                raise ValueError(
                    f"sources.{index}.start_s ({source.start_s}) is at or past the workload's duration_s "
                    f"({self.duration_s}), so the source would produce no request"
                )
        return self


def load_workload(data: dict[str, Any], source: str) -> WorkloadSpec:
    """Validate a parsed YAML/JSON mapping; a ValueError lists each problem by dotted field path."""
    try:
        return WorkloadSpec.model_validate(data)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, source, "workload spec", "WorkloadSpec in sim/workload/spec.py",
                                                 data)) from None  # fmt: skip
