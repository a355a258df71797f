"""Iteration planner: continuous batching with chunked prefill under a token budget (Sarathi-Serve style).

Pure Python, no torch: the simulator drives this same code. Each iteration is filled in priority order
    LS decodes > LS partial prefills > LS new prefills > BE decodes > BE partial prefills > BE new prefills
until the token budget is spent. When the accelerator KV cache runs out, the lowest-priority running
request (BE before LS, latest arrival first) is preempted: its blocks are freed and it is recomputed later.
The policy (scheduler/policies/) orders requests, picks the victim and says when BE waits and how much KV it
may hold.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from piggyback_runtime.kv.allocator import BlockAllocator
from piggyback_runtime.request import Request, RequestStatus
from piggyback_runtime.scheduler.policies import Policy, make_policy


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    start: int  # first token position computed in this iteration
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the request's tokens, so the iteration samples a token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class IterationPlan:
    decodes: list[ScheduledChunk] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # BE rows on the CPU path that may join each layer's Dense batch this iteration (the planner sets it).
    be_rows_per_layer: int = 0
    # KV moves the runtime executes for this plan (policy `hybrid`), decided by the planner:
    # be_to_host: BE requests whose KV moves from accelerator to host DRAM (they decode on the CPU path from
    #   the next iteration; none of them is in this plan's chunks; their accelerator blocks are freed by
    #   `Planner.update` once this plan ran, so nothing else is written there while the copy runs);
    # be_to_gpu: host-resident BE requests (between tokens) whose KV moves back into the accelerator blocks the
    #   planner allocated for them; they decode on the accelerator from the next plan on, and their host KV is
    #   freed by whoever runs the CPU path once the copy is done.
    be_to_host: list[Request] = field(default_factory=list)
    be_to_gpu: list[Request] = field(default_factory=list)
    # The token budget this plan was filled under (the planner's SLO-sized budget; ≤ max_num_batched_tokens).
    token_budget: int = 0
    # Two sub-batches (piggyback.sub_batches: 2, the planner's call): the flat token index where sub-batch B
    # begins (`split_chunks` cuts the chunk that straddles it); 0: one batch. The accelerator runs the two
    # half a layer apart, so each sub-batch's CPU rows have the other's half layer to come back in.
    split_at: int = 0

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.decodes) + sum(c.num_tokens for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


def split_chunks(plan: IterationPlan) -> tuple[list[ScheduledChunk], list[ScheduledChunk]]:
    """The plan's chunks (decodes, then prefills) as sub-batches A and B at `plan.split_at`: the chunk that
    straddles it is cut in two, its first part in A (which runs each layer first, so B's part attends to KV
    that A wrote in the same layer) and its last part, which samples if the chunk does, in B."""
    if plan.split_at <= 0:
        return plan.chunks, []
    if plan.split_at >= plan.num_tokens:
        raise ValueError(f"split_at {plan.split_at} leaves sub-batch B empty ({plan.num_tokens} tokens)")
    first: list[ScheduledChunk] = []
    second: list[ScheduledChunk] = []
    position = 0
    for chunk in plan.chunks:
        head = min(chunk.num_tokens, max(0, plan.split_at - position))
        if head:
            first.append(ScheduledChunk(chunk.request, chunk.start, head))
        if chunk.num_tokens - head:
            second.append(ScheduledChunk(chunk.request, chunk.start + head, chunk.num_tokens - head))
        position += chunk.num_tokens
    return first, second


class BatchScheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.policy = policy or make_policy("priority")
        self.clock = clock  # the simulator passes simulated time
        # BE requests together hold at most this many KV blocks (policy `headroom`: the rest is LS headroom).
        self.be_kv_block_limit = self.policy.be_kv_block_limit(allocator.num_blocks)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # --- queue management --------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the scheduler (finished or aborted) and free its KV at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.allocator.free(request.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, victim: Request, plan: IterationPlan) -> None:
        self.running.remove(victim)
        self.allocator.free(victim.request_id)
        victim.num_computed_tokens = 0  # recompute: prompt and outputs so far are prefilled again
        victim.num_preemptions += 1
        victim.status = RequestStatus.WAITING
        self.num_preemptions += 1
        plan.preempted.append(victim)

    # --- planning ------------------------------------------------------------------------------------
    def schedule(self, be_prefill_limit: Callable[[IterationPlan], int] | None = None,
                 token_budget: int | None = None,
                 be_decode_limit: Callable[[IterationPlan], int] | None = None) -> IterationPlan:  # fmt: skip
        """Plan one iteration. `be_prefill_limit(plan with the LS work and BE decodes)` caps the BE prefill
        tokens and `be_decode_limit(plan with the LS work)` the BE decode rows (SLO control); `token_budget`
        (at most max_num_batched_tokens) replaces the configured budget for this iteration."""
        plan = IterationPlan()
        self._plan = plan
        budget = self.max_num_batched_tokens if token_budget is None else min(token_budget, self.max_num_batched_tokens)
        self._budget = budget
        plan.token_budget = budget
        self._scheduled: set[str] = set()
        self._be_prefill_left = budget
        be_decodes_left = budget
        self.running.sort(key=self.policy.priority)
        self._be_blocks = sum(len(self.allocator.blocks_of(r.request_id)) for r in self.running if not r.is_ls)
        for service_class in ("LS", "BE"):
            if service_class == "BE":
                if self.policy.be_waits_for(any(r.is_ls for r in (*self.running, *self.waiting))):
                    break
                if be_decode_limit is not None:
                    be_decodes_left = be_decode_limit(plan)
            # Decodes of running requests first: they hold KV and a client is waiting on every token.
            for request in [r for r in self.running if r.service_class == service_class and r.in_decode]:
                if self._budget < 1 or (service_class == "BE" and be_decodes_left < 1):
                    break
                if request not in self.running:  # preempted above by a higher-priority request
                    continue
                if self._make_room(request, request.num_computed_tokens + 1, same_class_victims=True):
                    self._take(request, plan.decodes, 1)
                    if service_class == "BE":
                        be_decodes_left -= 1
                else:
                    self._preempt(request, plan)
            if service_class == "BE" and be_prefill_limit is not None:
                self._be_prefill_left = be_prefill_limit(plan)
            # Partial prefills of running requests next, then new prefills.
            for request in [r for r in self.running if r.service_class == service_class and not r.in_decode]:
                if self._prefill_budget(request) < 1 or request.request_id in self._scheduled:
                    continue
                if request not in self.running:
                    continue
                self._schedule_prefill(request, same_class_victims=True)
            for request in [r for r in self.waiting if r.service_class == service_class]:
                if self._prefill_budget(request) < 1 or len(self.running) >= self.max_num_seqs:
                    break
                # A waiting request only displaces a lower class: same-class preemption would thrash.
                if not self._schedule_prefill(request, same_class_victims=False):
                    break  # keep arrival order within a class: no overtaking a request that does not fit
                self.waiting.remove(request)
                self.running.append(request)
                request.status = RequestStatus.RUNNING
                if request.scheduled_s is None:
                    request.scheduled_s = self.clock()
        # Preempted requests wait at the head of the queue: they were admitted before anything waiting.
        for victim in reversed(plan.preempted):
            if victim.status == RequestStatus.WAITING and victim not in self.waiting:
                self.waiting.appendleft(victim)
        return plan

    def _prefill_budget(self, request: Request) -> int:
        return self._budget if request.is_ls else min(self._budget, self._be_prefill_left)

    def _make_room(self, request: Request, num_tokens: int, same_class_victims: bool) -> bool:
        """Grow `request`'s blocks to `num_tokens`, preempting lower-priority running requests if needed."""
        extra = self.allocator.blocks_for_tokens(num_tokens) - len(self.allocator.blocks_of(request.request_id))
        if not request.is_ls and self.be_kv_block_limit is not None:
            if self._be_blocks + extra > self.be_kv_block_limit:
                return False
            self._be_blocks += max(0, extra)
        while not self.allocator.can_hold(request.request_id, num_tokens):
            victims = [
                r for r in self.running
                if r.request_id not in self._scheduled and r is not request
                and self.policy.priority(r) > self.policy.priority(request)
                and (same_class_victims or r.service_class != request.service_class)
            ]  # fmt: skip
            if not victims:
                return False
            self._preempt(self.policy.choose_victim(request, victims), self._plan)
        self.allocator.ensure(request.request_id, num_tokens)
        return True

    def _take(self, request: Request, into: list[ScheduledChunk], num_tokens: int) -> None:
        into.append(ScheduledChunk(request, request.num_computed_tokens, num_tokens))
        self._scheduled.add(request.request_id)
        self._budget -= num_tokens
        if not request.is_ls and into is self._plan.prefills:
            self._be_prefill_left -= num_tokens

    def _schedule_prefill(self, request: Request, same_class_victims: bool) -> bool:
        remaining = request.num_remaining_tokens
        budget = self._prefill_budget(request)
        if self.enable_chunked_prefill:
            chunk = min(remaining, budget)
        else:
            # Without chunking a prompt runs whole; one larger than the budget runs alone.
            if remaining > budget and self._plan:
                return False
            chunk = remaining
        if not self._make_room(request, request.num_computed_tokens + chunk, same_class_victims):
            return False
        self._take(request, self._plan.prefills, chunk)
        return True
