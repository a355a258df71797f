"""The default policy's decisions in the planner: hybrid BE placement and its moves, the SLO-sized token budget,
the headroom-admit baseline, and the settings that cannot hold (refused with the field named)."""

from __future__ import annotations

import pytest

from piggyback_runtime.config import ConfigError, EngineConfig, RuntimeConfig
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.request import Request, SamplingParams, SLOTarget
from piggyback_runtime.scheduler.batching import IterationPlan
from piggyback_runtime.scheduler.latency_model import LatencyModel, LinearAttentionModel, StaircaseModel, Step
from piggyback_runtime.scheduler.outputs import IterationOutputs, TokenEvent, sampling_requests
from piggyback_runtime.scheduler.planner import HOST_FEED_SHARE, HOST_PACE_MIN_ROWS, Planner, iteration_shape
from tests.runtime.planner_fakes import Clock, staircase_model


def _config(policy: str = "hybrid", **engine: object) -> RuntimeConfig:
    return RuntimeConfig.from_dict({
        "model": {"uri": "synthetic://tiny-llama"},
        "services": [{"name": "chat", "class": "LS", "slo": {"ttft_ms": 1000, "tpot_ms": 100}},
                     {"name": "batch", "class": "BE"}],
        "engine": {"policy": policy, "block_size": 4, "max_num_batched_tokens": 32, "max_num_seqs": 32,
                   "hbm_reserve_horizon_s": 0.0, **engine},
        "piggyback": {"max_be_rows_per_layer": 8, "max_be_requests": 8},
    })  # fmt: skip


def _request(rid: str, prompt: int, arrival_s: float, max_tokens: int = 8, ls: bool = False) -> Request:
    service, cls = ("chat", "LS") if ls else ("batch", "BE")
    return Request(rid, service, cls, list(range(prompt)), SamplingParams(max_tokens=max_tokens),  # type: ignore[arg-type]
                   arrival_s=arrival_s)


def _planner(num_kv_blocks: int, policy: str = "hybrid", **engine: object) -> tuple[Planner, Clock, HostKV]:
    clock = Clock()
    host = HostKV(num_blocks=64, block_size=16, max_requests=8)
    return Planner(_config(policy, **engine), num_kv_blocks, host, staircase_model(), clock, kv_moves=True), clock, host


def _ran(planner: Planner, clock: Clock, plan: IterationPlan, seconds: float = 0.01) -> list[TokenEvent]:
    started = clock.now
    clock.now += seconds
    outputs = IterationOutputs(started, [1] * len(sampling_requests(plan)), [], 0, num_layers=2)
    return planner.update(plan, outputs, clock.now)


def _add(planner: Planner, *requests: Request) -> None:
    for request in requests:
        assert planner.admission(request) is None
        planner.add(request)


def _prefill(planner: Planner, clock: Clock, until: Request) -> None:
    for _ in range(20):
        plan = planner.schedule()
        _ran(planner, clock, plan)
        if until.output_token_ids:
            return
    raise AssertionError(f"{until.request_id} never finished its prefill")


def test_hybrid_is_the_default_policy() -> None:
    assert EngineConfig().policy == "hybrid"
    assert RuntimeConfig.from_dict({"model": {"uri": "synthetic://tiny-llama"},
                                    "services": [{"name": "b", "class": "BE"}]}).engine.policy == "hybrid"  # fmt: skip


def test_a_be_request_decodes_in_hbm_while_hbm_is_spare() -> None:
    planner, clock, host = _planner(num_kv_blocks=64)  # 256 tokens: room for prompt + max_tokens
    be = _request("b0", 20, 0.0, max_tokens=8)
    _add(planner, be)
    _prefill(planner, clock, be)
    plan = planner.schedule()
    assert be.placement == "gpu" and not plan.be_to_host and not host.slot_of
    assert [c.request for c in plan.decodes] == [be]  # its decode runs on the accelerator


