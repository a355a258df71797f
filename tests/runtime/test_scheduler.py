"""The iteration planner: budget, priority order, continuous batching and preemption (pure Python)."""

from __future__ import annotations

import pytest

from piggyback_runtime.kv.allocator import BlockAllocator, OutOfBlocks
from piggyback_runtime.request import Request, RequestStatus, SamplingParams
from piggyback_runtime.scheduler.batching import BatchScheduler


def _request(rid: str, prompt_len: int, service_class: str = "LS", arrival_s: float = 0.0) -> Request:
    return Request(
        rid,
        "svc",
        service_class,
        list(range(prompt_len)),
        SamplingParams(max_tokens=8),  # type: ignore[arg-type]
        arrival_s=arrival_s,
    )


def _scheduler(
    num_blocks: int = 64, block_size: int = 4, budget: int = 16, max_seqs: int = 8, chunked: bool = True
) -> BatchScheduler:
    return BatchScheduler(BlockAllocator(num_blocks, block_size), max_seqs, budget, chunked)


def _complete(plan) -> None:  # type: ignore[no-untyped-def]
    """Pretend the engine ran the plan: advance progress and sample a token where the chunk reaches the end."""
    for chunk in plan.chunks:
        chunk.request.num_computed_tokens += chunk.num_tokens
        if chunk.samples:
            chunk.request.output_token_ids.append(0)


def test_allocator_reuses_freed_blocks_and_is_all_or_nothing() -> None:
    allocator = BlockAllocator(4, 2)
    first = list(allocator.ensure("a", 3))
    assert len(first) == 2 and allocator.usage() == 0.5
    with pytest.raises(OutOfBlocks):
        allocator.ensure("b", 7)
    assert allocator.num_free == 2 and allocator.blocks_of("b") == []
    allocator.free("a")
    assert sorted(allocator.ensure("c", 4)) == sorted(first)


def test_prefill_is_chunked_to_the_token_budget() -> None:
    scheduler = _scheduler(budget=16)
    request = _request("a", 40)
    scheduler.add(request)
    sizes = []
    while not request.output_token_ids:
        plan = scheduler.schedule()
        sizes.append(plan.num_tokens)
        _complete(plan)
    assert sizes == [16, 16, 8]


def test_without_chunking_a_prompt_runs_whole_even_over_the_budget() -> None:
    scheduler = _scheduler(budget=16, chunked=False)
    scheduler.add(_request("a", 40))
    scheduler.add(_request("b", 4))
    plan = scheduler.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in plan.chunks] == [("a", 40)]


def test_order_is_ls_decode_then_ls_prefill_then_be_decode_then_be_prefill() -> None:
    scheduler = _scheduler(budget=64)
    ls_old, be_old = _request("ls-old", 4, "LS", 0.0), _request("be-old", 4, "BE", 0.0)
    for request in (ls_old, be_old):
        scheduler.add(request)
    _complete(scheduler.schedule())  # both prefilled, both now decoding
    ls_new, be_new = _request("ls-new", 8, "LS", 1.0), _request("be-new", 8, "BE", 1.0)
    scheduler.add(be_new)
    scheduler.add(ls_new)
    plan = scheduler.schedule()
    assert [c.request.request_id for c in plan.decodes] == ["ls-old", "be-old"]
    assert [c.request.request_id for c in plan.prefills] == ["ls-new", "be-new"]


def test_be_work_waits_when_ls_work_fills_the_budget() -> None:
    scheduler = _scheduler(budget=8)
    scheduler.add(_request("be", 8, "BE", 0.0))
    scheduler.add(_request("ls", 8, "LS", 1.0))
    plan = scheduler.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["ls"]


def test_running_requests_are_capped_by_max_num_seqs() -> None:
    scheduler = _scheduler(budget=64, max_seqs=2)
    for i in range(4):
        scheduler.add(_request(f"r{i}", 2, arrival_s=float(i)))
    plan = scheduler.schedule()
    assert len(plan.prefills) == 2 and len(scheduler.waiting) == 2


def test_out_of_blocks_preempts_the_lowest_priority_running_request() -> None:
    # 6 blocks of 4 tokens. Two BE and one LS request fill them; the LS decode then needs one more block.
    scheduler = _scheduler(num_blocks=6, block_size=4, budget=64)
    be_early, be_late = _request("be-early", 8, "BE", 0.0), _request("be-late", 8, "BE", 1.0)
    ls = _request("ls", 8, "LS", 2.0)
    for request in (be_early, be_late, ls):
        scheduler.add(request)
    _complete(scheduler.schedule())
    assert scheduler.allocator.num_free == 0
    plan = scheduler.schedule()
    assert plan.preempted == [be_late]  # BE before LS; among BE, the latest arrival
    assert be_late.status == RequestStatus.WAITING and be_late.num_computed_tokens == 0
    assert scheduler.waiting[0] is be_late  # recomputed first once blocks free up
    assert "ls" in [c.request.request_id for c in plan.decodes]


def test_a_waiting_request_never_preempts_a_running_request_of_its_own_class() -> None:
    # 3 blocks: the running request's 8 prompt tokens and its first decode fill them all.
    scheduler = _scheduler(num_blocks=3, block_size=4, budget=64)
    running = _request("running", 8, "BE", 5.0)
    scheduler.add(running)
    _complete(scheduler.schedule())
    scheduler.add(_request("earlier-arrival", 4, "BE", 0.0))
    plan = scheduler.schedule()
    assert not plan.preempted
    assert [c.request.request_id for c in plan.chunks] == ["running"]


def test_removing_a_request_frees_its_blocks_at_once() -> None:
    scheduler = _scheduler()
    request = _request("a", 10)
    scheduler.add(request)
    scheduler.schedule()
    assert scheduler.allocator.num_used == 3
    scheduler.remove(request)
    assert scheduler.allocator.num_used == 0 and not scheduler.has_work()
