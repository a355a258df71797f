"""SLO control: the BE allowance search, LS admission at the SLO edges, and LS headroom, against latency models
written by hand (so every expected number can be worked out on paper)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from piggyback_runtime.scheduler.latency_model import (
    LatencyModel,
    LinearAttentionModel,
    StaircaseModel,
    Step,
    prefill_chunk_load,
)
from piggyback_runtime.scheduler.slo_control import (
    REASON_TPOT,
    REASON_TTFT,
    IterationDemand,
    LSMix,
    LSRequestState,
    NewLSRequest,
    PrefillChunk,
    SLOController,
)

BASE_S = 0.010  # Dense latency of an iteration: 10 ms + 0.1 ms per row
PER_ROW_S = 1e-4
PER_PAIR_S = 1e-8  # prefill attention per (query, key) pair
PER_DECODE_TOKEN_S = 1e-6  # decode attention per context token
TOP = 1 << 16


def dense_s(rows: float) -> float:
    return BASE_S + PER_ROW_S * rows


def linear_model() -> LatencyModel:
    """f_D linear in rows (two plateaus of one point each, interpolated), f_A linear: everything on paper."""
    dense = StaircaseModel((Step(1, 1, dense_s(1)), Step(TOP, TOP, dense_s(TOP))), tile=0, tail_slope=PER_ROW_S)
    return LatencyModel(dense, LinearAttentionModel(0.0, PER_PAIR_S, PER_DECODE_TOKEN_S))


def predicted(rows: float, prefill_load: float = 0.0, decode_load: float = 0.0) -> float:
    return dense_s(rows) + PER_PAIR_S * prefill_load + PER_DECODE_TOKEN_S * decode_load


def decoding(n: int, tpot_s: float = 0.1, context: int = 1000) -> list[LSRequestState]:
    return [LSRequestState(tpot_s, None, 0, context) for _ in range(n)]


def demand_of(states: list[LSRequestState], **be: int) -> IterationDemand:
    decodes = [s for s in states if s.decoding]
    return IterationDemand(len(decodes), float(sum(s.context_len for s in decodes)), **be)


BE_PLENTY = {"be_prefill_tokens_available": 4096, "be_decode_rows_ready": 4096}


# --- the per-iteration BE allowance -----------------------------------------------------------------------------
def test_with_no_ls_work_be_takes_everything_ready_up_to_the_configured_maximum() -> None:
    controller = SLOController(linear_model(), max_be_rows_per_layer=300, max_be_prefill_tokens=256)
    allowance = controller.choose(IterationDemand(be_prefill_tokens_available=100, be_decode_rows_ready=50), [], 0.0)
    assert (allowance.be_prefill_tokens, allowance.be_rows_per_layer) == (100, 50)
    allowance = controller.choose(IterationDemand(**BE_PLENTY), [], 0.0)
    assert (allowance.be_prefill_tokens, allowance.be_rows_per_layer) == (256, 300)
    assert allowance.binding == "none" and allowance.budget_s == math.inf


def test_be_gets_the_largest_allowance_that_meets_the_tightest_tpot_with_the_margin() -> None:
    controller = SLOController(linear_model(), safety_margin=0.1, max_be_prefill_tokens=0)
    states = decoding(10, tpot_s=0.1) + decoding(5, tpot_s=0.05)  # the tightest TPOT is 50 ms
    demand = demand_of(states, be_decode_rows_ready=4096)
    allowance = controller.choose(demand, states, 0.0)
    limit = 0.05 * 0.9
    ls = predicted(15, 0.0, 15 * 1000)
    # On paper: 10 ms + 0.1 ms × (15 + k) + 15 000 context tokens × 1 µs ≤ 45 ms  ⇔  k ≤ 185
    assert allowance.be_rows_per_layer == math.floor((limit - ls) / PER_ROW_S) == 185
    assert allowance.predicted_latency_s <= limit
    assert allowance.binding == "tpot" and allowance.budget_s == 0.05


def test_with_be_rows_first_ready_be_rows_take_the_latency_budget_before_be_prefill() -> None:
    """Hybrid placement's order: a ready host-resident row gives a token for one Dense row, a prompt token 1/p of
    one later, so rows fit first and prefill takes what is left; the paper's order (the default) is the reverse."""
    states = decoding(10, tpot_s=0.1)  # limit 90 ms; the LS work alone costs 10 + 1 + 10 = 21 ms
    demand = demand_of(states, be_prefill_tokens_available=600, be_decode_rows_ready=600)
    limit = 0.1 * 0.9
    paper = SLOController(linear_model(), safety_margin=0.1, max_be_rows_per_layer=600, max_be_prefill_tokens=600)
    first = SLOController(linear_model(), safety_margin=0.1, max_be_rows_per_layer=600, max_be_prefill_tokens=600,
                          be_rows_first=True)  # fmt: skip
    by_paper, by_rows = paper.choose(demand, states, 0.0), first.choose(demand, states, 0.0)
    # Prefill first: 600 tokens cost 60 ms + 1.8 ms of attention, leaving room for 71 rows (7.2 ms).
    assert (by_paper.be_prefill_tokens, by_paper.be_rows_per_layer) == (600, 71)
    # Rows first: 600 rows cost 60 ms, leaving room for a prefill chunk of under 90.
    assert by_rows.be_rows_per_layer == 600 and 0 < by_rows.be_prefill_tokens < 90
    assert by_rows.predicted_latency_s <= limit and by_paper.predicted_latency_s <= limit
    assert predicted(10 + 600 + by_rows.be_prefill_tokens + 1, prefill_chunk_load(0, by_rows.be_prefill_tokens + 1),
                     10_000) > limit  # the prefill is the largest that fits beside the rows  # fmt: skip


