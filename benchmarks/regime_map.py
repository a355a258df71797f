"""The regime map: where the default policy stands against every baseline, and against the physics, per cell.

A cell is a model on a GPU (Llama-3-8B, CodeLlama-34B / Yi-34B shape, Llama-2-70B; A100-80GB and H100), an LS
load (light / medium / heavy: Poisson arrivals with splitwise_conv.csv lengths), a BE shape (LongBench-v2-like:
~66 prompt tokens per output token; DailyMail-like: ~5) and the CPUs (the GPU host only, or 1G4C). Every cell
runs in the simulator (`piggyback_runtime.sim`: the runtime's own planner in simulated time):

- every registered policy with `max_num_batched_tokens` 512 (the configured default) and 2048, the better
  held of the two counting for the default (`hybrid`) and for each baseline alike (named `policy@budget`;
  SLO-controlled ones size their budget up to it); the default at its configured 512 is reported too;
- an ablation of the default at the 2048 bound: hybrid placement off (`engine.hybrid_placement: false`: BE
  decodes on the CPUs only), CPU pacing off (`piggyback.paced_cpu_attention: false`: one FIFO worker per
  row), the SLO-sized budget off (`engine.slo_token_budget: false`: always 2048), two sub-batches off
  (`piggyback.sub_batches: 1`: one merge point per layer);
- the cell's physical ceiling on BE tokens/s, the least of (computed from the same device figures):
  * GPU token supply: every BE token passes through the GPU's Dense layers once, as a prompt token or as an
    output token (an accelerator decode row or a merged CPU row), so BE output ≤ (GPU tokens/s at a full
    2048-token budget − LS tokens/s) × o / (p + o), with p / o the BE mean prompt / output tokens; the
    2048-token iteration holds that work in the steady state (prompt tokens at their mean position, the
    HBM-resident decode rows' attention);
  * decode: HBM-resident rows at the GPU's iteration rate (HBM left after the weights and the LS KV, over
    the BE context p + o / 2) plus host-resident rows at host DRAM bandwidth (the hosts' CPU attention
    bandwidth over the KV bytes of one token at context p + o / 2);
  * PCIe where KV moves (hybrid: at most one move a request): PCIe bytes/s over the BE KV of one request,
    times o.
  The binding one is named, with the default's BE tokens/s as a share of it.

"Held": LS attainment ≥ 0.99 or, where no policy reaches that (LS overload), within 1 point of the best any
policy reaches in that cell. Every LS request that arrives within the horizon is followed to its end: the drain
after the horizon is what an SLO-meeting request may take (its TTFT SLO + the cell's longest LS output × the
TPOT SLO), so an LS request that meets its SLOs at a slower pace (a larger token budget) is not cut off and
counted a miss. BE tokens count up to the horizon only.

    python benchmarks/regime_map.py --quick   # 3 cells × 12 runs (36 simulations of 30 s): CSV
    python benchmarks/regime_map.py           # every cell: benchmarks/results/regime_map.md, .png and .csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from piggyback_runtime.config import EngineConfig
from piggyback_runtime.hardware import cpu_model_name
from piggyback_runtime.scheduler.policies import registry
from piggyback_runtime.sim.devices import GB
from piggyback_runtime.sim.scenario import build_device, load_scenario, run_scenario
from piggyback_runtime.sim.workload import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_scenarios import CONV_TRACE, HOST, HOST_KV_GIB, REMOTE, runtime_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT = EngineConfig().policy
DEFAULT_BUDGET = EngineConfig().max_num_batched_tokens  # the default runs as configured by default: 512
POLICIES = list(registry())
BUDGET_MAX = 2048
BUDGETS = (DEFAULT_BUDGET, BUDGET_MAX)
ATTAINMENT_TARGET = 0.99
NOISE = 0.03  # "≥ 1.0× the best baseline" allows 3 % of simulation noise
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "hybrid off": {"engine": {"hybrid_placement": False}},
    "pacing off": {"piggyback": {"paced_cpu_attention": False}},
    "SLO budget off": {"engine": {"slo_token_budget": False}},
    "sub-batches off": {"piggyback": {"sub_batches": 1}},
}

# name -> (gpu, model, tp, light / medium / heavy LS rates (req/s), SLO ttft / tpot ms). The A100 rates are the
# paper scenarios'; the H100 ones scale them by the measured Dense speed-up (≈ 1.6-2.5×).
DEVICES: dict[str, tuple[str, str, int, tuple[float, float, float], tuple[int, int]]] = {
    "8B-A100x1": ("a100-80gb", "llama-3-8b", 1, (2.0, 4.0, 6.5), (2000, 200)),
    "8B-H100x1": ("h100", "llama-3-8b", 1, (3.0, 6.0, 10.0), (2000, 200)),
    "34B-A100x2": ("a100-80gb", "codellama-34b", 2, (1.0, 2.0, 3.5), (2000, 200)),
    "34B-H100x2": ("h100", "codellama-34b", 2, (1.5, 3.0, 5.5), (2000, 200)),
    "70B-A100x4": ("a100-80gb", "llama-2-70b", 4, (1.0, 2.0, 3.0), (3000, 250)),
    "70B-H100x4": ("h100", "llama-2-70b", 4, (2.0, 5.0, 7.0), (3000, 250)),
}
LEVELS = ("light", "medium", "heavy")
BE_SHAPES = ("longbench-v2", "dailymail")
CPUS = ("host", "1g4c")
# --quick: the issue's cell (70B H100, DailyMail-like, light LS), its LongBench twin, and a small model where HBM
# holds many BE rows.
QUICK_CELLS = [
    ("70B-H100x4", "light", "dailymail", "host"),
    ("70B-H100x4", "light", "longbench-v2", "host"),
    ("8B-A100x1", "medium", "dailymail", "host"),
]
# --quick: `piggyback` runs at one budget only (at 2048 it is the "hybrid off" ablation); `ls-only` (no BE at all)
# and `neo` (the accelerator waits for every CPU layer; the slowest to simulate, and below the best baseline
# in the quick cells when it last ran there) not at all: the full map runs both.
QUICK_ONE_BUDGET = {"piggyback"}
QUICK_SKIPPED = {"ls-only", "neo"}


# --- one simulation -------------------------------------------------------------------------------------------
def scenario(cell: dict[str, Any], horizon_s: float, be_count: int, drain_s: float, budget: int,
             overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    gpu, model, tp, rates, (ttft_ms, tpot_ms) = DEVICES[cell["device"]]
    device: dict[str, Any] = {"gpu": gpu, "model": model, "tp": tp, "host": dict(HOST)}
    if cell["cpu"] == "1g4c":
        device["remote"] = dict(REMOTE)
    runtime = runtime_section(model, (ttft_ms, tpot_ms), budget, HOST_KV_GIB[cell["cpu"]])
    for section, fields in overrides.items():
        runtime[section] = {**runtime.get(section, {}), **fields}
    return {
        "drain_s": drain_s,
        "runtime": runtime,
        "device": device,
        "workload": {"seed": 1, "duration_s": horizon_s, "sources": [
            {"kind": "trace", "service": "chat", "class": "LS", "path": str(CONV_TRACE),
             "rate_per_s": rates[LEVELS.index(cell["level"])]},
            {"kind": "batch", "service": "batch", "class": "BE", "count": be_count,
             "lengths": {"kind": "preset", "name": cell["be"]}},
        ]},
    }  # fmt: skip


def runs_of(cell: dict[str, Any], quick: bool) -> list[tuple[str, str, int, dict[str, dict[str, Any]]]]:
    """(label, policy, budget, runtime overrides) of every simulation a cell needs."""
    runs = []
    for policy in POLICIES:
        if quick and policy in QUICK_SKIPPED:
            continue
        budgets = (DEFAULT_BUDGET,) if quick and policy in QUICK_ONE_BUDGET else BUDGETS
        runs += [(f"{policy}@{b}", policy, b, {}) for b in budgets]
    runs += [(f"{DEFAULT} ({name})", DEFAULT, BUDGET_MAX, o) for name, o in ABLATIONS.items()]
    return runs


def simulate(job: tuple[dict[str, Any], str, str, int, dict, float, int, float]) -> dict[str, Any]:
    cell, label, policy, budget, overrides, horizon_s, be_count, drain_s = job
    started = time.perf_counter()
    spec = load_scenario(scenario(cell, horizon_s, be_count, drain_s, budget, overrides))
    result = run_scenario(spec, policy=policy)
    return {"cell": cell_name(cell), "run": label, "policy": policy, "budget": budget,
            "ls_attainment": result.ls_attainment, "be_tokens_per_s": result.be_tokens_per_s,
            "host_bandwidth_gb_s": result.host_bandwidth_b_s / 1e9, "cpu_busy_share": result.cpu_busy_share,
            "wall_s": time.perf_counter() - started}  # fmt: skip


def ls_drain_s(cell: dict[str, Any], horizon_s: float, be_count: int) -> float:
    """Time after the horizon for every LS request that arrived within it to finish at its SLOs' pace."""
    _, _, _, _, (ttft_ms, tpot_ms) = DEVICES[cell["device"]]
    spec = load_scenario(scenario(cell, horizon_s, be_count, 0.0, DEFAULT_BUDGET, {}))
    longest = max((r.output_tokens for r in generate(spec.workload) if r.service_class == "LS"), default=0)
    return (ttft_ms + longest * tpot_ms) / 1000


