"""BE KV moves between accelerator KV and host KV: decided by the planner (hybrid placement), executed by the
runtime (engine.py, model_runner.py, piggyback/be_path.py) from the plan's `be_to_host` and `be_to_gpu`.

A request moved once or several times mid-generation produces exactly the tokens it produces when never moved
(greedy, checked against the same engine unmoved and against Hugging Face transformers), next to LS rows that
never notice. The moves are ordered through the planner itself (`MoveOrders`): at a given number of output
tokens, `Planner.order_to_host` puts a request decoding in HBM on the next plan's `be_to_host`, and a host
row between tokens is offered to the planner's `schedule` as idle, which moves it back while HBM has room (a
tiny model's HBM always has). Nothing else is offered, so the planner's own placement keeps the rest in HBM.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from piggyback_runtime.engine import Engine
from piggyback_runtime.metrics import MOVE_DONE, MOVE_FAILED
from piggyback_runtime.request import Request
from piggyback_runtime.scheduler.batching import IterationPlan
from tests.runtime.helpers import (
    assert_matches_reference,
    greedy,
    hf_reference,
    make_request,
    run_to_completion,
    tiny_config,
)
from tests.runtime.test_piggyback import BlockingWaitMonitor, _describe

pytestmark = pytest.mark.slow  # CPU attention worker processes

PROMPTS = {"ls-a": [1, *range(30, 49)], "ls-b": [1, 30, 31],
           "be-never": [1, *range(40, 45)], "be-once": [1, *range(50, 83)], "be-back": [1, *range(60, 71)],
           "be-many": [1, *range(70, 77)]}  # fmt: skip
MAX_TOKENS = 16
# Output tokens so far -> where the request's KV goes next. Prompts span several accelerator blocks (4 tokens)
# and host blocks (8 tokens), so every copy crosses block sizes.
ORDERS = {"be-once": {2: "host"}, "be-back": {1: "host", 5: "gpu"},
          "be-many": {1: "host", 3: "gpu", 6: "host", 9: "gpu", 12: "host"}}  # fmt: skip


def make_engine() -> Engine:
    # The default policy with moves executed; no SLO controller (its closed loop would read this machine's
    # wall clock) and no LS forecast reserve: HBM is spare, so the planner itself moves nothing.
    return Engine(tiny_config(policy="hybrid", max_num_batched_tokens=16, hbm_reserve_horizon_s=0.0,
                              piggyback={"num_cpu_workers": 2}, slo_control={"enabled": False}))  # fmt: skip


class MoveOrders:
    """Wraps `engine.planner.schedule`: once a request has `n` output tokens, its KV is ordered to where
    `orders[request_id][n]` says, through the planner (as soon as it is placed elsewhere and between tokens)."""

    def __init__(self, engine: Engine, orders: dict[str, dict[int, str]], tag: str = "") -> None:
        self.engine = engine
        self.tag = tag  # request ids are the orders' keys with this prefix
        self.orders = {tag + rid: dict(by_tokens) for rid, by_tokens in orders.items()}
        self.issued: list[tuple[str, int, str]] = []
        self._schedule = engine.planner.schedule
        engine.planner.schedule = self  # type: ignore[method-assign]

    def restore(self) -> None:
        self.engine.planner.schedule = self._schedule  # type: ignore[method-assign]

    def __call__(self, be_rows_ready: int = 0, host_rows_idle: Sequence[Request] = ()) -> IterationPlan:
        planner = self.engine.planner
        to_gpu: list[Request] = []
        for request in list(self.engine.requests.values()):
            pending = self.orders.get(request.request_id, {})
            due = [n for n in pending if n <= len(request.output_token_ids)]
            if not due:
                continue
            n = min(due)
            if pending[n] == "host":
                if not planner.order_to_host(request):
                    continue
            elif request in host_rows_idle:
                to_gpu.append(request)
            else:
                continue
            del pending[n]
            self.issued.append((request.request_id.removeprefix(self.tag), n, "host" if request not in to_gpu
                                else "gpu"))  # fmt: skip
        plan = self._schedule(be_rows_ready=be_rows_ready, host_rows_idle=to_gpu)
        assert {r.request_id for r in plan.be_to_gpu} == {r.request_id for r in to_gpu}, "the planner kept a row"
        return plan


def submit_all(engine: Engine, tag: str, max_tokens: int = MAX_TOKENS) -> dict[str, Request]:
    requests = {rid: make_request(f"{tag}{rid}", prompt, greedy(max_tokens), "LS" if rid.startswith("ls") else "BE")
                for rid, prompt in PROMPTS.items()}  # fmt: skip
    for request in requests.values():
        engine.add_request(request)
    return requests


def moves(engine: Engine, direction: str, outcome: str = MOVE_DONE) -> float:
    return engine.metrics.be_kv_moves.labels(direction, outcome)._value.get()


def assert_idle(engine: Engine) -> None:
    pb = engine.piggyback
    assert pb is not None
    assert not engine.has_work()
    assert pb.host_kv.allocator.num_used == 0, "host KV blocks leaked"
    assert not pb.rows and not pb.row_by_slot and not pb.residuals
    assert len(pb.host_kv.free_slots) == pb.host_kv.max_requests, "slots leaked"
    assert engine.allocator.num_used == 0, "accelerator KV blocks leaked"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = make_engine()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def unmoved(engine: Engine) -> dict[str, list[int]]:
    """Every request's tokens when nothing moves (the same engine, the same batch)."""
    before = moves(engine, "to_host") + moves(engine, "to_gpu")
    requests = submit_all(engine, "still-")
    run_to_completion(engine)
    assert moves(engine, "to_host") + moves(engine, "to_gpu") == before, "the planner moved on its own"
    assert all(r.placement == "gpu" for r in requests.values())
    assert_idle(engine)
    return {rid: request.output_token_ids for rid, request in requests.items()}


