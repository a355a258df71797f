"""Simulator fidelity on this machine: the real engine against the simulator, same config and same requests.

For each policy: the engine replays a seeded workload in real time (`benchmarks/sim_replay.py`); the simulator runs the
same RuntimeConfig and requests on the latency profile the runtime itself measured here (`piggyback profile`
writes the same file), with the simulated device also paying what an engine step costs beyond the profiled
modules (per-iteration and per-sampled-row Python work, measured first on the engine: `calibrate_step_cost`;
`--no-calibrate` leaves it out, as the runtime's own model does),
and a host described by this machine's cores and measured read bandwidth. The table
gives LS attainment, TTFT and TPOT p50/p99 and BE tokens/s from both, and the relative error of each.

On a machine with no GPU the accelerator and the CPU attention workers share the same cores; the simulator
does not model that contention (on a GPU node they do not share), which is one source of error to read the
table with.

    python benchmarks/sim_fidelity.py [--quick] [--policies piggyback,priority,...]   (default: every registered policy)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from sim_replay import StepCost, calibrate_step_cost, replay  # benchmarks/ is on sys.path (run as a script)

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import Engine
from piggyback_runtime.hardware import cpu_model_name
from piggyback_runtime.model.loader import load_model
from piggyback_runtime.profiler import load_or_profile, profile_key
from piggyback_runtime.scheduler.policies import policy_names
from piggyback_runtime.sim.devices import HostSpec, load_runtime_profile
from piggyback_runtime.sim.scenario import shape_for, summary
from piggyback_runtime.sim.simulator import Simulator
from piggyback_runtime.sim.workload import generate, load_workload

RESULTS = Path(__file__).parent / "results"
COMPARED = ["ls_attainment", "ls_ttft_p50_s", "ls_ttft_p99_s", "ls_tpot_p50_s", "ls_tpot_p99_s", "be_tokens_per_s"]


def runtime_config(model: str, policy: str, ttft_ms: float, tpot_ms: float) -> RuntimeConfig:
    return RuntimeConfig.from_dict({
        "model": {"uri": model, "dtype": "float32"}, "device": "cpu",
        "services": [{"name": "chat", "class": "LS", "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms}},
                     {"name": "batch", "class": "BE"}],
        "engine": {"policy": policy, "num_kv_blocks": 2048, "block_size": 16, "max_num_batched_tokens": 256},
        "piggyback": {"num_host_kv_blocks": 1024, "max_be_requests": 64, "num_cpu_workers": 1,
                      "cpu_threads_per_worker": 1, "max_be_rows_per_layer": 64},
        "slo_control": {"max_be_queue": 10000},
    })  # fmt: skip


def workload(duration_s: float, ls_rate: float, be_count: int, seed: int) -> dict[str, Any]:
    return {"seed": seed, "duration_s": duration_s, "sources": [
        {"kind": "poisson", "service": "chat", "class": "LS", "rate_per_s": ls_rate,
         "lengths": {"kind": "lognormal", "mean_prompt_tokens": 48, "mean_output_tokens": 24, "sigma_prompt": 0.5,
                     "sigma_output": 0.5, "max_prompt_tokens": 256, "max_output_tokens": 96}},
        {"kind": "batch", "service": "batch", "class": "BE", "count": be_count,
         "lengths": {"kind": "lognormal", "mean_prompt_tokens": 256, "mean_output_tokens": 48, "sigma_prompt": 0.3,
                     "sigma_output": 0.3, "max_prompt_tokens": 512, "max_output_tokens": 96}},
    ]}  # fmt: skip


def host_of_this_machine(threads: int) -> HostSpec:
    from piggyback_runtime.attention.cpu_attention import stream_read_bytes_per_s

    read_gb_s = stream_read_bytes_per_s(256 << 20, repeats=5, num_threads=threads) / 1e9
    # The CPU kernel reaches 80-90 % of the read probe here (benchmarks/results/cpu_attention.md); the
    # worker's per-task cost covers the sender thread, the pipe and the wake-up (an estimate).
    return HostSpec(cores=os.cpu_count() or 1, sockets=1, dram_bandwidth_gb_s_per_socket=read_gb_s, dram_gib=24,
                    cpu_attention_efficiency=0.85, per_task_overhead_s=150e-6)  # fmt: skip


def relative_error(simulated: float, measured: float) -> float:
    if math.isnan(simulated) or math.isnan(measured):
        return math.nan
    if measured == 0:
        return 0.0 if simulated == 0 else math.inf
    return (simulated - measured) / measured


def compare(model: str, policies: list[str], duration_s: float, ls_rate: float, be_count: int, seed: int,
            ttft_ms: float, tpot_ms: float, calibrate: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """One row per policy and figure: measured, simulated, relative error."""
    rows: list[dict[str, Any]] = []
    spec = load_workload(workload(duration_s, ls_rate, be_count, seed), "fidelity workload")
    requests = generate(spec)
    loaded = load_model(runtime_config(model, "priority", ttft_ms, tpot_ms).model, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for policy in policies:
            config = runtime_config(model, policy, ttft_ms, tpot_ms)
            engine = Engine(config, loaded)
            try:
                # The latency profile the runtime uses, measured with the threads its forward pass has.
                latency = load_or_profile(loaded)
                profile_path = latency.save(Path(tmp) / f"{policy}.json", profile_key(loaded))
                host = host_of_this_machine(config.piggyback.cpu_threads_per_worker or 1)
                # The profile times modules only; measure what an engine step costs beyond them.
                step_cost = calibrate_step_cost(engine, latency) if calibrate else StepCost(0.0, 0.0)
                measured = summary(replay(engine, requests, duration_s, drain_s=30.0, seed=seed))
            finally:
                engine.close()
            device = load_runtime_profile(profile_path, shape_for(model), host)
            # The runtime plans with its profile as written; the simulated device costs what was measured.
            truth = dataclasses.replace(device, latency_model=step_cost.apply(device.latency_model))
            simulated = summary(Simulator(config, truth, requests, duration_s, drain_s=30.0,
                                          planner_latency_model=device.latency_model).run())
            for figure in COMPARED:
                rows.append({"policy": policy, "figure": figure, "step_cost": step_cost,
                             "measured": float(measured[figure]),
                             "simulated": float(simulated[figure]),
                             "error": relative_error(float(simulated[figure]), float(measured[figure]))})
            print(f"{policy}: " + ", ".join(f"{r['figure']} {r['measured']:.3g}/{r['simulated']:.3g}"
                                             for r in rows if r["policy"] == policy), flush=True)  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'policy':10} {'figure':16} {'measured':>10} {'simulated':>10} {'error':>8}"]
    for r in rows:
        error = "-" if math.isnan(r["error"]) else f"{r['error']:+.1%}"
        lines.append(f"{r['policy']:10} {r['figure']:16} {r['measured']:10.4g} {r['simulated']:10.4g} {error:>8}")
    finite = [r for r in rows if not math.isnan(r["error"]) and math.isfinite(r["error"])]
    if finite:
        worst = max(finite, key=lambda r: abs(r["error"]))
        within = sum(abs(r["error"]) <= 0.10 for r in finite)
        lines.append(f"worst: {worst['policy']} {worst['figure']} {worst['error']:+.1%}; "
                     f"{within}/{len(finite)} figures within 10%")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 s of load, two policies")
    parser.add_argument("--policies", default=",".join(policy_names()), help="comma-separated (default: all)")
    parser.add_argument("--model", default="synthetic://small-llama")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--ls-rate", type=float, default=2.0)
    parser.add_argument("--be-count", type=int, default=3000, help="BE batch size (enough to last the run)")
    parser.add_argument("--ttft-ms", type=float, default=2000)
    parser.add_argument("--tpot-ms", type=float, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-calibrate", action="store_true", help="simulate on the profile as written")
    args = parser.parse_args()
    policies = ["piggyback", "priority"] if args.quick else args.policies.split(",")
    duration = 20.0 if args.quick else args.duration_s
    rows = compare(args.model, policies, duration, args.ls_rate, args.be_count, args.seed, args.ttft_ms,
                   args.tpot_ms, calibrate=not args.no_calibrate)  # fmt: skip
    text = table(rows)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sim_fidelity.md").write_text(
            f"# Simulator fidelity on this machine\n\n`python benchmarks/sim_fidelity.py` on {cpu_model_name()} "
            f"({os.cpu_count()} cores), {args.model}, {duration:.0f} s of LS Poisson {args.ls_rate}/s + a BE "
            f"batch of {args.be_count}; SLO TTFT {args.ttft_ms:.0f} ms, TPOT {args.tpot_ms:.0f} ms.\n"
            "Error = (simulated - measured) / measured.\n\n```\n" + text + "\n```\n"
        )  # fmt: skip


if __name__ == "__main__":
    main()