def cell_name(cell: dict[str, Any]) -> str:
    return f"{cell['device']} {cell['level']} {cell['be']} {cell['cpu']}"


# --- the physical ceiling -----------------------------------------------------------------------------------------
def ceiling(cell: dict[str, Any], horizon_s: float, be_count: int, budget: int = BUDGET_MAX) -> dict[str, Any]:
    """The cell's BE tokens/s ceilings (module docstring; at a `budget`-token iteration, 2048 by default) and
    the binding one."""
    spec = load_scenario(scenario(cell, horizon_s, be_count, 0.0, budget, {}))
    device = build_device(spec.device)
    requests = generate(spec.workload)
    ls = [r for r in requests if r.service_class == "LS"]
    be = [r for r in requests if r.service_class == "BE"]
    p = sum(r.prompt_tokens for r in be) / len(be)
    o = sum(r.output_tokens for r in be) / len(be)
    ls_p = sum(r.prompt_tokens for r in ls) / max(1, len(ls))
    ls_o = sum(r.output_tokens for r in ls) / max(1, len(ls))
    ls_rate = len(ls) / horizon_s
    context = p + o / 2
    # The HBM-resident rows' iteration period: a full budget of BE work in the steady state, decode rows and
    # prompt tokens in the ratio o : p; the prompt tokens at their mean position in the prompt (a chunk late in
    # a long prompt attends to all before it: load (p + 1) / 2 a token); the decode rows' attention over their
    # contexts. (A chunk from position 0 with no decode attention, the earlier figure, ran 10-20 % faster than
    # any iteration of that work can.)
    rows = budget * o / (p + o)
    prompt_tokens = budget - rows
    cache_tokens = device.gpu_kv_capacity_tokens()
    # LS KV in HBM (Little's law: arrival rate × lifetime, lifetime ≈ outputs at one iteration each).
    first_iteration_s = device.iteration_s(budget, prompt_tokens * (p + 1) / 2, [], 1)
    ls_kv_tokens = ls_rate * ls_o * first_iteration_s * (ls_p + ls_o / 2)
    hbm_rows = max(0.0, cache_tokens - ls_kv_tokens) / context
    gpu_rows = int(min(rows, hbm_rows))
    iteration_s = device.iteration_s(budget, prompt_tokens * (p + 1) / 2, [int(context)] * gpu_rows,
                                     int(rows) + 1)  # fmt: skip
    gpu_tokens_s = budget / iteration_s
    supply = max(0.0, gpu_tokens_s - ls_rate * (ls_p + ls_o)) * o / (p + o)
    kv_token = device.shape.kv_bytes_per_token()
    host_bw = device.host_attention_bandwidth_b_s() + device.remote_bandwidth_b_s()
    decode = hbm_rows / iteration_s + host_bw / (kv_token * context)
    pcie = device.tp * device.gpu.pcie_gb_s * GB / (kv_token * context) * o
    limits = {"GPU token supply": supply, "HBM+host decode": decode, "PCIe": pcie}
    binding = min(limits, key=lambda k: limits[k])
    return {"ceiling": limits[binding], "binding": binding, **limits}