def test_the_search_respects_the_bound_and_is_maximal_against_brute_force() -> None:
    rng = random.Random(5)
    model = linear_model()
    for _ in range(200):
        controller = SLOController(model, safety_margin=rng.choice([0.0, 0.1, 0.25]), max_be_prefill_tokens=512)
        tpot = rng.uniform(0.01, 0.2)
        states = decoding(rng.randint(0, 64), tpot_s=tpot, context=rng.randint(1, 4000))
        chunk_tokens = rng.choice([0, 16, 200])
        chunks = [PrefillChunk(chunk_tokens, prefill_chunk_load(0, chunk_tokens))] if chunk_tokens else []
        if chunks:
            states.append(LSRequestState(tpot, 1e9, chunk_tokens, 0))  # a prefill with a far deadline
        base = demand_of(states)
        demand = IterationDemand(
            base.ls_decode_rows,
            base.ls_decode_attention_load,
            chunks,
            be_prefill_tokens_available=rng.randint(0, 600),
            be_prefill_context_start=rng.randint(0, 2000),
            be_decode_rows_ready=rng.randint(0, 1500),
        )
        allowance = controller.choose(demand, states, 0.0)
        # The TPOT binds once an LS request decodes; a prefilling one only has its (far) TTFT deadline.
        if demand.ls_decode_rows:
            limit = tpot * (1 - controller.safety_margin)
        else:
            limit = 1e9 * (1 - controller.safety_margin) if chunks else math.inf
        ls_rows = demand.ls_decode_rows + chunk_tokens

        def latency(prefill: int, rows: int, demand: IterationDemand = demand, ls_rows: int = ls_rows) -> float:
            load = sum(c.load for c in demand.ls_prefill_chunks)
            load += prefill_chunk_load(demand.be_prefill_context_start, prefill) if prefill else 0.0
            return predicted(ls_rows + prefill + rows, load, demand.ls_decode_attention_load)

        prefill, rows = allowance.be_prefill_tokens, allowance.be_rows_per_layer
        max_prefill = min(demand.be_prefill_tokens_available, 512)
        # BE prefill comes first: the most tokens that fit with no BE decode rows at all.
        best_prefill = max((p for p in range(max_prefill + 1) if latency(p, 0) <= limit), default=0)
        assert prefill == best_prefill
        # Then the most BE decode rows that still fit next to that prefill.
        max_rows = min(demand.be_decode_rows_ready, controller.max_be_rows_per_layer)
        best_rows = max((r for r in range(max_rows + 1) if latency(prefill, r) <= limit), default=0)
        assert rows == best_rows
        if prefill or rows:
            assert allowance.predicted_latency_s <= limit * (1 + 1e-9)
        assert allowance.predicted_latency_s == pytest.approx(latency(prefill, rows)), (prefill, rows, demand)