def test_a_be_request_whose_prefill_ends_without_spare_hbm_moves_to_host_kv_with_the_next_plan() -> None:
    planner, clock, host = _planner(num_kv_blocks=64)
    first, second = _request("b0", 60, 0.0, max_tokens=60), _request("b1", 60, 1.0, max_tokens=60)
    _add(planner, first, second)
    _prefill(planner, clock, first)
    _prefill(planner, clock, second)
    # 30 blocks each at full length, of 64: the first decodes in HBM; the second does not fit beside it and a
    # token budget of prompt room, so the next plan carries its move (its host KV is reserved at full length).
    assert first.placement == "gpu"
    plan = planner.schedule()
    assert plan.be_to_host == [second] and second not in [c.request for c in plan.chunks]
    assert len(host.blocks_of("b1")) == host.allocator.blocks_for_tokens(120)
    held_before = planner.allocator.blocks_of("b1")
    assert held_before  # its accelerator blocks stay while the copy runs during the plan
    _ran(planner, clock, plan)
    assert second.placement == "host" and not planner.allocator.blocks_of("b1")
    assert planner.on_host_path(second) and second.num_computed_tokens == second.num_tokens - 1


def test_when_ls_needs_the_room_the_newest_hbm_resident_be_requests_move_to_host_first() -> None:
    planner, clock, host = _planner(num_kv_blocks=128)
    old, new = _request("b0", 40, 0.0, max_tokens=20), _request("b1", 40, 5.0, max_tokens=20)
    _add(planner, old, new)
    _prefill(planner, clock, old)
    _prefill(planner, clock, new)
    planner.schedule()  # both decode in HBM: 15 blocks each at full length, 128 blocks
    assert old.placement == new.placement == "gpu"
    # LS arrives with a long prompt: the BE share shrinks below the two BE requests' needs.
    _add(planner, _request("c0", 400, clock.now, max_tokens=10, ls=True))
    plan = planner.schedule()
    assert plan.be_to_host == [new] and old not in plan.be_to_host
    _ran(planner, clock, plan)
    assert new.placement == "host" and old.placement == "gpu" and "b1" in host.slot_of


def test_host_resident_be_requests_move_back_to_hbm_when_it_frees_up() -> None:
    planner, clock, _host = _planner(num_kv_blocks=64)
    first, second = _request("b0", 60, 0.0, max_tokens=60), _request("b1", 60, 1.0, max_tokens=60)
    _add(planner, first, second)
    _prefill(planner, clock, first)
    _prefill(planner, clock, second)
    _ran(planner, clock, planner.schedule())  # b1 moves to host
    assert second.placement == "host"
    planner.finish(first, "stop")  # HBM frees up
    plan = planner.schedule(host_rows_idle=[second])
    assert plan.be_to_gpu == [second] and second.placement == "gpu"
    assert second not in [c.request for c in plan.chunks]  # the copy runs during this plan
    assert planner.allocator.blocks_of("b1") and second in planner.scheduler.running
    _ran(planner, clock, plan)
    assert [c.request for c in planner.schedule().decodes] == [second]


def test_hybrid_placement_off_puts_every_be_request_on_the_host_path() -> None:
    planner, _clock, _host = _planner(num_kv_blocks=64, hybrid_placement=False)
    be = _request("b0", 20, 0.0, max_tokens=8)
    _add(planner, be)
    assert be.placement == "host" and planner.on_host_path(be)
    # So does a caller that cannot execute KV moves (kv_moves=False: the engine until it does).
    planner = Planner(_config(), 64, HostKV(64, 16, 8), staircase_model(), Clock())
    be = _request("b1", 20, 0.0, max_tokens=8)
    _add(planner, be)
    assert not planner.hybrid and be.placement == "host"