# --- reports ------------------------------------------------------------------------------------------------------
def held(att: float, best_att: float) -> bool:
    return att >= ATTAINMENT_TARGET or att >= best_att - 0.01


def summarize(cells: list[dict[str, Any]], rows: list[dict[str, Any]], ceilings: dict[str, dict]) -> list[dict]:
    out = []
    for cell in cells:
        name = cell_name(cell)
        runs = {r["run"]: r for r in rows if r["cell"] == name}
        best_att = max(r["ls_attainment"] for r in runs.values())
        configured = runs[f"{DEFAULT}@{DEFAULT_BUDGET}"]
        defaults = [r for label, r in runs.items() if r["policy"] == DEFAULT and "(" not in label]
        held_defaults = [r for r in defaults if held(r["ls_attainment"], best_att)]
        default = max(held_defaults or defaults, key=lambda r: r["be_tokens_per_s"])
        baselines = [r for label, r in runs.items() if r["policy"] != DEFAULT and "(" not in label
                     and held(r["ls_attainment"], best_att)]  # fmt: skip
        best = max(baselines, key=lambda r: r["be_tokens_per_s"], default=None)
        best_be = best["be_tokens_per_s"] if best else 0.0
        ratio = default["be_tokens_per_s"] / best_be if best_be > 0 else math.inf
        c = ceilings[name]
        share = default["be_tokens_per_s"] / c["ceiling"] if c["ceiling"] > 0 else math.nan
        out.append({
            "cell": name, "default_run": default["run"], "default_held": held(default["ls_attainment"], best_att),
            "default_att": default["ls_attainment"], "default_be": default["be_tokens_per_s"],
            "default_at_512_be": configured["be_tokens_per_s"],
            "best_baseline": best["run"] if best else "-", "best_baseline_be": best_be,
            "ratio": ratio, "meets_1x": ratio >= 1 - NOISE,
            **{f"ablation {k}": runs[f"{DEFAULT} ({k})"]["be_tokens_per_s"] for k in ABLATIONS},
            "ceiling": c["ceiling"], "binding": c["binding"], "share_of_ceiling": share,
        })  # fmt: skip
    return out


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def summary_table(summary: list[dict]) -> str:
    header = ["cell", DEFAULT, "held (att)", "BE tok/s", f"{DEFAULT}@{DEFAULT_BUDGET}", "best held baseline",
              "its BE tok/s", "ratio", *[f"{k} (@{BUDGET_MAX})" for k in ABLATIONS], "ceiling (binding)",
              "share of ceiling"]  # fmt: skip
    body = [[s["cell"], s["default_run"], f"{'yes' if s['default_held'] else 'NO'} ({s['default_att']:.3f})",
             f"{s['default_be']:.1f}", f"{s['default_at_512_be']:.1f}",
             s["best_baseline"], f"{s['best_baseline_be']:.1f}", f"{s['ratio']:.2f}×",
             *[f"{s[f'ablation {k}']:.1f}" for k in ABLATIONS], f"{s['ceiling']:.0f} ({s['binding']})",
             f"{s['share_of_ceiling']:.0%}"] for s in summary]  # fmt: skip
    return md_table(header, body)