def test_ls_work_goes_first_then_be_prefill_then_be_decode_rows() -> None:
    controller = SLOController(linear_model(), safety_margin=0.0)
    states = decoding(10, tpot_s=0.1)  # budget 100 ms; LS decodes alone: 10 ms + 1 ms + 10 ms = 21 ms
    # LS prefill of 300 tokens takes 30 ms more (plus its attention): LS is never cut, BE fits around it.
    chunk = PrefillChunk(300, prefill_chunk_load(0, 300))
    states.append(LSRequestState(0.1, 1e9, 300, 0))
    demand = IterationDemand(10, 10_000.0, [chunk], be_prefill_tokens_available=400, be_decode_rows_ready=1000)
    allowance = controller.choose(demand, states, 0.0)
    ls_s = predicted(310, chunk.load, 10_000)
    assert ls_s < 0.1
    assert allowance.be_prefill_tokens > 0  # BE prefill is served before any BE decode row
    prefill_only = predicted(310 + allowance.be_prefill_tokens, chunk.load + prefill_chunk_load(0, 400), 10_000)
    if allowance.be_prefill_tokens < 400:
        assert allowance.be_rows_per_layer == 0  # no decode row gets in while BE prefill wanted more
    else:
        assert prefill_only <= 0.1 and allowance.be_rows_per_layer == math.floor((0.1 - prefill_only) / PER_ROW_S)


def test_a_tighter_slo_or_more_ls_load_never_grants_more_be() -> None:
    model = linear_model()
    controller = SLOController(model, safety_margin=0.1)
    previous = math.inf
    for tpot in (0.2, 0.1, 0.08, 0.05, 0.03, 0.02):
        states = decoding(20, tpot_s=tpot)
        rows = controller.choose(demand_of(states, **BE_PLENTY), states, 0.0)
        assert rows.be_prefill_tokens + rows.be_rows_per_layer <= previous
        previous = rows.be_prefill_tokens + rows.be_rows_per_layer
    previous = math.inf
    for n in (1, 10, 50, 100, 200):
        states = decoding(n, tpot_s=0.05)
        rows = controller.choose(demand_of(states, **BE_PLENTY), states, 0.0)
        assert rows.be_prefill_tokens + rows.be_rows_per_layer <= previous
        previous = rows.be_prefill_tokens + rows.be_rows_per_layer


def test_when_ls_alone_misses_the_slo_be_gets_nothing() -> None:
    controller = SLOController(linear_model(), safety_margin=0.1)
    states = decoding(8, tpot_s=0.010)  # 10 ms TPOT: the 10 ms fixed cost alone is over 9 ms
    allowance = controller.choose(demand_of(states, **BE_PLENTY), states, 0.0)
    assert (allowance.be_prefill_tokens, allowance.be_rows_per_layer) == (0, 0)
    assert allowance.predicted_latency_s == pytest.approx(predicted(8, 0.0, 8000))  # LS itself still runs


def test_the_search_follows_the_staircase_up_to_the_edge_of_a_step() -> None:
    # GPU-like Dense: 20 ms up to 128 rows, 30 ms up to 256, 40 ms up to 384 (tile 128).
    dense = StaircaseModel((Step(1, 128, 0.020), Step(136, 256, 0.030), Step(264, 384, 0.040)), tile=128)
    controller = SLOController(LatencyModel(dense, LinearAttentionModel(0, 0, 0)), safety_margin=0.0)
    states = decoding(100, tpot_s=0.035)
    allowance = controller.choose(demand_of(states, be_decode_rows_ready=1000), states, 0.0)
    assert allowance.be_rows_per_layer == 156  # 100 LS + 156 BE = 256 rows, the last row of the 30 ms step


def test_every_sampling_row_pays_for_its_logits() -> None:
    inner = linear_model()
    logits = StaircaseModel((Step(1, 1, PER_ROW_S), Step(TOP, TOP, TOP * PER_ROW_S)), tile=0, tail_slope=PER_ROW_S)
    controller = SLOController(LatencyModel(inner.dense, inner.attention, logits), safety_margin=0.0)
    states = decoding(10, tpot_s=0.1005)
    allowance = controller.choose(demand_of(states, be_decode_rows_ready=4096), states, 0.0)
    # LS: 10 ms + 1 ms Dense + 10 ms attention + 1 ms logits = 22 ms; a BE row: 0.1 ms Dense + 0.1 ms logits.
    assert allowance.be_rows_per_layer == math.floor((0.1005 - 0.022) / (2 * PER_ROW_S)) == 392


def test_queued_ls_prefills_set_a_ttft_budget_in_first_come_first_served_order() -> None:
    controller = SLOController(linear_model(), safety_margin=0.0, ls_chunk_tokens=100)
    now = 10.0
    states = [
        LSRequestState(1.0, now + 2.0, 150, 0),  # needs ceil(150/100) = 2 iterations: budget 2.0 / 2 = 1.0 s
        LSRequestState(1.0, now + 0.9, 100, 0),  # behind it: ceil(250/100) = 3 iterations: 0.9 / 3 = 0.3 s
        LSRequestState(1.0, now - 1.0, 500, 0),  # past its deadline: a miss whatever BE does, left out
    ]
    allowance = controller.choose(IterationDemand(**BE_PLENTY), states, now)
    assert allowance.budget_s == pytest.approx(0.3) and allowance.binding == "ttft"
    assert allowance.predicted_latency_s <= 0.3