def test_the_token_budget_is_the_largest_chunk_that_keeps_the_running_ls_tpot() -> None:
    # 1 ms per Dense row; TPOT 100 ms less the 10 % margin: 90 rows fit, under the 512-token upper bound.
    planner, clock, _ = _planner(num_kv_blocks=256, max_num_batched_tokens=512)
    ls = _request("c0", 8, 0.0, max_tokens=50, ls=True)
    _add(planner, ls)
    assert planner.schedule().token_budget == 512  # no LS decodes yet: the upper bound
    plan = planner.schedule()
    _ran(planner, clock, plan)
    long_prompt = _request("c1", 400, clock.now, max_tokens=5, ls=True)
    long_prompt.slo = SLOTarget(ttft_s=10.0, tpot_s=0.1)
    planner.add(long_prompt)
    plan = planner.schedule()
    assert 80 <= plan.token_budget <= 90 and plan.num_tokens <= plan.token_budget
    model = planner.slo.latency_model  # type: ignore[union-attr]
    assert model.predict_parts(plan.num_tokens, 0.0, 0.0, 2) <= 0.09 * 1.01


def _slo_planner(max_tokens_bound: int, model: LatencyModel) -> tuple[Planner, Clock]:
    clock = Clock()
    config = _config("hybrid", max_num_batched_tokens=max_tokens_bound)
    return Planner(config, 512, HostKV(64, 16, 8), model, clock, kv_moves=True), clock


def _run_as_predicted(planner: Planner, clock: Clock, until: Request) -> list[float]:
    """Iterations on the virtual clock, each taking what the planner's own model predicts for the plan that
    ran, until `until` is done; returns each iteration's predicted latency."""
    model = planner.slo.latency_model  # type: ignore[union-attr]
    latencies = []
    for _ in range(500):
        plan = planner.schedule()
        seconds = model.predict(iteration_shape(plan, 0.0, len(sampling_requests(plan)), model))
        latencies.append(seconds)
        _ran(planner, clock, plan, seconds)
        if until.finish_reason is not None:
            return latencies
    raise AssertionError(f"{until.request_id} never finished")


def test_admission_predicts_with_the_slo_sized_budget_not_its_upper_bound() -> None:
    # A 2048-token bound (1 ms a Dense row): a full chunk would take 2 s, far over the 100 ms TPOT of the LS
    # request decoding, but the planner never runs one: the SLO-sized budget keeps each iteration within 90 ms.
    # Admission predicts with that budget, so a 400-token prompt (5 such iterations, 0.45 s against a 1 s TTFT)
    # is admitted, and on the clock it meets its TTFT and the decoding request keeps its TPOT.
    planner, clock = _slo_planner(2048, staircase_model())
    decoding = _request("c0", 8, 0.0, max_tokens=60, ls=True)
    _add(planner, decoding)
    _ran(planner, clock, planner.schedule(), 0.01)
    long_prompt = _request("c1", 400, clock.now, max_tokens=5, ls=True)
    assert planner.admission(long_prompt) is None
    planner.add(long_prompt)
    latencies = _run_as_predicted(planner, clock, long_prompt)
    assert long_prompt.first_token_s is not None and long_prompt.first_token_s - long_prompt.arrival_s <= 1.0
    assert max(latencies) <= 0.1 * 0.9 * 1.001


