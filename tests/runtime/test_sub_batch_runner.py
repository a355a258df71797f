"""Two sub-batches per iteration in the model runner (IterationPlan.split_at > 0, NEO-style pipelining).

A split plan runs as sub-batches A and B half a layer apart: per layer A.pre(l); B.post(l-1); B.pre(l); A.post(l).
Each BE row on the CPU path rides in its own sub-batch (alternating as rows enter the path) and merges at that
sub-batch's merge point. The spec here: greedy LS and BE tokens are exactly those of the same requests run as one
batch, for `piggyback` and `hybrid`, with prompt chunks (LS, and BE ones whose KV goes to host KV) cut between A
and B while CPU rows of both sub-batches merge; `neo` refuses a split plan; tensor parallelism (gloo, 2 ranks)
gives the tokens of tp 1. Split plans come from `SplitPlans` (tests/runtime/split_plans.py), which splits every
plan that prefills whatever the planner's own rule would do.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from typing import Any

import pytest

from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.engine import Engine
from piggyback_runtime.piggyback.be_path import BERow
from piggyback_runtime.request import Request
from piggyback_runtime.scheduler.batching import IterationPlan, ScheduledChunk
from piggyback_runtime.scheduler.policies import make_policy
from tests.runtime import test_tensor_parallel as tp_test
from tests.runtime.helpers import (
    assert_matches_reference,
    greedy,
    hf_reference,
    make_request,
    reference_greedy,
    tiny_config,
)
from tests.runtime.split_plans import SplitPlans
from tests.runtime.test_be_moves import MoveOrders

pytestmark = pytest.mark.slow  # engines with CPU worker processes

PROMPTS = [[1, *range(30, 30 + n)] for n in (4, 19, 33, 2, 11, 7, 25, 14)]
CLASSES = "BLBBLBLB"
MAX_TOKENS = 12
ARRIVAL_EVERY_STEPS = 3  # later prompts prefill while the earlier BE requests decode on the CPU path


class MergeCounter:
    """BE rows merged per sub-batch in split iterations (wraps `runner.run` and `PiggybackPath.take`)."""

    def __init__(self, engine: Engine, patch: pytest.MonkeyPatch) -> None:
        self.by_sub_batch = [0, 0]
        self._split = False
        runner, pb = engine.runner, engine.piggyback
        assert pb is not None
        real_run, real_take = runner.run, pb.take

        def run(plan: IterationPlan) -> Any:
            self._split = plan.split_at > 0
            return real_run(plan)

        def take(layer: int, rows: list[BERow]) -> Any:
            if self._split:
                for row in rows:
                    self.by_sub_batch[row.sub_batch] += 1
            return real_take(layer, rows)

        patch.setattr(runner, "run", run)
        patch.setattr(pb, "take", take)


def serve_staggered(engine: Engine, tag: str) -> list[Request]:
    requests = [make_request(f"{tag}{i}", prompt, greedy(MAX_TOKENS), "LS" if c == "L" else "BE")
                for i, (prompt, c) in enumerate(zip(PROMPTS, CLASSES, strict=True))]  # fmt: skip
    pending, steps = list(requests), 0
    while pending or engine.has_work():
        if pending and steps % ARRIVAL_EVERY_STEPS == 0:
            engine.add_request(pending.pop(0))
        engine.step()
        steps += 1
        assert steps < 5_000, "engine did not finish"
    for request in requests:
        assert request.finish_reason == "length" and request.error is None, request.request_id
    return requests


def assert_idle(engine: Engine) -> None:
    pb = engine.piggyback
    assert pb is not None and not engine.has_work()
    assert not pb.rows and not pb.row_by_slot and not pb.residuals
    assert pb.host_kv.allocator.num_used == 0 and engine.allocator.num_used == 0


@pytest.fixture(scope="module")
def piggyback_engine() -> Iterator[Engine]:
    engine = Engine(tiny_config(policy="piggyback", max_num_batched_tokens=16, piggyback={"max_be_rows_per_layer": 3},
                                slo_control={"enabled": False}))  # fmt: skip
    yield engine
    engine.close()


def test_split_iterations_give_exactly_the_tokens_of_one_batch_under_piggyback(
    piggyback_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = piggyback_engine
    one_batch = [r.output_token_ids for r in serve_staggered(engine, "one-")]
    merges = MergeCounter(engine, monkeypatch)
    with SplitPlans(engine) as splits:
        split = serve_staggered(engine, "split-")
    assert splits.split > 0
    # Cut between A and B: an LS prompt chunk, and a BE prompt chunk whose KV goes to host KV as it is computed.
    assert {"LS", "BE-host"} <= splits.cut_classes, splits.cut_classes
    assert all(merges.by_sub_batch), f"CPU rows of both sub-batches merge in split iterations: {merges.by_sub_batch}"
    assert [r.output_token_ids for r in split] == one_batch
    assert_idle(engine)
    # And both are the reference model's tokens.
    hf = hf_reference(engine.arch, engine.model.state_dict())
    for request, prompt in zip(split, PROMPTS, strict=True):
        assert_matches_reference(request.output_token_ids, *reference_greedy(hf, prompt, MAX_TOKENS))


def test_rows_keep_the_sub_batch_they_entered_with_alternating_by_arrival(
    piggyback_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pb = piggyback_engine.piggyback
    assert pb is not None
    seen: dict[str, int] = {}
    real_take = pb.take

    def take(layer: int, rows: list[BERow]) -> Any:
        for row in rows:
            assert seen.setdefault(row.request.request_id, row.sub_batch) == row.sub_batch
        return real_take(layer, rows)

    monkeypatch.setattr(pb, "take", take)
    with SplitPlans(piggyback_engine):
        requests = serve_staggered(piggyback_engine, "sticky-")
    be = [r.request_id for r in requests if not r.is_ls]
    # They start decoding on the path in arrival order here (each prefills in the steps before the next comes).
    assert [seen[rid] for rid in be] == [i % 2 for i in range(len(be))]


def test_neo_refuses_a_split_plan(piggyback_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = piggyback_engine.runner
    monkeypatch.setattr(runner, "policy", make_policy("neo"))
    request = make_request("neo", [1, 2, 3, 4], greedy(1))
    plan = IterationPlan(prefills=[ScheduledChunk(request, 0, 4)], split_at=2)
    with pytest.raises(ValueError, match=r"policy 'neo' .*\(split_at must be 0\)"):
        runner.run(plan)


def test_split_iterations_give_exactly_the_tokens_of_one_batch_under_hybrid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hybrid placement: BE requests prefill in HBM and the planner moves them to the host path at their first
    token (`MoveOrders`), so CPU rows ride while later prompts prefill, cut between A and B."""
    engine = Engine(tiny_config(policy="hybrid", max_num_batched_tokens=16, hbm_reserve_horizon_s=0.0,
                                piggyback={"num_cpu_workers": 2}, slo_control={"enabled": False}))  # fmt: skip
    try:
        to_host_at_first_token = {f"{i}": {1: "host"} for i, c in enumerate(CLASSES) if c == "B"}
        orders = MoveOrders(engine, to_host_at_first_token, "one-")
        try:
            one_batch = [r.output_token_ids for r in serve_staggered(engine, "one-")]
        finally:
            orders.restore()
        assert len(orders.issued) == CLASSES.count("B")
        orders = MoveOrders(engine, to_host_at_first_token, "split-")
        merges = MergeCounter(engine, monkeypatch)
        try:
            with SplitPlans(engine) as splits:
                split = serve_staggered(engine, "split-")
        finally:
            orders.restore()
        assert len(orders.issued) == CLASSES.count("B")
        assert splits.split > 0 and "LS" in splits.cut_classes
        assert all(merges.by_sub_batch), merges.by_sub_batch
        assert [r.output_token_ids for r in split] == one_batch
        assert_idle(engine)
    finally:
        engine.close()