def test_the_decision_costs_a_logarithmic_number_of_predictions_whatever_the_request_count() -> None:
    calls = 0
    inner = linear_model()

    class Counting(LatencyModel):
        def predict_parts(self, *args: float) -> float:  # type: ignore[override]
            nonlocal calls
            calls += 1
            return inner.predict_parts(*args)

    model = Counting(inner.dense, inner.attention)
    controller = SLOController(model, max_be_rows_per_layer=1 << 20, max_be_prefill_tokens=1 << 20)
    states = decoding(512, tpot_s=0.2)
    controller.choose(demand_of(states, be_prefill_tokens_available=1 << 20, be_decode_rows_ready=1 << 20), states, 0)
    assert calls <= 2 * (20 + 3)  # two binary searches over 2^20 candidates, none per request


# --- admission ----------------------------------------------------------------------------------------------------
def _new(prompt: int = 100, ttft_s: float = 1.0, tpot_s: float = 1.0, arrival_s: float = 0.0) -> NewLSRequest:
    return NewLSRequest(prompt_tokens=prompt, ttft_s=ttft_s, tpot_s=tpot_s, arrival_s=arrival_s)


def test_admission_exactly_at_the_ttft_slo_is_admitted_and_just_over_is_rejected() -> None:
    controller = SLOController(linear_model(), ls_chunk_tokens=512)
    running = decoding(4, tpot_s=1.0)
    # On paper: the 100-token prompt fits one chunk, next to 4 decodes: one iteration of
    # 10 ms + 0.1 ms × 104 + 5050 pairs × 10 ns + 4000 context tokens × 1 µs, after 50 ms already waited.
    ttft = 0.05 + dense_s(104) + PER_PAIR_S * 5050 + PER_DECODE_TOKEN_S * 4000
    at = controller.admit_ls(_new(ttft_s=ttft, arrival_s=0.0), running, demand_of(running), now_s=0.05)
    assert at.admitted and at.reason == "Admitted" and at.predicted_ttft_s == pytest.approx(ttft)
    over = controller.admit_ls(_new(ttft_s=ttft * (1 - 1e-6)), running, demand_of(running), now_s=0.05)
    assert not over.admitted and over.reason == REASON_TTFT == "TTFTUnattainable"
    assert "TTFT" in over.message and over.retry_after_s >= 1


def test_a_long_ls_prefill_queue_makes_ttft_unattainable() -> None:
    controller = SLOController(linear_model(), ls_chunk_tokens=100)
    queued = [LSRequestState(1.0, 100.0, 1000, 0)]  # 1000 prompt tokens ahead: 10 iterations before ours
    decision = controller.admit_ls(_new(prompt=100, ttft_s=0.2), queued, IterationDemand(), now_s=0.0)
    assert not decision.admitted and decision.reason == REASON_TTFT
    assert decision.predicted_ttft_s > 11 * dense_s(100)


def test_admission_exactly_at_a_running_requests_tpot_is_admitted_and_just_over_is_rejected() -> None:
    controller = SLOController(linear_model(), ls_chunk_tokens=512)
    # While the new 100-token prompt prefills, each iteration holds 4 decodes + its chunk: that is the
    # slowest iteration the running requests will see (once it decodes, 5 decode rows are cheaper).
    slowest = dense_s(104) + PER_PAIR_S * 5050 + PER_DECODE_TOKEN_S * 4000
    at = decoding(4, tpot_s=slowest)
    assert controller.admit_ls(_new(), at, demand_of(at), 0.0).admitted
    over = decoding(3, tpot_s=1.0) + decoding(1, tpot_s=slowest * (1 - 1e-6))
    decision = controller.admit_ls(_new(), over, demand_of(over), 0.0)
    assert not decision.admitted and decision.reason == REASON_TPOT == "TPOTUnattainable"
    assert "TPOT" in decision.message


