"""The simulator: the runtime's planner in simulated time, the piggyback path's per-layer lag, scenarios."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from piggyback_runtime.config import ConfigError
from piggyback_runtime.scheduler.latency_model import LatencyModel, ProfileKey, StaircaseModel
from piggyback_runtime.scheduler.planner import Planner
from piggyback_runtime.scheduler.policies import policy_names
from piggyback_runtime.sim import devices
from piggyback_runtime.sim.scenario import load_scenario, load_sweep, run_scenario, summary, sweep_points
from piggyback_runtime.sim.simulator import SimResult
from tests.runtime.configs import runtime_config_dict

VIDUR = devices.default_vidur_dir()  # $PIGGYBACK_VIDUR_DIR, else ../shared/data/vidur next to the repository
needs_vidur = pytest.mark.skipif(not (VIDUR / "profiling").is_dir(),
                                 reason=f"the measured GPU timings are not at {VIDUR} (shared/data/vidur)")


def scenario(policy: str = "piggyback", ls_rate: float = 2.0, be_count: int = 40, duration_s: float = 30.0,
             host_gb_s: float = 200.0, ttft_ms: float = 2000, tpot_ms: float = 150) -> dict[str, Any]:  # fmt: skip
    return {
        "runtime": runtime_config_dict(
            uri="synthetic://llama-2-7b", device=None,
            services=[{"name": "chat", "class": "LS", "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms}},
                      {"name": "batch", "class": "BE"}],
            policy=policy, engine={"max_num_seqs": 256},
            piggyback={"host_kv_memory_gib": 64, "max_be_requests": 64, "max_be_rows_per_layer": 64},
            slo_control={"max_be_queue": 10000},
        ),
        "device": {"gpu": "h100", "model": "llama-2-7b", "tp": 1,
                   "host": {"cores": 24, "sockets": 1, "dram_bandwidth_gb_s_per_socket": host_gb_s, "dram_gib": 256}},
        "workload": {"seed": 3, "duration_s": duration_s, "sources": [
            {"kind": "poisson", "service": "chat", "class": "LS", "rate_per_s": ls_rate, "duration_s": duration_s,
             "lengths": {"kind": "fixed", "prompt_tokens": 300, "output_tokens": 40}},
            {"kind": "batch", "service": "batch", "class": "BE", "count": be_count,
             "lengths": {"kind": "fixed", "prompt_tokens": 2000, "output_tokens": 200}},
        ]},
        "drain_s": 30,
    } | ({} if be_count else {"workload": {"seed": 3, "duration_s": duration_s, "sources": [
        {"kind": "poisson", "service": "chat", "class": "LS", "rate_per_s": ls_rate, "duration_s": duration_s,
         "lengths": {"kind": "fixed", "prompt_tokens": 300, "output_tokens": 40}}]}})  # fmt: skip


def run(data: dict[str, Any]) -> SimResult:
    return run_scenario(load_scenario(data))


@pytest.mark.slow  # seconds: a whole simulation
@needs_vidur
def test_the_simulator_plans_with_the_runtime_planner_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"plan": 0}
    real_plan = Planner.schedule

    def counting(self: Planner, be_rows_ready: int = 0, **kwargs):  # type: ignore[no-untyped-def]
        calls["plan"] += 1
        return real_plan(self, be_rows_ready, **kwargs)

    monkeypatch.setattr(Planner, "schedule", counting)
    result = run(scenario())
    assert result.iterations > 0 and calls["plan"] >= result.iterations


@pytest.mark.slow  # seconds: a whole simulation
@needs_vidur
def test_every_request_is_accounted_for_and_finished_requests_got_every_token() -> None:
    for policy in policy_names():
        result = run(scenario(policy))
        ls, be = result.of("LS"), result.of("BE")
        assert len(be) == 40 and len(ls) > 30, policy
        for record in ls:
            assert record.rejected or record.finished_s is not None, (policy, record)
        for record in result.records:
            if record.finished_s is not None:
                assert record.tokens_out == record.output_tokens
        assert result.be_tokens == sum(r.tokens_out for r in be if r.last_token_s is not None
                                       and r.last_token_s <= result.duration_s) or result.be_tokens <= sum(
            r.tokens_out for r in be)  # fmt: skip
        assert 0 < result.gpu_busy_share <= 1.0 + 1e-9


@pytest.mark.slow  # seconds: a whole simulation
@needs_vidur
def test_baselines_keep_be_off_the_host_and_piggyback_moves_be_decode_there() -> None:
    piggyback, priority = run(scenario("piggyback")), run(scenario("priority"))
    assert piggyback.host_bytes_read > 0 and piggyback.be_rows_merged > 0 and piggyback.be_tokens > 0
    assert priority.host_bytes_read == 0 and priority.be_rows_merged == 0 and priority.be_tokens > 0
    ls_only = run(scenario("ls-only", ls_rate=8.0))
    assert ls_only.be_tokens < priority.be_tokens  # BE sits out while LS work is held


@pytest.mark.slow  # seconds: a whole simulation
@needs_vidur
def test_be_throughput_follows_the_per_layer_lag_set_by_host_bandwidth() -> None:
    fast, slow = run(scenario(host_gb_s=400.0)), run(scenario(host_gb_s=5.0))
    # A result back within a layer's GPU time lets a row advance several layers per iteration.
    assert fast.be_rows_merged / fast.iterations > 2 * slow.be_rows_merged / slow.iterations
    assert fast.be_tokens > 1.5 * slow.be_tokens
    # The piggyback path never makes the GPU wait: LS decode speed does not depend on the host.
    assert summary(slow)["ls_tpot_p50_s"] == pytest.approx(summary(fast)["ls_tpot_p50_s"], rel=0.25)


@pytest.mark.slow  # seconds: a whole simulation
@needs_vidur
def test_neo_makes_the_accelerator_wait_for_the_cpu() -> None:
    fast, slow = run(scenario("neo", host_gb_s=400.0)), run(scenario("neo", host_gb_s=5.0))
    assert summary(slow)["ls_tpot_p50_s"] > 2 * summary(fast)["ls_tpot_p50_s"]


@pytest.mark.slow  # seconds: a whole simulation
@needs_vidur
def test_admission_refuses_ls_work_that_would_miss_and_admitted_work_meets_its_slo() -> None:
    result = run(scenario(ls_rate=200.0, be_count=0, duration_s=10.0, ttft_ms=300, tpot_ms=40))
    ls = result.of("LS")
    rejected = [r for r in ls if r.rejected]
    assert rejected and {r.rejected for r in rejected} <= {"TTFTUnattainable", "TPOTUnattainable"}
    admitted = [r for r in ls if not r.rejected]
    assert sum(r.attained for r in admitted) / len(admitted) >= 0.9


@pytest.mark.slow  # seconds: a whole simulation
@needs_vidur
def test_same_seed_same_result_and_another_seed_differs() -> None:
    first, again = summary(run(scenario())), summary(run(scenario()))
    assert first == again
    other = scenario()
    other["workload"]["seed"] = 4
    assert summary(run(other)) != first


def test_a_profile_written_by_the_runtime_drives_the_simulator(tmp_path: Path) -> None:
    dense = StaircaseModel.fit([(1, 2e-3), (64, 3e-3), (256, 6e-3), (512, 11e-3)])
    model = LatencyModel(dense, devices.LinearAttentionModel(1e-4, 1e-8, 2e-8), overhead_s=1e-3)
    model.save(tmp_path / "profile.json", ProfileKey("synthetic://small-llama", "float32", "test-cpu", "x"))
    data = scenario(duration_s=10.0, be_count=4)
    data["runtime"]["model"]["uri"] = "synthetic://small-llama"
    data["device"] = {"runtime_profile": "profile.json", "model": "synthetic://small-llama",
                      "host": {"cores": 2, "sockets": 1, "dram_bandwidth_gb_s_per_socket": 30, "dram_gib": 24}}
    result = run_scenario(load_scenario(data), base_dir=tmp_path)
    assert result.be_tokens > 0 and result.of("LS") and result.ls_attainment > 0.5


def test_scenario_files_are_validated_with_the_field_named() -> None:
    bad = scenario()
    bad["device"]["gpus"] = "h100"
    with pytest.raises(ConfigError, match=r"device\.gpus"):
        load_scenario(bad)
    typo = scenario()
    typo["runtime"]["engine"]["max_num_seq"] = 4
    with pytest.raises(ConfigError, match=r"engine\.max_num_seq"):
        load_scenario(typo)
    stranger = scenario()
    stranger["workload"]["sources"][0]["service"] = "nobody"
    with pytest.raises(ConfigError, match="nobody"):
        load_scenario(stranger)
    both = scenario()
    both["device"]["runtime_profile"] = "x.json"
    with pytest.raises(ConfigError, match="exactly one"):
        load_scenario(both)
    with pytest.raises(ConfigError, match="policies"):
        load_scenario({**scenario(), "policies": ["piggyback", "fastest"]})


def test_a_sweep_is_the_product_of_its_varied_fields_and_each_point_is_validated() -> None:
    spec = load_sweep({"base": scenario(), "vary": {"workload.sources.0.rate_per_s": [1, 2, 4],
                                                     "runtime.engine.policy": ["piggyback", "headroom"]}})
    points = sweep_points(spec)
    assert len(points) == 6
    assert {(v["workload.sources.0.rate_per_s"], d["runtime"]["engine"]["policy"]) for v, d in points} == {
        (r, p) for r in (1, 2, 4) for p in ("piggyback", "headroom")}
    assert scenario()["workload"]["sources"][0]["rate_per_s"] == 2.0  # the base is not modified
    broken = copy.deepcopy(scenario())
    with pytest.raises(ConfigError, match=r"workload\.sources\.0\.rate_per_s: Input should be greater than 0"):
        load_sweep({"base": broken, "vary": {"workload.sources.0.rate_per_s": [-1]}})


@pytest.mark.slow  # runs the real engine for seconds
def test_the_fidelity_replay_runs_one_workload_through_the_real_engine_and_the_simulator() -> None:
    """benchmarks/sim_fidelity.py, small: the same config and requests through the real engine and through the
    simulator on the profile the runtime measured, each giving every compared figure. How close the two come
    is a wall-clock figure of this machine, so the error table lives in the benchmark, not here."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from sim_fidelity import COMPARED, compare

    rows = compare("synthetic://tiny-llama", ["priority"], duration_s=2.0, ls_rate=3.0, be_count=20, seed=1,
                   ttft_ms=2000, tpot_ms=250)  # fmt: skip
    assert [r["figure"] for r in rows] == COMPARED
    figures = {r["figure"]: r for r in rows}
    for side in ("measured", "simulated"):
        assert 0.0 <= figures["ls_attainment"][side] <= 1.0, figures["ls_attainment"]
        assert figures["be_tokens_per_s"][side] > 0, f"{side}: no BE token in the run"
        assert all(figures[f][side] > 0 for f in ("ls_ttft_p50_s", "ls_tpot_p50_s")), f"{side}: no LS request timed"