# --- tensor parallelism --------------------------------------------------------------------------------------------
def tp_config(tp: int) -> Any:
    return tp_test._scenario_config("synthetic://tiny-llama", tp, "piggyback", True)


def _run_split_tp2(results: Any) -> None:
    """In a fresh process (rank 0; torch.distributed is per process): tp 2 under `piggyback` with split plans."""
    try:
        engine = Engine(tp_config(2))
        try:
            merges = MergeCounter(engine, pytest.MonkeyPatch())
            with SplitPlans(engine) as splits:
                tokens = [r.output_token_ids for r in serve_staggered(engine, "tp2-")]
            results.put(("ok", tokens, splits.split, merges.by_sub_batch))
        finally:
            engine.close()
    except BaseException as exc:  # reported to the test
        results.put(("error", repr(exc), 0, []))


def test_tp_2_with_split_plans_gives_the_tokens_of_tp_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank runs the same sub-batches and merges the same rows at each of the twice as many merge points
    (the ranks agree on the rows ready at each), so the tokens are tp 1's (one batch)."""
    monkeypatch.setenv(cpu_attention.ENV_BACKEND, "torch")  # no native build in the rank processes
    results = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=_run_split_tp2, args=(results,))
    process.start()
    try:
        status, tokens, num_split, by_sub_batch = results.get(timeout=240)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    assert status == "ok", tokens
    assert num_split > 0 and all(by_sub_batch), (num_split, by_sub_batch)
    one = Engine(tp_config(1))
    try:
        expected = [r.output_token_ids for r in serve_staggered(one, "tp1-")]
        for prompt, ours, tp1 in zip(PROMPTS, tokens, expected, strict=True):
            if ours != tp1:  # only at a near-tie: a row-parallel layer sums in another order than one matmul
                hf = hf_reference(one.arch, one.model.state_dict())
                assert_matches_reference(ours, tp1, reference_greedy(hf, prompt, MAX_TOKENS)[1])
    finally:
        one.close()
