"""The planner: pure Python, policies as objects, the same decisions the engine and the simulator act on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from piggyback_runtime.config import ConfigError, RuntimeConfig
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.request import Request, SamplingParams
from piggyback_runtime.scheduler.batching import IterationPlan
from piggyback_runtime.scheduler.outputs import IterationOutputs, TokenEvent, sampling_requests
from piggyback_runtime.scheduler.planner import REASON_BE_QUEUE_FULL, Planner
from piggyback_runtime.scheduler.policies import make_policy, policy_names
from tests.runtime.configs import runtime_config
from tests.runtime.planner_fakes import Clock, staircase_model


def _config(policy: str = "piggyback", **engine: object) -> RuntimeConfig:
    return runtime_config(
        device=None,
        services=[{"name": "chat", "class": "LS", "slo": {"ttft_ms": 1000, "tpot_ms": 100}},
                  {"name": "batch", "class": "BE"}],
        engine={"policy": policy, "block_size": 4, "max_num_batched_tokens": 32, "max_num_seqs": 32, **engine},
        piggyback={"max_be_rows_per_layer": 8, "max_be_requests": 4},
        slo_control={"max_be_queue": 2},
    )


def _request(rid: str, service: str, prompt: int, arrival_s: float, max_tokens: int = 8) -> Request:
    cls = "LS" if service == "chat" else "BE"
    return Request(rid, service, cls, list(range(prompt)), SamplingParams(max_tokens=max_tokens),  # type: ignore[arg-type]
                   arrival_s=arrival_s)


def _ran(
    planner: Planner, clock: Clock, plan: IterationPlan, seconds: float, token: int = 7,
    host_path_tokens: list[tuple[Request, int]] | None = None, be_rows_merged: int = 0,
) -> list[TokenEvent]:  # fmt: skip
    """The plan ran for `seconds` of the fake clock and sampled `token` for each request that samples."""
    started = clock.now
    clock.now += seconds
    outputs = IterationOutputs(started, [token] * len(sampling_requests(plan)), host_path_tokens or [],
                               be_rows_merged, num_layers=2)  # fmt: skip
    return planner.update(plan, outputs, clock.now)


def test_every_policy_is_one_registered_class_and_the_config_accepts_exactly_those() -> None:
    assert policy_names() == ["hybrid", "piggyback", "priority", "ls-only", "headroom", "headroom-admit", "neo"]
    for name in policy_names():
        assert make_policy(name).name == name
        assert _config(name).engine.policy == name
    with pytest.raises(ConfigError, match=r"engine\.policy.*use one of hybrid, piggyback"):
        _config("fastest")


def test_policies_route_requests_the_way_they_are_described() -> None:
    ls, be = "LS", "BE"
    # hybrid, piggyback, priority, ls-only, headroom, headroom-admit, neo (hybrid: BE may go to the host path)
    assert [make_policy(p).on_host_path(be) for p in policy_names()] == [True, True, False, False, False, False, True]
    assert [make_policy(p).on_host_path(ls) for p in policy_names()] == [False] * 6 + [True]
    assert make_policy("headroom-admit", headroom_be_kv_share=0.25).be_kv_block_limit(100) == 25
    assert make_policy("headroom-admit").slo_controlled and not make_policy("headroom").slo_controlled
    assert [make_policy(p).hybrid_placement for p in policy_names()] == [True] + [False] * 6
    assert make_policy("ls-only").be_waits_for(ls_work_held=True)
    assert not make_policy("priority").be_waits_for(ls_work_held=True)
    assert make_policy("headroom", headroom_be_kv_share=0.25).be_kv_block_limit(100) == 25
    assert make_policy("neo", max_be_requests=7).rows_per_layer(3) == 7


def test_host_kv_is_taken_as_the_be_prefill_fills_it_not_at_admission() -> None:
    clock = Clock()
    host = HostKV(num_blocks=4, block_size=16, max_requests=4)  # 64 tokens of host KV
    planner = Planner(_config(), num_kv_blocks=64, host_kv=host, latency_model=staircase_model(), clock=clock)
    first, second = _request("b0", "batch", 40, 0.0, 12), _request("b1", "batch", 20, 0.0, 12)
    for request in (first, second):
        assert planner.admission(request) is None
        planner.add(request)
    # Admitted, queued for batching: no host KV is held by a request that has not started its prefill.
    assert not host.slot_of and host.allocator.num_free == 4
    # b0 (40 + 12 = 52 tokens, 4 blocks) enters batching; b1 (2 blocks) would exceed what is left: it waits.
    plan = planner.schedule()
    assert [c.request.request_id for c in plan.prefills] == ["b0"] and list(planner.host_kv_waiting) == [second]
    # The first chunk (32 tokens: the budget) holds 2 host blocks, not the request's full length.
    assert plan.prefills[0].num_tokens == 32 and len(host.blocks_of("b0")) == 2
    _ran(planner, clock, plan, 0.01)
    # The chunk that ends the prompt reserves the rest (prompt + max_tokens), so decode never runs out.
    plan = planner.schedule()
    assert plan.prefills[0].samples and len(host.blocks_of("b0")) == 4
    events = _ran(planner, clock, plan, 0.01)
    assert events[0].left_for_host_path and first.placement == "host"
    # The path frees b0's host KV: b1 enters batching at the next plan and takes blocks as it fills them.
    host.free("b0")
    plan = planner.schedule()
    assert [c.request.request_id for c in plan.prefills] == ["b1"] and len(host.blocks_of("b1")) == 2


def test_the_be_queue_bound_refuses_past_max_be_queue() -> None:
    planner = Planner(_config(), num_kv_blocks=64, host_kv=HostKV(1, 16, 4),
                      latency_model=staircase_model(), clock=Clock())
    waiting = [_request(f"w{i}", "batch", 20, 0.0, 12) for i in range(3)]
    for request in waiting[:2]:  # neither fits the 16 host tokens: both wait (max_be_queue 2)
        assert planner.admission(request) is None
        planner.add(request)
    refused = planner.admission(waiting[2])
    assert refused is not None and refused.reason == REASON_BE_QUEUE_FULL and "max_be_queue" in refused.message


def test_planner_plans_the_ls_work_first_and_sizes_the_be_share_with_the_latency_model() -> None:
    clock = Clock()
    planner = Planner(_config(), num_kv_blocks=64, host_kv=HostKV(64, 16, 4),
                      latency_model=staircase_model(), clock=clock)
    ls = _request("c0", "chat", 10, 0.0)
    be = _request("b0", "batch", 30, 0.0)
    for request in (ls, be):
        assert planner.admission(request) is None  # fills in the service's SLO
        planner.add(request)
    plan = planner.schedule(be_rows_ready=20)
    assert [c.request.request_id for c in plan.prefills] == ["c0", "b0"]
    allowance = planner.last_allowance
    assert allowance is not None and plan.be_rows_per_layer == allowance.be_rows_per_layer
    # 1 ms per Dense row, TTFT budget 1 s: the BE prefill takes the rest of the 32-token budget.
    assert plan.prefills[1].num_tokens == 22 and allowance.be_prefill_tokens == 22
    assert plan.be_rows_per_layer == 8  # every ready row up to the configured cap fits
    assert sampling_requests(plan) == [ls]
    _ran(planner, clock, plan, 0.5)
    assert ls.num_computed_tokens == 10 and be.num_computed_tokens == 22 and ls.output_token_ids == [7]
    # A tight clock: c0 decodes with a 100 ms TPOT; 1 ms/row still fits, so BE keeps its share.
    plan = planner.schedule(be_rows_ready=200)
    assert [c.request.request_id for c in plan.decodes] == ["c0"]
    assert planner.last_allowance is not None and planner.last_allowance.binding == "tpot"


def test_ls_admission_refuses_what_the_model_says_would_miss_and_reports_why() -> None:
    clock = Clock()
    slow = staircase_model(per_row_s=0.2)  # a 32-token chunk takes 6.4 s: no TTFT of 1 s can hold
    planner = Planner(_config(), num_kv_blocks=64, host_kv=HostKV(64, 16, 4), latency_model=slow, clock=clock)
    rejection = planner.admission(_request("c0", "chat", 10, 0.0))
    assert rejection is not None and rejection.reason == "TTFTUnattainable" and rejection.retry_after_s >= 1
    assert rejection.decision is not None and rejection.decision.predicted_ttft_s > 1.0


def test_baseline_policies_plan_without_a_latency_model_and_ls_only_holds_be_back() -> None:
    planner = Planner(_config("ls-only"), num_kv_blocks=64)
    planner.add(_request("c0", "chat", 10, 0.0))
    planner.add(_request("b0", "batch", 10, 0.0))
    plan = planner.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["c0"] and planner.slo is None
    priority = Planner(_config("priority"), num_kv_blocks=64)
    priority.add(_request("c0", "chat", 10, 0.0))
    priority.add(_request("b0", "batch", 10, 0.0))
    assert [c.request.request_id for c in priority.schedule().chunks] == ["c0", "b0"]


@pytest.mark.slow
def test_the_scheduler_imports_and_plans_with_torch_unavailable() -> None:
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from piggyback_runtime.config import RuntimeConfig
        from piggyback_runtime.kv.host import HostKV
        from piggyback_runtime.request import Request, SamplingParams
        from piggyback_runtime.scheduler import batching, latency_model, planner, policies, slo_control  # noqa: F401
        from piggyback_runtime.scheduler import outputs, stats  # noqa: F401
        from piggyback_runtime.scheduler.latency_model import LatencyModel, LinearAttentionModel, StaircaseModel
        config = RuntimeConfig.from_dict({"model": {"uri": "synthetic://tiny-llama"},
            "services": [{"name": "chat", "class": "LS", "slo": {"ttft_ms": 1000, "tpot_ms": 100}},
                         {"name": "batch", "class": "BE"}]})
        model = LatencyModel(StaircaseModel.fit([(1, 1e-3), (64, 2e-3), (512, 8e-3)]),
                             LinearAttentionModel(0.0, 1e-8, 1e-8))
        p = planner.Planner(config, 256, HostKV(64, 64, 8), model, clock=lambda: 0.0)
        p.add(Request("c0", "chat", "LS", [1] * 40, SamplingParams(max_tokens=4), arrival_s=0.0))
        p.add(Request("b0", "batch", "BE", [1] * 40, SamplingParams(max_tokens=4), arrival_s=0.0))
        plan = p.schedule(be_rows_ready=3)
        assert [c.num_tokens for c in plan.prefills] == [40, 40], plan
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("planned", plan.num_tokens, plan.be_rows_per_layer)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "planned 80 3"  # 3 rows ready, under the cap of 64


def test_update_does_the_bookkeeping_of_an_iteration_the_engine_and_the_simulator_share() -> None:
    clock = Clock()
    planner = Planner(_config(), num_kv_blocks=64, host_kv=HostKV(64, 16, 4),
                      latency_model=staircase_model(), clock=clock)
    ls = _request("c0", "chat", 10, 0.0, max_tokens=2)
    be = _request("b0", "batch", 12, 0.0, max_tokens=3)
    for request in (ls, be):
        assert planner.admission(request) is None
        planner.add(request)
    first = planner.schedule()
    assert sampling_requests(first) == [ls, be]  # both prompts fit the 32-token budget
    events = _ran(planner, clock, first, 0.25)
    # Both sampled their first token at the update's `now`; the host-path request left batching for the CPU path.
    assert [(e.request, e.token_id, e.first, e.finish_reason) for e in events] == [(ls, 7, True, None),
                                                                                  (be, 7, True, None)]
    assert ls.first_token_s == ls.last_token_s == 0.25 and ls.output_token_ids == [7]
    assert events[1].left_for_host_path and not events[0].left_for_host_path
    assert be not in planner.scheduler.running and not planner.allocator.blocks_of("b0")
    assert be.num_computed_tokens == be.num_tokens - 1  # its next token is computed on the CPU path
    stats = planner.stats.last
    assert stats is not None and stats.ran and stats.tokens == 2 and stats.be_tokens == 1
    assert stats.measured_s == 0.25 and stats.predicted_s is not None  # the SLO controller's closed loop saw it
    # Next: c0 decodes its last token on the accelerator, b0's CPU-path row brings its second token.
    second = planner.schedule()
    assert [c.request for c in second.decodes] == [ls]
    events = _ran(planner, clock, second, 0.125, token=9, host_path_tokens=[(be, 8)], be_rows_merged=4)
    assert [(e.request, e.finish_reason, e.from_host_path, e.previous_token_s) for e in events] == [
        (ls, "length", False, 0.25), (be, None, True, 0.25)]  # fmt: skip
    assert ls.output_token_ids == [7, 9] and be.output_token_ids == [7, 8] and ls.last_token_s == 0.375
    # The finished LS request is dropped and its accelerator KV freed; its lengths join the headroom mix.
    assert not planner.scheduler.has_work() and not planner.allocator.blocks_of("c0")
    assert planner._finished_ls_lengths[-1] == (10, 2)
    recorder = planner.stats
    assert (recorder.iterations, recorder.tokens, recorder.be_tokens, recorder.be_rows_merged) == (2, 4, 2, 4)
    assert recorder.busy_s == 0.375 and recorder.model_error.count == 2


def test_update_refuses_outputs_that_do_not_match_the_plan() -> None:
    planner = Planner(_config("priority"), num_kv_blocks=64, clock=Clock())
    planner.add(_request("c0", "chat", 10, 0.0))
    plan = planner.schedule()
    with pytest.raises(ValueError, match="samples 1 requests but the outputs hold 0"):
        planner.update(plan, IterationOutputs(0.0, []), 0.0)