def test_the_slo_budget_costs_each_ls_chunk_at_its_own_position() -> None:
    # Prefill attention dear (1e-6 s a unit of load): the chunk that ends a 600-token prompt attends to ~500
    # earlier tokens and costs several times one from position 0. Every planned iteration, the late chunks
    # included, keeps the decoding request's TPOT less the margin.
    steps = tuple(Step(x, x, x * 1e-3) for x in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
    model = LatencyModel(StaircaseModel(steps, 0, 1e-3), LinearAttentionModel(0.0, 1e-6, 1e-7))
    planner, clock = _slo_planner(2048, model)
    decoding = _request("c0", 8, 0.0, max_tokens=200, ls=True)
    _add(planner, decoding)
    _ran(planner, clock, planner.schedule(), 0.01)
    long_prompt = _request("c1", 600, clock.now, max_tokens=2, ls=True)
    long_prompt.slo = SLOTarget(ttft_s=30.0, tpot_s=0.1)
    planner.add(long_prompt)
    latencies = _run_as_predicted(planner, clock, long_prompt)
    assert max(latencies) <= 0.1 * 0.9 * 1.001


def test_the_slo_budget_never_drops_below_the_ls_decode_rows_nor_min_num_batched_tokens() -> None:
    planner, clock, _ = _planner(num_kv_blocks=256, max_num_batched_tokens=512, min_num_batched_tokens=120)
    _add(planner, _request("c0", 8, 0.0, max_tokens=50, ls=True))
    _ran(planner, clock, planner.schedule())
    assert planner.schedule().token_budget == 120


def test_the_slo_budget_off_keeps_the_configured_budget() -> None:
    planner, clock, _ = _planner(num_kv_blocks=256, max_num_batched_tokens=512, slo_token_budget=False)
    _add(planner, _request("c0", 8, 0.0, max_tokens=50, ls=True))
    _ran(planner, clock, planner.schedule())
    assert planner.schedule().token_budget == 512


def test_headroom_admit_is_headroom_with_the_planners_ls_admission() -> None:
    planner, _clock, _ = _planner(num_kv_blocks=100, policy="headroom-admit")
    assert planner.slo is not None and planner.scheduler.be_kv_block_limit == 30  # headroom_be_kv_share 0.3
    be = _request("b0", 20, 0.0)
    _add(planner, be)
    assert be.placement == "gpu" and not planner.on_host_path(be)
    # A prompt whose prefill alone (1 ms a token, 32 per iteration) cannot make the 1 s TTFT is refused.
    refused = planner.admission(_request("c0", 40_000, 0.0, ls=True))
    assert refused is not None and refused.reason == "TTFTUnattainable"
    plain, _, _ = _planner(num_kv_blocks=100, policy="headroom")
    assert plain.admission(_request("c1", 40_000, 0.0, ls=True)) is None


def test_the_planner_refuses_an_hbm_reserve_the_cache_it_is_given_cannot_exceed() -> None:
    # The cache sized from memory is known only here (tests/runtime/test_settings_that_cannot_hold.py has the rest).
    with pytest.raises(ConfigError, match=r"engine\.hbm_reserve_min_tokens.*256 tokens"):
        _planner(num_kv_blocks=64, hbm_reserve_min_tokens=256)  # the whole 256-token KV cache
    _planner(num_kv_blocks=64, hbm_reserve_min_tokens=255)


def test_a_forecast_beyond_the_whole_cache_still_lets_be_prefill_and_go_to_host() -> None:
    """A burst of LS arrivals can forecast more LS KV within the horizon than the cache holds. The reserve
    then keeps BE decodes out of HBM (they go to host KV), but never the BE prefill itself: its KV is there
    only until the next plan moves it, and LS preempts BE as under `priority` if it comes."""
    planner, clock, host = _planner(num_kv_blocks=64, hbm_reserve_horizon_s=60.0)
    burst = [_request(f"c{i}", 20, i * 0.01, max_tokens=4, ls=True) for i in range(10)]
    for ls in burst:
        clock.now = ls.arrival_s
        _add(planner, ls)
    for ls in burst:
        planner.finish(ls, "stop")  # the burst is over; its rate (~100/s × 60 s × 24 tokens) is what it forecasts
    assert planner.hbm_reserve_blocks() > 64
    be = _request("b0", 20, clock.now, max_tokens=8)
    _add(planner, be)
    _prefill(planner, clock, be)  # before: no HBM block for BE at all, and the prefill never ran
    plan = planner.schedule()
    assert plan.be_to_host == [be] and "b0" in host.slot_of
    _ran(planner, clock, plan)
    assert be.placement == "host" and not planner.allocator.blocks_of("b0")


def _hbm_decode_room_full_with_a_prompt_waiting(host_slots: int = 8) -> tuple[Planner, Clock, HostKV, Request]:
    """b0 decodes in HBM (30 of 64 blocks at full length); b1's 60-token prompt would not fit beside it."""
    clock = Clock()
    host = HostKV(num_blocks=256, block_size=16, max_requests=host_slots)
    planner = Planner(_config(), 64, host, staircase_model(), clock, kv_moves=True)
    first = _request("b0", 60, 0.0, max_tokens=60)
    _add(planner, first)
    _prefill(planner, clock, first)
    second = _request("b1", 60, clock.now, max_tokens=60)
    _add(planner, second)
    assert planner._hbm_decode_room_full()
    return planner, clock, host, second


def _be_prefill_tokens(plan: IterationPlan) -> int:
    return sum(c.num_tokens for c in plan.prefills if not c.request.is_ls)


def test_while_the_host_path_keeps_pace_be_prompts_bound_for_it_fill_the_token_budget() -> None:
    """HBM decode room full: the next BE prompt will decode on the host. With few host rows (the CPU path carries
    them at about a token an iteration) the budget left after b0's decode goes to that prompt (before: a fixed
    quarter of the budget, so the host tier was barely fed and hybrid ran as HBM-only)."""
    planner, _clock, _host, second = _hbm_decode_room_full_with_a_prompt_waiting()
    assert planner.host_path_keeps_pace()
    plan = planner.schedule()
    assert _be_prefill_tokens(plan) == 32 - 1  # the budget less b0's decode row
    assert [c.request for c in plan.prefills] == [second]


def test_when_the_host_path_falls_behind_be_prompts_bound_for_it_get_only_the_host_feed_share() -> None:
    """Rows holding host KV beyond what the CPU path has been serving (HOST_PACE_FACTOR × recent host tokens per
    iteration + HOST_PACE_MIN_ROWS): a prompt fed there would decode a layer per pass, so the accelerator keeps
    the iteration time for its own decodes and feeds the host only HOST_FEED_SHARE of the budget."""
    slots = HOST_PACE_MIN_ROWS + 4
    planner, _clock, host, _second = _hbm_decode_room_full_with_a_prompt_waiting(host_slots=slots)
    for i in range(HOST_PACE_MIN_ROWS + 1):  # host-resident rows that produced no token lately
        assert host.reserve(f"h{i}", 16)
    assert planner.host_tokens_per_iteration == 0 and not planner.host_path_keeps_pace()
    assert _be_prefill_tokens(planner.schedule()) == int(HOST_FEED_SHARE * 32)
    planner.host_tokens_per_iteration = 1.0  # they ride: HOST_PACE_FACTOR (≥ 1) × 1 + HOST_PACE_MIN_ROWS rows
    assert planner.host_path_keeps_pace()


def test_the_host_tokens_per_iteration_follow_the_host_path_rows_each_iteration_returns() -> None:
    planner, clock, _host = _planner(num_kv_blocks=64)
    rows = [_request(f"h{i}", 4, 0.0, max_tokens=1000) for i in range(4)]
    for row in rows:
        row.output_token_ids.append(0)
    for _ in range(100):
        started = clock.now
        clock.now += 0.01
        plan = planner.schedule()  # nothing in batching: an iteration of host-path rows only
        planner.update(plan, IterationOutputs(started, [], [(r, 1) for r in rows], 8, num_layers=2), clock.now)
    assert planner.host_tokens_per_iteration == pytest.approx(4.0, rel=1e-3)


def test_every_host_path_policy_merges_ready_host_rows_before_more_be_prefill() -> None:
    # Prefill first starved the rows under a TPOT-bound budget: piggyback@2048 on 34B-A100x2 with DailyMail-like
    # BE prefilled ~560 BE prompt tokens an iteration while 58 host rows waited for a merge that never came
    # (2.4 BE tok/s; 136 with the rows first).
    hybrid, _, _ = _planner(num_kv_blocks=64)
    piggyback, _, _ = _planner(num_kv_blocks=64, policy="piggyback")
    assert hybrid.slo is not None and hybrid.slo.be_rows_first
    assert piggyback.slo is not None and piggyback.slo.be_rows_first
    no_moves = Planner(_config(), 64, HostKV(64, 16, 8), staircase_model(), Clock(), kv_moves=False)
    assert no_moves.slo is not None and no_moves.slo.be_rows_first  # every BE row on the host: as piggyback