def test_moved_be_requests_produce_exactly_the_tokens_of_unmoved_ones_next_to_ls_rows(
    engine: Engine, unmoved: dict[str, list[int]]
) -> None:
    before = {d: moves(engine, d) for d in ("to_host", "to_gpu")}
    orders = MoveOrders(engine, ORDERS, "moved-")
    monitor = BlockingWaitMonitor(engine)
    try:
        with monitor.watching():
            requests = submit_all(engine, "moved-")
            run_to_completion(engine)
    finally:
        orders.restore()
    # Moving KV either way never blocks the engine thread: it waits only when the accelerator has nothing to do.
    assert monitor.waits_with_work_to_do() == [], _describe(monitor.waits_with_work_to_do())
    # Every order was carried out: GPU -> host once, host -> GPU, and five moves of one request.
    assert sorted(orders.issued) == sorted((rid, n, where) for rid, by in ORDERS.items() for n, where in by.items())
    assert moves(engine, "to_host") - before["to_host"] == 5
    assert moves(engine, "to_gpu") - before["to_gpu"] == 3
    assert engine.planner.moves_to_host >= 5 and engine.planner.moves_to_gpu >= 3
    for rid, request in requests.items():
        assert request.finish_reason == "length" and request.error is None, rid
        assert request.output_token_ids == unmoved[rid], f"{rid} changed its tokens when moved"
    assert requests["be-many"].placement == "host"  # its last order left it on the host path
    assert requests["be-once"].placement == "host" and requests["be-back"].placement == "gpu"
    assert_idle(engine)


def test_unmoved_outputs_are_the_reference_models(engine: Engine, unmoved: dict[str, list[int]]) -> None:
    """The baseline the moves are compared with is itself right (transformers, greedy)."""
    hf = hf_reference(engine.arch, engine.model.state_dict())
    for rid, prompt in PROMPTS.items():
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                              do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                              eos_token_id=None)  # fmt: skip
        assert_matches_reference(unmoved[rid], out.sequences[0, len(prompt) :].tolist(), [s[0] for s in out.scores])