def policy_table(rows: list[dict[str, Any]]) -> str:
    header = ["cell", "run", "LS attainment", "BE tok/s", "host GB/s", "CPU busy"]
    body = [[r["cell"], r["run"], f"{r['ls_attainment']:.3f}", f"{r['be_tokens_per_s']:.1f}",
             f"{r['host_bandwidth_gb_s']:.0f}", f"{r['cpu_busy_share']:.2f}"] for r in rows]  # fmt: skip
    return md_table(header, body)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(summary)), 5))
    xs = range(len(summary))
    ax.bar([x - 0.2 for x in xs], [s["default_be"] for s in summary], 0.4, label=DEFAULT)
    ax.bar([x + 0.2 for x in xs], [s["best_baseline_be"] for s in summary], 0.4, label="best held baseline")
    ax.scatter(list(xs), [s["ceiling"] for s in summary], marker="_", s=400, color="k", label="ceiling")
    ax.set_xticks(list(xs), [s["cell"].replace(" ", "\n", 2) for s in summary], fontsize=6)
    ax.set_ylabel("BE tokens/s")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def all_cells(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [dict(zip(("device", "level", "be", "cpu"), c, strict=True)) for c in QUICK_CELLS]
    return [{"device": d, "level": lv, "be": be, "cpu": cpu}
            for d in DEVICES for lv in LEVELS for be in BE_SHAPES for cpu in CPUS]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a representative subset (CSV only)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--horizon-s", type=float, default=None)
    parser.add_argument("--be-count", type=int, default=None, help="BE requests queued at 0 (300 quick, else 1000)")
    parser.add_argument("--out", type=Path, default=None, help="the CSV (default under benchmarks/results/)")
    args = parser.parse_args()
    horizon = args.horizon_s or (30.0 if args.quick else 150.0)
    be_count = args.be_count or (300 if args.quick else 1000)
    cells = all_cells(args.quick)
    drains = {cell_name(c): ls_drain_s(c, horizon, be_count) for c in cells}
    jobs = [(cell, label, policy, budget, overrides, horizon, be_count, drains[cell_name(cell)])
            for cell in cells for label, policy, budget, overrides in runs_of(cell, args.quick)]  # fmt: skip
    print(f"{len(cells)} cells, {len(jobs)} simulations of {horizon:.0f} s, {args.jobs} processes", flush=True)
    started = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for n, row in enumerate(pool.map(simulate, jobs), 1):
            rows.append(row)
            if n % 6 == 0:
                print(f"  {n}/{len(jobs)} simulations, {time.perf_counter() - started:.0f} s", flush=True)
    wall = time.perf_counter() - started
    ceilings = {cell_name(c): ceiling(c, horizon, be_count) for c in cells}
    summary = summarize(cells, rows, ceilings)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / ("regime_map_quick.csv" if args.quick else "regime_map.csv")
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    with out.with_name(out.stem + "_runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summary_table(summary)
    print(table)
    print(f"\nwall {wall:.0f} s on {cpu_model_name()}; CSV: {out}")
    if args.quick:
        return
    command = "python benchmarks/regime_map.py"
    text = (f"# Regime map: the default policy (`{DEFAULT}`) against every baseline\n\nCommand: `{command}` — "
            f"{datetime.date.today()}, {cpu_model_name()}, {len(jobs)} simulations of {horizon:.0f} s in "
            f"{wall:.0f} s.\n\n{__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0]}\n## Per cell\n\n"
            f"{table}\n\n## Every run\n\n{policy_table(rows)}\n")  # fmt: skip
    (RESULTS / "regime_map.md").write_text(text)
    plot(summary, RESULTS / "regime_map.png")


if __name__ == "__main__":
    main()