def test_the_shipped_scenarios_are_valid() -> None:
    from piggyback_runtime.sim.scenario import load_yaml

    folder = Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios"
    load_scenario(load_yaml(folder / "llama2-70b-h100.yaml"), "llama2-70b-h100.yaml")
    assert len(sweep_points(load_sweep(load_yaml(folder / "ls-rate-sweep.yaml"), "ls-rate-sweep.yaml"))) == 6


@pytest.mark.slow
@needs_vidur
def test_sim_run_prints_one_row_per_policy_and_a_bad_file_names_the_field(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    data = scenario(duration_s=10.0, be_count=10) | {"policies": ["piggyback", "headroom"]}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(data))
    cli = [sys.executable, "-m", "piggyback_runtime.cli", "sim", "run"]
    done = subprocess.run([*cli, str(good), "--quiet", "--csv", str(tmp_path / "out.csv")], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = [line.split() for line in done.stdout.splitlines() if not line.startswith("#")]
    assert table[0][:2] == ["policy", "ls_attainment"] and [row[0] for row in table[1:]] == ["piggyback", "headroom"]
    assert (tmp_path / "out.csv").read_text().count("\n") == 3
    data["device"]["tp"] = 16
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    done = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "device.tp" in done.stderr


def test_the_engine_and_the_simulator_end_each_iteration_with_the_same_planner_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator's fidelity rests on its iterations being the engine's: planner.schedule, then the forward
    pass (or its timing), then the one Planner.update, with no bookkeeping of its own around it."""
    from piggyback_runtime.engine import Engine
    from piggyback_runtime.request import Request, SamplingParams
    from tests.runtime.helpers import tiny_config

    updates: list[Planner] = []
    real_update = Planner.update

    def spy(self: Planner, plan, outputs, now):  # type: ignore[no-untyped-def]
        updates.append(self)
        return real_update(self, plan, outputs, now)

    monkeypatch.setattr(Planner, "update", spy)
    engine = Engine(tiny_config())
    try:
        for i, service in enumerate(("chat", "batch")):
            engine.add_request(Request(f"r{i}", service, "LS" if service == "chat" else "BE", [3] * 12,
                                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))  # fmt: skip
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
    finally:
        engine.close()
    assert len(updates) == steps and engine.planner.stats.iterations == steps and engine.planner.stats.tokens == 8
    engine_updates = len(updates)

    dense = StaircaseModel.fit([(1, 2e-3), (64, 3e-3), (256, 6e-3), (512, 11e-3)])
    model = LatencyModel(dense, devices.LinearAttentionModel(1e-4, 1e-8, 2e-8), overhead_s=1e-3)
    model.save(tmp_path / "profile.json", ProfileKey("synthetic://small-llama", "float32", "test-cpu", "x"))
    data = scenario(duration_s=5.0, be_count=2)
    data["runtime"]["model"]["uri"] = "synthetic://small-llama"
    data["device"] = {"runtime_profile": "profile.json", "model": "synthetic://small-llama",
                      "host": {"cores": 2, "sockets": 1, "dram_bandwidth_gb_s_per_socket": 30, "dram_gib": 24}}
    result = run_scenario(load_scenario(data), base_dir=tmp_path)
    assert len(updates) - engine_updates == result.iterations > 0
    assert sum(r.tokens_out for r in result.records) > 0


@pytest.mark.slow  # seconds: two whole simulations
@needs_vidur
def test_the_simulator_exports_the_runtimes_headroom_gauge_and_it_names_the_rate_admission_lets_through() -> None:
    """The gauge is `Planner.headroom_rps`, read as the runtime reads it: at a light load, gauge + the LS rate
    admitted is within 35% (benchmarks/overload.py's tolerance) of what admission lets through at 200 req/s,
    where the gauge reads about 0."""
    light = run(scenario(ls_rate=5.0, be_count=0, duration_s=10.0, ttft_ms=300, tpot_ms=40))
    heavy = run(scenario(ls_rate=200.0, be_count=0, duration_s=10.0, ttft_ms=300, tpot_ms=40))

    def admitted_rps(result: SimResult) -> float:
        return sum(not r.rejected and 2.0 <= r.arrival_s < 10.0 for r in result.of("LS")) / 8.0

    def gauge(result: SimResult) -> float:
        values = [v for t, v in result.ls_headroom_series if t >= 2.0]
        assert values, result.ls_headroom_series
        return sum(values) / len(values)

    let_through = admitted_rps(heavy)
    assert gauge(light) + admitted_rps(light) == pytest.approx(let_through, rel=0.35)
    assert gauge(heavy) <= 0.05 * let_through