def test_the_new_requests_own_tpot_counts_once_it_decodes() -> None:
    controller = SLOController(linear_model(), ls_chunk_tokens=512)
    running = decoding(4, tpot_s=1.0)
    own_decode = dense_s(5) + PER_DECODE_TOKEN_S * (4000 + 101)  # 5 decode rows; its context is 100 + 1
    assert controller.admit_ls(_new(tpot_s=own_decode), running, demand_of(running), 0.0).admitted
    rejected = controller.admit_ls(_new(tpot_s=own_decode * (1 - 1e-6)), running, demand_of(running), 0.0)
    assert rejected.reason == REASON_TPOT


def test_requests_queued_ahead_count_as_decode_rows_so_a_burst_is_not_admitted_past_the_tpot() -> None:
    """A burst arrives at an idle engine: each admitted request queues its prompt, and all of them decode
    together a moment later. Admission must see the queued ones as the decode rows they are about to be;
    against today's decode rows alone (none) every request of any burst would pass."""
    controller = SLOController(linear_model(), ls_chunk_tokens=4096)
    tpot_s = dense_s(21) + PER_DECODE_TOKEN_S * 21 * 101  # 21 decode rows of context 101 fit exactly
    held: list[LSRequestState] = []
    admitted = 0
    for _ in range(40):
        decision = controller.admit_ls(_new(prompt=100, tpot_s=tpot_s), held, IterationDemand(), now_s=0.0)
        if decision.admitted:
            admitted += 1
            held.append(LSRequestState(tpot_s, 10.0, 100, 100))  # queued: its whole prompt still to prefill
    assert admitted == 21
    rejected = controller.admit_ls(_new(prompt=100, tpot_s=tpot_s), held, IterationDemand(), now_s=0.0)
    assert rejected.reason == REASON_TPOT and "(22 LS decode rows)" in rejected.message  # the 21 and its own


# --- headroom -------------------------------------------------------------------------------------------------------
MIX = LSMix(avg_prompt_tokens=200, avg_output_tokens=100, tpot_s=0.1, ttft_s=2.0)


def test_headroom_is_the_sustainable_rate_less_the_rate_admitted() -> None:
    controller = SLOController(linear_model(), safety_margin=0.1, ls_chunk_tokens=2048)
    sustainable = controller.sustainable_ls_rps(MIX)
    assert sustainable > 0
    headrooms = [controller.headroom_rps([], MIX, 0.0, admitted_rps=share * sustainable) for share in (0, 0.5, 1, 2)]
    assert headrooms == pytest.approx([sustainable, sustainable / 2, 0.0, 0.0])
    # LS work held now that leaves a mix request no room: admission refuses one now, the gauge says 0.
    assert controller.headroom_rps(decoding(10, tpot_s=0.1), MIX, 0.0) > 0
    assert controller.headroom_rps(decoding(900, tpot_s=0.1), MIX, 0.0) == 0.0


def test_the_sustainable_rate_stops_short_of_the_prefill_throughput_by_the_queue_the_ttft_allows() -> None:
    """Prefill-bound LS (long prompts, short outputs): at a rate near the prefill throughput the Poisson queue
    grows without bound, so the sustainable rate stays below it, the more so the tighter the TTFT."""
    controller = SLOController(linear_model(), safety_margin=0.1, ls_chunk_tokens=512)
    rates = [controller.sustainable_ls_rps(LSMix(400, 4, tpot_s=1.0, ttft_s=ttft)) for ttft in (0.3, 0.5, 2.0, 100.0)]
    assert all(a < b for a, b in itertools.pairwise(rates)), rates
    full_chunk = controller.predict_ls_arrival(0, 0, 0, 4096, 400)  # a queue long enough to fill every chunk
    throughput_rps = full_chunk.prefill_tokens_per_iteration / (400 * full_chunk.prefill_iteration_s)
    assert rates[-1] < throughput_rps


def test_headroom_is_zero_when_the_slos_are_already_unattainable() -> None:
    controller = SLOController(linear_model(), safety_margin=0.1, ls_chunk_tokens=4096)
    assert controller.headroom_rps(decoding(900, tpot_s=0.1), MIX, 0.0) == 0.0  # LS alone: 100 ms > 90 ms
    tight = LSMix(avg_prompt_tokens=200, avg_output_tokens=100, tpot_s=0.009, ttft_s=2.0)
    assert controller.headroom_rps([], tight, 0.0) == 0.0  # the fixed 10 ms alone exceeds the TPOT
    # A queue of LS prompts so long that a request joining it now misses its TTFT: admission refuses it.
    queued = [LSRequestState(0.1, 100.0, 4096 * 50, 0)]
    assert controller.headroom_rps(queued, MIX, 0.0) == 0.0