def test_a_move_the_runtime_cannot_execute_is_reported_and_the_request_goes_on_where_it_was(
    engine: Engine, unmoved: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime does not decide again: a failed copy goes back to the planner in the iteration's outputs,
    which gives back what it took for the move (host KV, or accelerator blocks) and keeps the request where it
    decodes; a later order moves it."""
    runner = engine.runner
    real_to_host, real_to_gpu = runner.copy_to_host, runner.copy_to_accelerator
    failures = {"to_host": 1, "to_gpu": 1}

    def failing(direction: str, real):  # type: ignore[no-untyped-def]
        def copy(request: Request) -> None:
            if failures[direction]:
                failures[direction] -= 1
                raise RuntimeError(f"injected: the {direction} copy failed")
            real(request)

        return copy

    monkeypatch.setattr(runner, "copy_to_host", failing("to_host", real_to_host))
    monkeypatch.setattr(runner, "copy_to_accelerator", failing("to_gpu", real_to_gpu))
    failed_before = {d: moves(engine, d, MOVE_FAILED) for d in ("to_host", "to_gpu")}
    # be-back: ordered to the host at 1 (fails: stays in HBM) and again at 2 (moved); back at 5 (fails: stays
    # on the host path) and again at 7 (moved).
    orders = MoveOrders(engine, {"be-back": {1: "host", 2: "host", 5: "gpu", 7: "gpu"}}, "fail-")
    placements: list[str] = []
    try:
        requests = submit_all(engine, "fail-")
        while engine.has_work():
            engine.step()
            placements.append(requests["be-back"].placement)
    finally:
        orders.restore()
    assert len(orders.issued) == 4
    assert {d: moves(engine, d, MOVE_FAILED) - failed_before[d] for d in failed_before} == {"to_host": 1, "to_gpu": 1}
    assert "host" in placements and placements[-1] == "gpu"
    for rid, request in requests.items():
        assert request.finish_reason == "length" and request.error is None, rid
        assert request.output_token_ids == unmoved[rid], rid
    assert_idle(engine)


def test_rows_that_arrive_together_spread_over_layers_and_workers(
    engine: Engine, unmoved: dict[str, list[int]]
) -> None:
    """Four rows moved to the host path in one plan enter layer 0 at most ceil(rows / layers) per iteration,
    so they walk the layers apart instead of as one cluster, and their tasks go to both workers."""
    pb = engine.piggyback
    assert pb is not None
    be = [rid for rid in PROMPTS if rid.startswith("be")]
    entered: list[tuple[int, int]] = []  # (rows entering, rows on the path)
    layers_apart = 0
    sent_before = [w.tasks_sent for w in pb.pool.workers]
    entering = pb.entering

    def recording_entering():  # type: ignore[no-untyped-def]
        rows = entering()
        entered.append((len(rows), len(pb.rows)))
        return rows

    pb.entering = recording_entering  # type: ignore[method-assign]
    orders: MoveOrders | None = None
    try:
        requests = submit_all(engine, "spread-")
        for _ in range(2_000):
            if orders is None and all(requests[rid].output_token_ids for rid in be):
                # All four in the same plan, once each has its first token on the accelerator.
                n = {rid: len(requests[rid].output_token_ids) for rid in be}
                orders = MoveOrders(engine, {rid: {n[rid]: "host"} for rid in be}, "spread-")
            engine.step()
            walking = {row.layer for row in pb.rows.values() if row.state in ("waiting", "ready")}
            layers_apart = max(layers_apart, len(walking))
            if not engine.has_work():
                break
    finally:
        pb.entering = entering  # type: ignore[method-assign]
        if orders is not None:
            orders.restore()
    assert orders is not None and len(orders.issued) == len(be)
    assert all(n <= -(-rows // engine.arch.num_hidden_layers) for n, rows in entered if rows)
    assert layers_apart >= 2, "the rows walked the layers as one cluster"
    assert all(w.tasks_sent > before for w, before in zip(pb.pool.workers, sent_before, strict=True))
    for rid, request in requests.items():
        assert request.output_token_ids == unmoved[rid], rid
    assert_idle(engine)
