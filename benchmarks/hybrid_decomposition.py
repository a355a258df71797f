"""Where the default policy's BE tokens go, iteration by iteration (issue #25's diagnosis).

Runs one regime-map cell's `hybrid` simulation and records, for every iteration: the tokens it carried split
into LS decode / LS prefill / BE prefill / BE accelerator decode / CPU (host-resident) rows that finished a
token, the iteration time, the token budget and the plan's BE rows per layer cap, why the budget was what it was
(the SLO controller's binding constraint), host-resident rows, the BE queue and HBM use. Prints a table per time
window and a whole-run decomposition:

    python benchmarks/hybrid_decomposition.py --cell "70B-H100x4 light dailymail host" --horizon-s 150
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from piggyback_runtime.sim.scenario import build_simulator, load_scenario
from piggyback_runtime.sim.simulator import Simulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regime_map import BUDGET_MAX, DEFAULT, ceiling, cell_name, ls_drain_s, scenario

FIELDS = ("ls_decode", "ls_prefill", "be_prefill", "be_gpu_decode", "cpu_tokens", "cpu_merged_per_layer",
          "iteration_s", "budget", "rows_cap", "host_rows", "be_queue", "be_gpu_decoders", "hbm_used",
          "hbm_reserve", "host_kv_used")  # fmt: skip


def run(cell: dict[str, Any], horizon_s: float, be_count: int, budget: int, overrides: dict[str, dict[str, Any]],
        policy: str = DEFAULT) -> tuple[list[dict[str, Any]], Any, Simulator]:  # fmt: skip
    spec = load_scenario(scenario(cell, horizon_s, be_count, ls_drain_s(cell, horizon_s, be_count), budget,
                                  overrides))  # fmt: skip
    sim = build_simulator(spec, policy=policy)  # as run_scenario builds it, so that its planner can be traced
    planner = sim.planner
    records: list[dict[str, Any]] = []
    schedule, update = planner.schedule, planner.update

    def traced_schedule(*args: Any, **kwargs: Any) -> Any:
        plan = schedule(*args, **kwargs)
        held = [*planner.scheduler.running, *planner.scheduler.waiting]
        allowance = planner.last_allowance
        records.append({
            "t": sim.now,
            "ls_decode": sum(c.request.is_ls for c in plan.decodes),
            "ls_prefill": sum(c.num_tokens for c in plan.prefills if c.request.is_ls),
            "be_prefill": sum(c.num_tokens for c in plan.prefills if not c.request.is_ls),
            "be_gpu_decode": sum(not c.request.is_ls for c in plan.decodes),
            "budget": plan.token_budget, "rows_cap": plan.be_rows_per_layer,
            "binding": allowance.binding if allowance is not None else "-",
            "host_rows": sum(n.rows for n in sim.nodes),
            "be_queue": len(planner.host_kv_waiting) + sum(not r.is_ls for r in planner.scheduler.waiting),
            "be_gpu_decoders": sum(not r.is_ls and bool(r.output_token_ids) for r in held),
            "hbm_used": 1 - planner.allocator.num_free / planner.allocator.num_blocks,
            "hbm_reserve": planner.last_hbm_reserve_blocks / planner.allocator.num_blocks,
            "host_kv_used": sim.host_kv.usage(),
            "rows_ready": kwargs.get("be_rows_ready", 0),
        })  # fmt: skip
        return plan

    def traced_update(plan: Any, outputs: Any, now: float) -> Any:
        record = records[-1]
        record["iteration_s"] = now - outputs.started_s
        record["cpu_tokens"] = len(outputs.host_path_tokens)
        record["cpu_merged_per_layer"] = outputs.be_rows_merged / outputs.num_layers
        return update(plan, outputs, now)

    planner.schedule, planner.update = traced_schedule, traced_update  # type: ignore[method-assign]
    result = sim.run()
    return [r for r in records if "iteration_s" in r and r["t"] < horizon_s], result, sim


def windows(records: list[dict[str, Any]], width_s: float) -> list[dict[str, float]]:
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        buckets[int(r["t"] // width_s)].append(r)
    out = []
    for k in sorted(buckets):
        rs = buckets[k]
        span = sum(r["iteration_s"] for r in rs)
        row: dict[str, float] = {"from_s": k * width_s, "iterations": len(rs), "gpu_busy": span / width_s}
        for f in FIELDS:
            row[f] = sum(r[f] for r in rs) / len(rs)
        row["be_tok_s"] = sum(r["be_gpu_decode"] + r["cpu_tokens"] for r in rs) / width_s
        row["cpu_tok_s"] = sum(r["cpu_tokens"] for r in rs) / width_s
        row["binding_tpot"] = sum(r["binding"] == "tpot" for r in rs) / len(rs)
        row["rows_cap_binds"] = sum(r["rows_ready"] > r["rows_cap"] for r in rs) / len(rs)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cell", default="70B-H100x4 light dailymail host")
    parser.add_argument("--horizon-s", type=float, default=150.0)
    parser.add_argument("--be-count", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=BUDGET_MAX)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--policy", default=DEFAULT, help="a baseline's name, to trace it the same way")
    args = parser.parse_args()
    device, level, be, cpu = args.cell.split()
    cell = {"device": device, "level": level, "be": be, "cpu": cpu}
    records, result, _sim = run(cell, args.horizon_s, args.be_count, args.budget, {}, args.policy)
    rows = windows(records, args.window_s)
    cols = ["from_s", "iterations", "gpu_busy", "iteration_s", "budget", "ls_decode", "ls_prefill", "be_prefill",
            "be_gpu_decode", "cpu_merged_per_layer", "cpu_tokens", "rows_cap", "rows_cap_binds", "host_rows",
            "be_gpu_decoders", "be_queue", "hbm_used", "hbm_reserve", "host_kv_used", "binding_tpot", "be_tok_s",
            "cpu_tok_s"]  # fmt: skip
    print(f"{cell_name(cell)}, {args.policy}@{args.budget}, {args.horizon_s:.0f} s: "
          f"BE {result.be_tokens_per_s:.1f} tok/s, "
          f"LS attainment {result.ls_attainment:.3f}, moves to host {result.moves_to_host}, to HBM "
          f"{result.moves_to_gpu}, host {result.host_bandwidth_b_s / 1e9:.0f} GB/s, CPU busy "
          f"{result.cpu_busy_share:.2f}")  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    n = len(records)
    total_s = sum(r["iteration_s"] for r in records)
    print(f"whole horizon: {n} iterations, GPU busy {total_s / args.horizon_s:.2f}, mean iteration "
          f"{total_s / n * 1000:.1f} ms; per iteration: tokens {sum(r['budget'] for r in records) / n:.0f} budget, "
          + ", ".join(f"{f} {sum(r[f] for r in records) / n:.1f}" for f in
                      ("ls_decode", "ls_prefill", "be_prefill", "be_gpu_decode", "cpu_tokens",
                       "cpu_merged_per_layer")))  # fmt: skip
    c = ceiling(cell, args.horizon_s, args.be_count)
    print("ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in c.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
