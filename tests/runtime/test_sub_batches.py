"""Two sub-batches (piggyback.sub_batches: 2): how a plan's chunks divide at `split_at`."""

from __future__ import annotations

import pytest

from piggyback_runtime.request import Request, SamplingParams
from piggyback_runtime.scheduler.batching import IterationPlan, ScheduledChunk, split_chunks


def _request(request_id: str, prompt_len: int) -> Request:
    return Request(request_id, "chat", "LS", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4))


def test_one_batch_when_not_split() -> None:
    plan = IterationPlan(decodes=[ScheduledChunk(_request("a", 3), 2, 1)])
    assert split_chunks(plan) == (plan.chunks, [])


def test_the_chunk_that_straddles_the_split_is_cut_and_its_sampling_part_goes_to_b() -> None:
    decode = ScheduledChunk(_request("d", 5), 4, 1)
    prompt = _request("p", 100)
    plan = IterationPlan(decodes=[decode], prefills=[ScheduledChunk(prompt, 20, 80)], split_at=41)
    first, second = split_chunks(plan)
    assert first == [decode, ScheduledChunk(prompt, 20, 40)]
    assert second == [ScheduledChunk(prompt, 60, 40)]
    assert not first[1].samples and second[0].samples
    assert sum(c.num_tokens for c in first + second) == plan.num_tokens


def test_a_split_at_a_chunk_boundary_cuts_nothing() -> None:
    chunks = [ScheduledChunk(_request(f"r{i}", 10), 0, 10) for i in range(4)]
    first, second = split_chunks(IterationPlan(prefills=chunks, split_at=20))
    assert (first, second) == (chunks[:2], chunks[2:])


def test_a_split_that_leaves_b_empty_is_refused() -> None:
    plan = IterationPlan(prefills=[ScheduledChunk(_request("p", 10), 0, 10)], split_at=10)
    with pytest.raises(ValueError, match="sub-batch B empty"):
        split_chunks(plan)


def test_a_graphed_step_gets_no_merge_layer_where_the_row_cap_is_zero() -> None:
    # A layer in the merge schedule runs eager (cuda_graphs.schedule); with a cap of 0 rows per layer nothing
    # merges, so no layer may be listed (the graphed step then replays every layer from its pieces).
    from types import SimpleNamespace

    from piggyback_runtime.piggyback.be_path import PiggybackPath

    rows = [SimpleNamespace(layer=layer, since=i) for i, layer in enumerate((2, 2, 5))]
    path = SimpleNamespace(collect=lambda: None, entering=list, _ready_among=lambda rs: rs,
                           rows={i: r for i, r in enumerate(rows)}, max_rows_per_layer=0)  # fmt: skip
    assert PiggybackPath.merge_schedule(path) == ([], {})  # type: ignore[arg-type]
    path.max_rows_per_layer = 1
    assert PiggybackPath.merge_schedule(path) == ([], {2: [rows[0]], 5: [rows[2]]})  # type: ignore[arg-type]
