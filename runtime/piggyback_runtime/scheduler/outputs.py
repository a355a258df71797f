"""What one iteration produced, in the form `Planner.update` takes it, and what the update reports back.

Pure Python, no torch: the engine converts its model runner's result into `IterationOutputs`; the simulator
builds them from its latency model. Either way the planner does the same bookkeeping with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from piggyback_runtime.request import FINISH_LENGTH, Request
from piggyback_runtime.scheduler.batching import IterationPlan


def sampling_requests(plan: IterationPlan) -> list[Request]:
    """The plan's requests that sample a token this iteration (their chunk reaches their last token), in the
    order the plan's chunks run. Read it before the iteration's update: an appended token changes it."""
    return [chunk.request for chunk in plan.chunks if chunk.samples]


@dataclass(frozen=True)
class IterationOutputs:
    """What an iteration that ran a plan produced."""

    started_s: float  # when the iteration began (planning included), on the planner's clock
    plan_token_ids: Sequence[int]  # one sampled token for each of `sampling_requests(plan)`, in order
    # Tokens of host-path rows that left the last layer this iteration (the CPU path's rows, not the plan's).
    host_path_tokens: Sequence[tuple[Request, int]] = field(default_factory=tuple)
    be_rows_merged: int = 0  # BE rows merged into Dense batches, summed over layers
    num_layers: int = 1  # the model's layers, to turn `be_rows_merged` into rows per layer
    # Requests of the plan's `be_to_host` / `be_to_gpu` whose KV move the caller could not execute: they stay
    # where they were (the planner undoes its side of the move; it decides again in a later plan).
    failed_moves: Sequence[Request] = field(default_factory=tuple)


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token after the planner took it: what the caller still has to do for its request."""

    request: Request
    token_id: int
    first: bool  # the request's first token
    previous_token_s: float | None  # when its previous token left (None for the first)
    finish_reason: str | None  # the request is done (and dropped from the planner) when set
    left_for_host_path: bool = False  # prefill done: its next tokens decode on the CPU path
    from_host_path: bool = False  # came from `IterationOutputs.host_path_tokens`


def append_until_max_tokens(request: Request, token_id: int) -> str | None:
    """Token handling without a tokenizer (the simulator): the request ends at `max_tokens`."""
    request.output_token_ids.append(token_id)
    return FINISH_LENGTH if len(request.output_token_ids) >= request.params.max_tokens else None
