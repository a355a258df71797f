"""Attention Piggybacking: BE attention on CPU worker processes against host-DRAM KV, merged layer by layer.

Shown here without timing: exactness against transformers, the engine never waiting for the CPU (tasks are
held until released), resources freed on finish and cancel, and a killed worker failing only its own BE
requests while LS requests and later BE requests carry on.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.engine import Engine
from piggyback_runtime.request import Request
from tests.runtime.helpers import (
    assert_matches_reference,
    greedy,
    hf_reference,
    make_request,
    reference_greedy,
    run_to_completion,
    tiny_config,
)

PROMPTS = [[1, *range(30, 30 + n)] for n in (4, 19, 33, 2, 11, 7)]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine(tiny_config(policy="piggyback", max_num_batched_tokens=16,
                                piggyback={"max_be_rows_per_layer": 3}))  # fmt: skip
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def references(engine: Engine) -> list[tuple[list[int], list[torch.Tensor]]]:
    hf = hf_reference(engine.arch, engine.model.state_dict())
    return [reference_greedy(hf, prompt, MAX_TOKENS) for prompt in PROMPTS]


def _submit(engine: Engine, classes: str, tag: str) -> list[Request]:
    requests = [make_request(f"{tag}{i}", p, greedy(MAX_TOKENS), "LS" if c == "L" else "BE")
                for i, (p, c) in enumerate(zip(PROMPTS, classes, strict=True))]  # fmt: skip
    for request in requests:
        engine.add_request(request)
    return requests


def _assert_idle(engine: Engine) -> None:
    pb = engine.piggyback
    assert pb is not None
    assert not engine.has_work()
    assert pb.host_kv.allocator.num_used == 0, "host KV blocks leaked"
    assert not pb.residuals, "residual store entries leaked"
    host = pb.host_kv
    assert not pb.rows and not pb.row_by_slot and len(host.free_slots) == len(host.generation), "slots leaked"
    assert engine.allocator.num_used == 0, "accelerator KV blocks leaked"


def test_be_outputs_match_transformers_and_ls_outputs_are_unchanged_by_be(engine: Engine, references) -> None:
    mixed = _submit(engine, "BLBLBB", "mix")
    run_to_completion(engine)
    for request, (ref, logits) in zip(mixed, references, strict=True):
        assert request.finish_reason == "length", request.error
        assert_matches_reference(request.output_token_ids, ref, logits)
    assert engine.metrics.be_rows_merged._sum.get() > 0, "BE rows never went through the piggyback merge"
    _assert_idle(engine)
    # The same LS requests with no BE load give the same tokens.
    ls_alone = [make_request(f"alone{i}", PROMPTS[i], greedy(MAX_TOKENS)) for i in (1, 3)]
    for request in ls_alone:
        engine.add_request(request)
    run_to_completion(engine)
    assert [r.output_token_ids for r in ls_alone] == [mixed[1].output_token_ids, mixed[3].output_token_ids]


def test_engine_never_waits_for_cpu_attention(engine: Engine, references) -> None:
    pb = engine.piggyback
    assert pb is not None
    waited_before = engine.metrics.cpu_attention_wait_seconds._value.get()
    pb.hold()  # workers take no task until released
    try:
        requests = _submit(engine, "BLBLBB", "held")
        ls = [r for r in requests if r.is_ls]
        be = [r for r in requests if not r.is_ls]
        iterations = 0
        while any(r.finish_reason is None for r in ls):
            engine.step()
            iterations += 1
            assert iterations < 2_000, "LS requests did not finish while BE attention was held"
        # LS done, BE stuck after their first token (prefill and first sample run on the accelerator).
        assert all(r.finish_reason == "length" for r in ls)
        assert all(r.finish_reason is None and len(r.output_token_ids) == 1 for r in be)
        assert engine.metrics.cpu_attention_queue_depth._value.get() > 0
        # The engine keeps iterating (and returns) with nothing but held BE work.
        for _ in range(5):
            engine.step()
        assert all(r.finish_reason is None for r in be)
    finally:
        pb.release_hold()
    run_to_completion(engine)
    for request, (ref, logits) in zip(requests, references, strict=True):
        assert_matches_reference(request.output_token_ids, ref, logits)
    assert engine.metrics.cpu_attention_wait_seconds._value.get() == waited_before == 0
    _assert_idle(engine)


def test_cancelled_be_requests_free_host_kv_queue_entries_and_residuals(engine: Engine) -> None:
    pb = engine.piggyback
    assert pb is not None
    pb.hold()
    try:
        requests = _submit(engine, "BBBBBB", "cancel")
        for _ in range(200):
            engine.step()
            if all(r.request_id in pb.rows and pb.rows[r.request_id].state == "waiting" for r in requests):
                break
        assert pb.residuals and pb.host_kv.allocator.num_used > 0
        for request in requests:
            engine.abort(request.request_id)
        assert not pb.residuals
    finally:
        pb.release_hold()
    # Their in-flight tasks still report; only then are the slots and blocks reused.
    run_to_completion(engine)
    assert all(r.finish_reason == "abort" for r in requests)
    _assert_idle(engine)


def test_be_requests_wait_for_host_kv_and_run_when_it_frees() -> None:
    # 3 host blocks of 8 tokens: room for one request of 20 tokens (4 prompt + 16 output) at a time.
    engine = Engine(tiny_config(policy="piggyback", piggyback={"num_host_kv_blocks": 3}))
    try:
        requests = [make_request(f"w{i}", [1, 5, 6, 7], greedy(MAX_TOKENS), "BE") for i in range(3)]
        for request in requests:
            engine.add_request(request)
        assert len(engine.host_kv_waiting) == 2
        run_to_completion(engine)
        assert all(r.finish_reason == "length" for r in requests)
        assert len({tuple(r.output_token_ids) for r in requests}) == 1
        with pytest.raises(ValueError, match="host KV cache"):
            engine.add_request(make_request("too-long", [1] * 40, greedy(20), "BE"))
        _assert_idle(engine)
    finally:
        engine.close()


def test_be_outputs_longer_than_the_accelerator_kv_cache_fit_in_host_kv() -> None:
    # 16 accelerator blocks of 4 tokens hold 64 tokens: enough for the prompt's prefill, not for 100 outputs.
    engine = Engine(tiny_config(policy="piggyback", num_kv_blocks=16))
    try:
        request = make_request("long", [1, *range(40, 49)], greedy(100), "BE")
        engine.add_request(request)
        run_to_completion(engine)
        assert request.finish_reason == "length" and len(request.output_token_ids) == 100
        with pytest.raises(ValueError, match="KV blocks"):  # an LS request of that length stays refused
            engine.add_request(make_request("ls-long", [1, *range(40, 49)], greedy(100)))
        _assert_idle(engine)
    finally:
        engine.close()


def test_a_killed_worker_fails_its_be_requests_and_nothing_else() -> None:
    engine = Engine(tiny_config(policy="piggyback"))
    pb = engine.piggyback
    assert pb is not None
    try:
        pb.hold()
        doomed = _submit(engine, "BLBLBB", "doomed")
        ls = [r for r in doomed if r.is_ls]
        be = [r for r in doomed if not r.is_ls]
        for _ in range(200):
            engine.step()
            if all(r.request_id in pb.rows for r in be):
                break
        pid = pb.pool.pids()[0]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        pb.release_hold()
        outputs = []
        for _ in range(5_000):
            outputs += engine.step()
            if not engine.has_work():
                break
        failed = {o.request_id: o for o in outputs if o.finished and o.finish_reason == "error"}
        assert set(failed) == {r.request_id for r in be}
        assert all("worker holding this request died" in (o.error or "") for o in failed.values())
        assert all(r.finish_reason == "length" for r in ls)
        assert engine.metrics.cpu_worker_restarts._value.get() == 1
        assert engine.metrics.requests.labels("batch", "BE", m.OUTCOME_FAILED)._value.get() == len(be)
        _assert_idle(engine)
        # The replacement worker serves new BE requests.
        later = [make_request(f"later{i}", p, greedy(8), "BE") for i, p in enumerate(PROMPTS[:3])]
        for request in later:
            engine.add_request(request)
        run_to_completion(engine)
        assert all(r.finish_reason == "length" and r.error is None for r in later)
        assert pb.pool.pids()[0] != pid
    finally:
        engine.close()
