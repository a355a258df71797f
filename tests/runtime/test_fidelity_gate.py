"""The simulator's fidelity gate, deterministic (issue #26 §3): the REAL engine (engine.py, a tiny synthetic model
really run on the CPU) on a virtual clock whose forward pass "lasts" what a known latency model says, and the
simulator (sim/simulator.py) on a device whose timings are that same model, given the same requests, must make
the same decisions, iteration by iteration, exactly: when each iteration starts, which requests it holds and how
many tokens of each, the BE rows allowed per layer, preemptions, every admission decision and every placement.

Why this is a gate that cannot flake: neither side reads the wall clock, so the host's load (other jobs on this
shared machine) changes nothing; and both sides run the one Planner (schedule → forward pass or its timing →
update), so a difference means the engine and the simulator drive it differently.

The CPU path: its results arrive in real time from worker processes, which no virtual clock can order. The gate
therefore runs a policy with BE entirely on the accelerator (`priority`) and one that is the same with SLO control
on (tests/runtime/gate_policy.py: BE prefill sized by the SLO controller, LS admission by the latency model), so
the SLO controller's decisions are gated too, over whole workloads. The default policy (`hybrid`, KV moves executed
on both sides: the engine's planner and the simulator's are built with kv_moves=True) is gated up to and including
its first KV move to the host: every decision until a BE row is on the CPU path, where real time takes over. The
piggyback path's per-layer timing is the simulator's model of the CPU workers; the wall-clock comparison of that is
benchmarks/sim_fidelity.py's error table.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import AdmissionRejected, Engine
from piggyback_runtime.request import Request, SamplingParams
from piggyback_runtime.scheduler.batching import IterationPlan
from piggyback_runtime.scheduler.latency_model import LatencyModel, LinearAttentionModel, ProfileKey, StaircaseModel
from piggyback_runtime.scheduler.outputs import sampling_requests
from piggyback_runtime.scheduler.planner import Planner, Rejection
from piggyback_runtime.scheduler.policies import EXTRA_MODULES_ENV
from piggyback_runtime.sim import devices
from piggyback_runtime.sim.scenario import shape_for
from piggyback_runtime.sim.simulator import Simulator
from piggyback_runtime.sim.workload.spec import SimRequest

MODEL = "synthetic://tiny-llama"
GATE_POLICY_MODULE = "tests.runtime.gate_policy"

Decision = tuple[Any, ...]


def runtime_config(policy: str) -> RuntimeConfig:
    return RuntimeConfig.from_dict({
        "model": {"uri": MODEL},
        "device": "cpu",
        # Tight enough that admission refuses some LS requests when the SLO controller is on.
        "services": [{"name": "chat", "class": "LS", "slo": {"ttft_ms": 40, "tpot_ms": 20}},
                     {"name": "batch", "class": "BE"}],
        "engine": {"block_size": 4, "num_kv_blocks": 160, "max_num_batched_tokens": 64, "max_num_seqs": 16,
                   "policy": policy,
                   # Hybrid: no LS forecast reserve (the arrival rate measured over a burst would reserve all HBM
                   # for LS); HBM still runs short of BE at full length next to the held LS requests.
                   "hbm_reserve_horizon_s": 0.0},
        "piggyback": {"host_block_size": 8, "num_host_kv_blocks": 256, "max_be_requests": 16},
    })  # fmt: skip


def latency_model() -> LatencyModel:
    """A known model (what the engine's forward pass lasts, and the simulated device's truth)."""
    dense = StaircaseModel.fit([(1, 2e-3), (16, 2.5e-3), (64, 4e-3), (256, 9e-3)])
    return LatencyModel(dense, LinearAttentionModel(1e-4, 1e-8, 2e-8), overhead_s=1e-3, per_sampled_row_s=1e-5)


def first_move_to_host(log: list[Decision]) -> int:
    """The index of the first iteration that moves BE KV to the host (len(log) when none does)."""
    return next((i for i, d in enumerate(log) if d[0] == "iteration" and d[6]), len(log))


def workload(seed: int = 7) -> list[SimRequest]:
    """A BE batch at the start and LS requests in bursts of 16 every 150 ms (queues form: admission binds)."""
    rng = random.Random(seed)
    requests = [SimRequest(0.0, "batch", "BE", rng.randint(40, 150), rng.randint(8, 24), f"be{i}") for i in range(6)]
    for i in range(48):
        arrival_s = round(0.15 * (i // 16) + rng.uniform(0.0, 0.01), 6)
        requests.append(SimRequest(arrival_s, "chat", "LS", rng.randint(8, 60), rng.randint(3, 12), f"ls{i}"))
    return sorted(requests, key=lambda r: r.arrival_s)


class DecisionLog:
    """Every decision a planner makes, recorded by wrapping Planner.schedule and Planner.admission."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_planner: dict[int, list[Decision]] = {}
        real_schedule, real_admission = Planner.schedule, Planner.admission
        log = self

        def schedule(planner: Planner, be_rows_ready: int = 0, **kwargs: Any) -> IterationPlan:
            plan = real_schedule(planner, be_rows_ready, **kwargs)
            if plan:  # the simulator also asks when there is nothing to run; such an empty plan runs nothing
                log.of(planner).append((
                    "iteration", planner.clock(),
                    tuple((c.request.request_id, c.start, c.num_tokens) for c in plan.prefills),
                    tuple((c.request.request_id, c.start) for c in plan.decodes),
                    plan.be_rows_per_layer, tuple(r.request_id for r in plan.preempted),
                    tuple(r.request_id for r in plan.be_to_host), tuple(r.request_id for r in plan.be_to_gpu),
                ))  # fmt: skip
            return plan

        def admission(planner: Planner, request: Request) -> Rejection | None:
            rejection = real_admission(planner, request)
            log.of(planner).append(("arrival", request.request_id, planner.clock(),
                                    None if rejection is None else rejection.reason,
                                    planner.on_host_path(request)))  # fmt: skip
            return rejection

        monkeypatch.setattr(Planner, "schedule", schedule)
        monkeypatch.setattr(Planner, "admission", admission)

    def of(self, planner: Planner) -> list[Decision]:
        return self.by_planner.setdefault(id(planner), [])


def run_engine(config: RuntimeConfig, device: devices.DeviceProfile, requests: list[SimRequest]) -> Engine:
    """The real engine on a virtual clock: each forward pass (really computed) lasts the device's timing."""
    now = [0.0]

    def forward_pass_done(plan: IterationPlan) -> None:
        # The simulator's own timing of an iteration without CPU-path rows (Simulator._iterate).
        prefill_load = sum(c.num_tokens * c.start + c.num_tokens * (c.num_tokens + 1) / 2 for c in plan.prefills)
        now[0] += device.iteration_s(plan.num_tokens, prefill_load, [c.start + 1 for c in plan.decodes],
                                     len(sampling_requests(plan)))  # fmt: skip

    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    engine = Engine(config, latency_model=device.latency_model, clock=clock, forward_pass_done=forward_pass_done)
    pending = list(requests)
    while pending or engine.has_work():
        while pending and pending[0].arrival_s <= now[0]:
            sim = pending.pop(0)
            request = Request(sim.request_id, sim.service, sim.service_class, [0] * sim.prompt_tokens,
                              SamplingParams(max_tokens=sim.output_tokens, temperature=0.0, ignore_eos=True),
                              arrival_s=sim.arrival_s)  # fmt: skip
            with contextlib.suppress(AdmissionRejected):  # the decision is in the log
                engine.add_request(request)
        if engine.has_work():
            iterations = engine.planner.stats.iterations
            engine.step()
            pb = engine.piggyback
            if engine.planner.stats.iterations == iterations and not (pb is not None and pb.has_work()):
                # Nothing could run and nothing is in flight: the simulator jumps to its next event, or stops.
                if not pending:
                    break
                now[0] = max(now[0], pending[0].arrival_s)
        elif pending:
            now[0] = pending[0].arrival_s  # idle until the next arrival, as the simulator jumps
    return engine


@pytest.fixture
def device(tmp_path: Path) -> devices.DeviceProfile:
    path = latency_model().save(tmp_path / "profile.json", ProfileKey(MODEL, "float32", "gate-cpu", "x"))
    host = devices.HostSpec(cores=2, sockets=1, dram_bandwidth_gb_s_per_socket=30, dram_gib=24)
    return devices.load_runtime_profile(path, shape_for(MODEL), host)


@pytest.mark.slow  # seconds: the real engine over a whole workload (virtual clock, no process)
@pytest.mark.parametrize("policy", ["priority", "gate-slo-priority", "hybrid"])
def test_the_engine_on_a_virtual_clock_and_the_simulator_make_the_same_decisions_exactly(
    policy: str, device: devices.DeviceProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(EXTRA_MODULES_ENV, GATE_POLICY_MODULE)
    # The torch attention path: the gate is about decisions, and needs no native kernel build (which can wait
    # on another process's build of the shared kernel cache for minutes).
    monkeypatch.setenv(cpu_attention.ENV_BACKEND, "torch")
    monkeypatch.setattr(cpu_attention, "_selected", None)
    config = runtime_config(policy)
    requests = workload()
    log = DecisionLog(monkeypatch)
    engine = run_engine(config, device, requests)
    try:
        engine_log = log.of(engine.planner)
        engine_tokens = engine.planner.stats.tokens
    finally:
        engine.close()
    simulator = Simulator(config, device, requests, duration_s=1000.0, drain_s=0.0)
    result = simulator.run()
    sim_log = log.of(simulator.planner)

    if policy == "hybrid":
        # HBM (160 blocks) cannot hold every BE request at full length next to the LS reserve: the planner moves
        # some to the host, and both sides took the same decisions up to the first move.
        cut = first_move_to_host(engine_log)
        assert cut < len(engine_log) and first_move_to_host(sim_log) == cut, "no move, or not at the same point"
        assert sum(d[0] == "iteration" for d in engine_log[:cut]) > 10
        for i, (ours, theirs) in enumerate(zip(engine_log[: cut + 1], sim_log[: cut + 1], strict=True)):
            assert ours == theirs, f"decision {i} differs: engine {ours} vs simulator {theirs}"
        assert engine.planner.moves_to_host > 0 and simulator.planner.moves_to_host > 0
        return
    iterations = [d for d in engine_log if d[0] == "iteration"]
    assert len(iterations) > 50 and result.iterations == len(iterations)
    for i, (ours, theirs) in enumerate(zip(engine_log, sim_log, strict=False)):
        assert ours == theirs, f"decision {i} differs: engine {ours} vs simulator {theirs}"
    assert len(engine_log) == len(sim_log)
    assert engine_tokens == simulator.stats.tokens
    rejected = [d for d in engine_log if d[0] == "arrival" and d[3] is not None]
    if policy == "gate-slo-priority":  # the gate covers admission: some LS requests were refused, some admitted
        assert 0 < len(rejected) < 48, rejected
    else:
        assert not rejected
