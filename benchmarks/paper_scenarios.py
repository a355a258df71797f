"""The OmniServe paper's comparisons, run in the discrete-event simulator with every policy.

What runs (`piggyback_runtime.sim`: the runtime's own planner in simulated time; Dense and all-reduce GPU
timings are Vidur's measured operator data, GPU attention is analytic, CPU attention is KV bytes over host DRAM
bandwidth):

1. Paper comparisons: Llama-2-70B TP4 on 4×A100-80GB and on 4×H100; the Yi-34B shape (codellama-34b) TP2 on
   A100. LS: lengths of Splitwise's conversation trace (splitwise_conv.csv) with Poisson arrivals at three rates
   (light → heavy for that device), and plain Poisson ShareGPT-like at the middle rate. BE: a LongBench-v2-like
   batch large enough never to run out within the horizon. SLOs: TTFT 3 s / TPOT 0.25 s (70B), TTFT 2 s /
   TPOT 0.2 s (34B), and the tight TPOT 0.15 s. CPUs: the GPU host only (24 cores, 2 sockets × 200 GB/s,
   400 GiB) and 1G4C (plus 4 CPU-only nodes over 100 Gbps, each the same 24-core / 400 GB/s / 400 GiB box as
   in the paper's testbed).
2. The regime map: Llama-2-70B TP4 H100 and Llama-3-8B on one A100: LS load × BE shape (LongBench-v2-like,
   DailyMail-like) × host-only / 1G4C; per cell the policy that moves the most BE tokens with LS SLOs held.
   The full map (8B / 34B / 70B on A100 and H100, the default's ablation and each cell's physical ceiling)
   is benchmarks/regime_map.py, which takes this file's testbed (HOST, REMOTE, HOST_KV_GIB, CONV_TRACE).
3. A speed test: 30 simulated minutes, ~10,000 requests, Llama-2-70B TP4 H100, policy piggyback.

    python benchmarks/paper_scenarios.py [--quick] [--speed-only] [--jobs 2]

Writes benchmarks/results/paper_scenarios.md and .png (not with --quick unless --write).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from piggyback_runtime.hardware import cpu_model_name
from piggyback_runtime.scheduler.policies import registry
from piggyback_runtime.sim.scenario import load_scenario, run_scenario, summary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONV_TRACE = Path("/work/shared/data/vidur/processed_traces/splitwise_conv.csv")
if not CONV_TRACE.exists():
    CONV_TRACE = ROOT.parent / "shared" / "data" / "vidur" / "processed_traces" / "splitwise_conv.csv"
POLICIES = list(registry())  # every policy in scheduler/policies/, in listing order
# Never touch the host path (so the CPUs do not matter): priority, ls-only, headroom.
BASELINES_GPU_ONLY = {name for name, policy in registry().items() if not policy.host_path_classes}
ATTAINMENT_TARGET = 0.99

# The paper's testbed CPU (Xeon Gold 6342 class): 24 cores, 2 sockets at 200 GB/s, 400 GiB DRAM.
HOST = {"cores": 24, "sockets": 2, "dram_bandwidth_gb_s_per_socket": 200, "dram_gib": 400}
# 1G4C: 4 CPU-only nodes of the same kind over 100 Gbps (the preset's network; its 128-core 1 TiB nodes are not
# the paper's, so the per-node figures are overridden).
REMOTE = {"preset": "1g4c", "cores_per_node": 24, "dram_bandwidth_gb_s_per_node": 400, "dram_gib_per_node": 400}
HOST_KV_GIB = {"host": 400, "1g4c": 400 + 4 * 400}  # run_scenario takes min(this, 80% of all DRAM)

# name -> (gpu, model, tp, light/mid/heavy LS rates (req/s, chosen from ls-only's knee), loose SLO ms)
DEVICES: dict[str, tuple[str, str, int, tuple[float, float, float], tuple[int, int]]] = {
    "70B-A100x4": ("a100-80gb", "llama-2-70b", 4, (1.0, 2.0, 3.0), (3000, 250)),
    "70B-H100x4": ("h100", "llama-2-70b", 4, (2.0, 5.0, 7.0), (3000, 250)),
    "34B-A100x2": ("a100-80gb", "codellama-34b", 2, (1.0, 2.0, 3.5), (2000, 200)),
    "8B-A100x1": ("a100-80gb", "llama-3-8b", 1, (2.0, 4.0, 6.5), (2000, 200)),
}
TIGHT_TPOT_MS = 150


# --- one simulation ---------------------------------------------------------------------------------------------
def runtime_section(model: str, slo_ms: tuple[float, float], budget: int, host_kv_gib: float,
                    max_be_requests: int = 1024) -> dict[str, Any]:  # fmt: skip
    """The simulated runtime every paper-style benchmark runs (this file, regime_map.py, remote_nodes.py): an LS
    chat service with its (TTFT, TPOT) SLO in ms and a BE batch service on a synthetic `model`."""
    ttft_ms, tpot_ms = slo_ms
    return {
        "model": {"uri": f"synthetic://{model}"},
        "services": [{"name": "chat", "class": "LS", "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms}},
                     {"name": "batch", "class": "BE"}],
        "engine": {"max_num_batched_tokens": budget, "max_num_seqs": 512},
        "piggyback": {"host_kv_memory_gib": host_kv_gib, "max_be_requests": max_be_requests,
                      "max_be_rows_per_layer": 512, "num_cpu_workers": 2},
        "slo_control": {"max_be_queue": 100000},
    }  # fmt: skip


def scenario(case: dict[str, Any], horizon_s: float, be_count: int, drain_s: float = 60.0) -> dict[str, Any]:
    gpu, model, tp, _, _ = DEVICES[case["device"]]
    ttft_ms, tpot_ms = case["slo"]
    if case["ls"] == "conv":
        ls_source = {"kind": "trace", "service": "chat", "class": "LS", "path": str(CONV_TRACE),
                     "rate_per_s": case["rate"]}  # fmt: skip
    else:
        ls_source = {"kind": "poisson", "service": "chat", "class": "LS", "rate_per_s": case["rate"],
                     "lengths": {"kind": "preset", "name": "sharegpt-like"}}  # fmt: skip
    device: dict[str, Any] = {"gpu": gpu, "model": model, "tp": tp, "host": dict(HOST)}
    if case["cpu"] == "1g4c":
        device["remote"] = dict(REMOTE)
    return {
        "drain_s": drain_s,
        "runtime": runtime_section(model, (ttft_ms, tpot_ms), 512, HOST_KV_GIB[case["cpu"]]),
        "device": device,
        "workload": {"seed": 1, "duration_s": horizon_s, "sources": [
            ls_source,
            {"kind": "batch", "service": "batch", "class": "BE", "count": be_count,
             "lengths": {"kind": "preset", "name": case["be"]}},
        ]},
    }  # fmt: skip


def canonical(case: dict[str, Any]) -> tuple:
    """The key of the simulation a case needs: GPU-only baselines ignore the CPUs and the SLO (only the
    attainment figure depends on the SLO, recomputed from the records); neo ignores the SLO."""
    policy = case["policy"]
    cpu = "host" if policy in BASELINES_GPU_ONLY else case["cpu"]
    slo = DEVICES[case["device"]][4] if policy != "piggyback" else case["slo"]
    return (case["device"], case["ls"], case["rate"], case["be"], cpu, tuple(slo), policy)


def simulate(key: tuple, horizon_s: float, be_count: int, drain_s: float) -> dict[str, Any]:
    device, ls, rate, be, cpu, slo, policy = key
    case = {"device": device, "ls": ls, "rate": rate, "be": be, "cpu": cpu, "slo": slo, "policy": policy}
    started = time.perf_counter()
    result = run_scenario(load_scenario(scenario(case, horizon_s, be_count, drain_s)), policy=policy)
    out = summary(result)
    out["cpu_busy_share"] = result.cpu_busy_share
    out["wall_s"] = time.perf_counter() - started
    out["ls_records"] = [(r.rejected is not None, r.finished_s is not None, r.ttft_s, r.tpot_s)
                         for r in result.of("LS")]  # fmt: skip
    return out


def attainment(records: list[tuple], ttft_s: float, tpot_s: float) -> float:
    ok = sum(1 for rejected, finished, ttft, tpot in records
             if not rejected and finished and ttft is not None and ttft <= ttft_s and (tpot is None or tpot <= tpot_s))
    return ok / len(records) if records else 1.0


def run_all(
    cases: list[dict[str, Any]], horizon_s: float, be_count: int, drain_s: float, jobs: int
) -> dict[tuple, dict[str, Any]]:
    keys = sorted({canonical(c) for c in cases}, key=lambda k: k[-1] != "neo")  # slowest first
    print(f"{len(cases)} cases -> {len(keys)} simulations, horizon {horizon_s:.0f} s + drain {drain_s:.0f} s, "
          f"{jobs} processes", flush=True)  # fmt: skip
    done: dict[tuple, dict[str, Any]] = {}
    started = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        futures = {k: pool.submit(simulate, k, horizon_s, be_count, drain_s) for k in keys}
        for n, (key, future) in enumerate(futures.items(), 1):
            done[key] = future.result()
            if n % 10 == 0 or n == len(keys):
                print(f"  {n}/{len(keys)} simulations, {time.perf_counter() - started:.0f} s", flush=True)
    return done


def figures(case: dict[str, Any], sims: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    sim = sims[canonical(case)]
    ttft_ms, tpot_ms = case["slo"]
    out = {k: v for k, v in sim.items() if k != "ls_records"}
    out["ls_attainment"] = attainment(sim["ls_records"], ttft_ms / 1000, tpot_ms / 1000)
    return out


# --- the experiment grid ----------------------------------------------------------------------------------------
def comparison_cells(quick: bool) -> list[dict[str, Any]]:
    """One cell = device × LS workload × CPU config × SLO; every policy runs in it."""
    cells = []
    devices = ["70B-H100x4"] if quick else ["70B-A100x4", "70B-H100x4", "34B-A100x2"]
    for dev in devices:
        rates, loose = DEVICES[dev][3], DEVICES[dev][4]
        ls_loads = [("conv", r) for r in ((rates[0], rates[2]) if quick else rates)]
        if not quick:
            ls_loads.append(("sharegpt-like", rates[1]))
        for ls, rate in ls_loads:
            for cpu in ("host", "1g4c"):
                for slo in (loose, (loose[0], TIGHT_TPOT_MS)):
                    cells.append({"device": dev, "ls": ls, "rate": rate, "be": "longbench-v2", "cpu": cpu,
                                  "slo": slo})  # fmt: skip
    return cells


def regime_cells(quick: bool) -> list[dict[str, Any]]:
    cells = []
    for dev in ["70B-H100x4", "8B-A100x1"]:
        rates, loose = DEVICES[dev][3], DEVICES[dev][4]
        for level, rate in zip(("light", "mid", "heavy"), rates, strict=True):
            if quick and level == "mid":
                continue
            for be in ("longbench-v2", "dailymail"):
                for cpu in ("host", "1g4c"):
                    if quick and dev == "8B-A100x1" and cpu == "1g4c":
                        continue
                    cells.append({"device": dev, "ls": "conv", "rate": rate, "level": level, "be": be,
                                  "cpu": cpu, "slo": loose})  # fmt: skip
    return cells


def with_policies(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**c, "policy": p} for c in cells for p in POLICIES]


# --- reports ----------------------------------------------------------------------------------------------------
def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


def md_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def held(att: float, best_att: float) -> bool:
    """LS SLOs held: attainment ≥ 0.99, or (when no policy reaches that: LS overload) within 1 point of the best
    attainment any policy reaches in the cell (ls-only is no bar there: it has no admission control)."""
    return att >= min(ATTAINMENT_TARGET, best_att - 0.01)


def comparison_report(cells: list[dict[str, Any]], sims: dict[tuple, dict[str, Any]]) -> tuple[str, list[dict]]:
    header = ["device", "LS", "rate", "CPUs", "SLO ttft/tpot", *[f"att {p}" for p in POLICIES],
              *[f"BE tok/s {p}" for p in POLICIES], "BE pig/headroom", "att pig-lsonly", "att pig/headroom"]
    rows, records = [], []
    for cell in cells:
        f = {p: figures({**cell, "policy": p}, sims) for p in POLICIES}
        pig, head, lso = f["piggyback"], f["headroom"], f["ls-only"]
        rec = {"cell": cell, "f": f, "be_ratio": ratio(pig["be_tokens_per_s"], head["be_tokens_per_s"]),
               "att_gap": pig["ls_attainment"] - lso["ls_attainment"],
               "att_ratio": ratio(pig["ls_attainment"], head["ls_attainment"])}  # fmt: skip
        records.append(rec)
        rows.append([cell["device"], cell["ls"], fmt(cell["rate"]), cell["cpu"], f"{cell['slo'][0]}/{cell['slo'][1]}",
                     *[fmt(f[p]["ls_attainment"]) for p in POLICIES],
                     *[fmt(f[p]["be_tokens_per_s"]) for p in POLICIES],
                     fmt(rec["be_ratio"]), f"{rec['att_gap']:+.3f}", fmt(rec["att_ratio"])])  # fmt: skip
    return md_table(header, rows), records


def diagnostics_table(cells: list[dict[str, Any]], sims: dict[tuple, dict[str, Any]]) -> str:
    """The simulator outputs that explain the ratios, for piggyback and headroom (loose SLO cells only)."""
    header = ["device", "LS", "rate", "CPUs", "policy", "gpu busy", "host GB/s", "cpu busy", "host KV peak",
              "BE ttft p50 s", "BE tpot p50 s", "LS tpot p99 s", "LS rejected"]  # fmt: skip
    rows = []
    for cell in cells:
        if cell["slo"][1] == TIGHT_TPOT_MS:
            continue
        for p in ("piggyback", "headroom", "neo"):
            if p == "headroom" and cell["cpu"] != "host":
                continue
            f = figures({**cell, "policy": p}, sims)
            rows.append([cell["device"], cell["ls"], fmt(cell["rate"]), cell["cpu"], p, fmt(f["gpu_busy_share"]),
                         fmt(f["host_bandwidth_gb_s"]), fmt(f["cpu_busy_share"]), fmt(f["host_kv_usage_peak"]),
                         fmt(f["be_ttft_p50_s"]), fmt(f["be_tpot_p50_s"]), fmt(f["ls_tpot_p99_s"]),
                         str(int(f["ls_rejected"]))])  # fmt: skip
    return md_table(header, rows)


def claims_table(records: list[dict]) -> str:
    def best(selector, key, fn=max):
        chosen = [r for r in records if selector(r)]
        return fn(chosen, key=key) if chosen else None

    def where(r):
        c = r["cell"]
        return f"{c['device']} {c['ls']}@{fmt(c['rate'])}/s {c['cpu']} tpot {c['slo'][1]} ms" if r else "-"

    remote = best(lambda r: r["cell"]["cpu"] == "1g4c" and math.isfinite(r["be_ratio"]), lambda r: r["be_ratio"])
    host = best(lambda r: r["cell"]["cpu"] == "host" and math.isfinite(r["be_ratio"]), lambda r: r["be_ratio"])
    gap = best(lambda r: True, lambda r: abs(min(0.0, r["att_gap"])))
    gaps = [r["att_gap"] for r in records]
    tight = best(lambda r: r["cell"]["slo"][1] == TIGHT_TPOT_MS and math.isfinite(r["att_ratio"]),
                 lambda r: r["att_ratio"])  # fmt: skip
    rows = [
        ["BE tok/s piggyback / headroom, 1G4C (max)", "up to 9.85×", fmt(remote["be_ratio"]) if remote else "-",
         where(remote)],
        ["BE tok/s piggyback / headroom, host CPUs only (max)", "3.47×", fmt(host["be_ratio"]) if host else "-",
         where(host)],
        ["LS attainment piggyback − ls-only (worst; mean)", "within 0.6%",
         f"{min(gaps):+.3f}; {sum(gaps) / len(gaps):+.3f}" if gaps else "-", where(gap)],
        ["LS attainment piggyback / headroom at TPOT 0.15 s (max)", "up to 1.48×",
         fmt(tight["att_ratio"]) if tight else "-", where(tight)],
    ]  # fmt: skip
    return md_table(["claim", "paper", "ours", "where (our best/worst cell)"], rows)


def regime_report(cells: list[dict[str, Any]], sims: dict[tuple, dict[str, Any]]) -> tuple[str, list[dict]]:
    header = ["device", "LS load", "rate", "BE", "CPUs", *[f"BE tok/s {p}" for p in POLICIES],
              *[f"att {p}" for p in POLICIES], "winner", "why"]  # fmt: skip
    rows, out = [], []
    for cell in cells:
        f = {p: figures({**cell, "policy": p}, sims) for p in POLICIES}
        best = max(f[p]["ls_attainment"] for p in POLICIES)
        ok = [p for p in POLICIES if held(f[p]["ls_attainment"], best)]
        winner = max(ok, key=lambda p: f[p]["be_tokens_per_s"]) if ok else "none"
        if winner != "none" and f[winner]["be_tokens_per_s"] <= 0:
            winner = "ls-only" if "ls-only" in ok else winner
        why = explain(winner, f, ok)
        out.append({"cell": cell, "f": f, "winner": winner, "held": ok})
        rows.append([cell["device"], cell["level"], fmt(cell["rate"]), cell["be"], cell["cpu"],
                     *[fmt(f[p]["be_tokens_per_s"]) for p in POLICIES],
                     *[("*" if p in ok else "") + fmt(f[p]["ls_attainment"]) for p in POLICIES],
                     winner, why])  # fmt: skip
    return md_table(header, rows), out


def explain(winner: str, f: dict[str, dict[str, Any]], ok: list[str]) -> str:
    pig, head = f["piggyback"], f["headroom"]
    lost = [p for p in POLICIES if p not in ok]
    tail = f"; misses SLO: {','.join(lost)}" if lost else ""
    if winner == "piggyback":
        return (f"host path adds BE concurrency (host KV peak {pig['host_kv_usage_peak']:.2f}, "
                f"{pig['host_bandwidth_gb_s']:.0f} GB/s) while admission keeps LS{tail}")
    if winner in ("headroom", "priority"):
        return (f"BE decode in HBM is faster than the per-layer lag (BE TPOT {f[winner]['be_tpot_p50_s']:.2g} s vs "
                f"piggyback {pig['be_tpot_p50_s']:.2g} s; piggyback host KV peak {pig['host_kv_usage_peak']:.2f}, "
                f"{pig['host_bandwidth_gb_s']:.0f} GB/s){tail}")
    if winner == "neo":
        return f"synchronous CPU attention keeps BE rows moving every iteration{tail}"
    if winner == "ls-only":
        return f"no BE policy holds LS SLOs with BE tokens (headroom att {head['ls_attainment']:.3f}){tail}"
    return f"LS overloaded for every policy{tail}"


# --- the plot ---------------------------------------------------------------------------------------------------
def plot(regimes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['cell']['device']}\n{r['cell']['level']} {r['cell']['be'][:8]}\n{r['cell']['cpu']}" for r in regimes]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.9 * len(regimes)), 9), sharex=True)
    width = 0.8 / len(POLICIES)
    for i, p in enumerate(POLICIES):
        xs = [j + (i - len(POLICIES) / 2 + 0.5) * width for j in range(len(regimes))]
        axes[0].bar(xs, [max(r["f"][p]["be_tokens_per_s"], 1e-2) for r in regimes], width, label=p)
        axes[1].bar(xs, [r["f"][p]["ls_attainment"] for r in regimes], width, label=p)
    for j, r in enumerate(regimes):
        axes[0].annotate("★", (j, 1), ha="center", fontsize=8) if r["winner"] == "piggyback" else None
    axes[0].set_yscale("log")
    axes[0].set_ylabel("BE output tok/s (log)")
    axes[0].set_title("Regime map: BE throughput and LS SLO attainment per policy (simulated; ★ piggyback wins)")
    axes[0].legend(ncol=5, fontsize=8)
    axes[1].axhline(ATTAINMENT_TARGET, color="k", lw=0.8, ls="--")
    axes[1].set_ylabel("LS SLO attainment")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xticks(range(len(regimes)))
    axes[1].set_xticklabels(labels, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the speed test ---------------------------------------------------------------------------------------------
SPEED_CMD = "python benchmarks/paper_scenarios.py --speed-only"


def speed_test(duration_s: float = 1800.0, rate: float = 5.5) -> dict[str, Any]:
    data = scenario({"device": "70B-H100x4", "ls": "sharegpt-like", "rate": rate, "be": "longbench-v2",
                     "cpu": "host", "slo": (3000, 250)}, duration_s, 300)  # fmt: skip
    started = time.perf_counter()
    result = run_scenario(load_scenario(data), policy="piggyback")
    wall = time.perf_counter() - started
    s = summary(result)
    out = {"wall_s": wall, "requests": len(result.records), "iterations": result.iterations,
           "simulated_s": result.end_s, "ls_attainment": s["ls_attainment"], "be_tokens_per_s": s["be_tokens_per_s"]}
    print(f"speed: {out['requests']} requests, {duration_s:.0f} s simulated ({out['simulated_s']:.0f} s with drain), "
          f"{out['iterations']} iterations in {wall:.1f} s wall (target < 60 s); LS attainment "
          f"{out['ls_attainment']:.3f}, BE {out['be_tokens_per_s']:.1f} tok/s", flush=True)  # fmt: skip
    return out


# --- findings ---------------------------------------------------------------------------------------------------
def findings(records: list[dict], regimes: list[dict]) -> list[str]:
    lines = []
    remote = [r for r in records if r["cell"]["cpu"] == "1g4c"]
    host = [r for r in records if r["cell"]["cpu"] == "host"]
    for name, group in (("1G4C", remote), ("host only", host)):
        finite = [r["be_ratio"] for r in group if math.isfinite(r["be_ratio"]) and r["be_ratio"] == r["be_ratio"]]
        if finite:
            wins = sum(1 for x in finite if x > 1)
            lines.append(f"BE piggyback/headroom, {name}: median {sorted(finite)[len(finite) // 2]:.2f}×, max "
                         f"{max(finite):.2f}×; piggyback moves more BE tokens in {wins}/{len(finite)} cells "
                         f"(headroom 0 tok/s cells excluded: {len(group) - len(finite)}).")  # fmt: skip
    gaps = [r["att_gap"] for r in records]
    if gaps:
        within = sum(1 for g in gaps if g >= -0.006)
        lines.append(f"LS attainment piggyback within 0.6 points of ls-only (or above) in {within}/{len(gaps)} cells.")
        lines.append(f"LS attainment piggyback − ls-only: worst {min(gaps):+.3f}, best {max(gaps):+.3f} (positive "
                     "where ls-only queues LS past the TTFT SLO and piggyback's admission rejects early instead).")
    tight = [r["att_ratio"] for r in records if r["cell"]["slo"][1] == TIGHT_TPOT_MS and math.isfinite(r["att_ratio"])]
    if tight:
        lines.append(f"LS attainment piggyback / headroom at TPOT 0.15 s: max {max(tight):.2f}×, "
                     f"min {min(tight):.2f}×.")  # fmt: skip
    counts: dict[str, int] = {}
    for r in regimes:
        counts[r["winner"]] = counts.get(r["winner"], 0) + 1
    lines.append("Regime map winners: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))
                 + f" of {len(regimes)} cells.")  # fmt: skip
    return lines


EXPLANATION = """\
Why ours differ from the paper (mechanisms; the figures are in the diagnostics and regime tables):
- GPU prefill supply binds first. Every policy prefills BE prompts on the GPU, at the lowest priority, inside the
  same 512-token budget. LongBench-v2-like BE has ~66 prompt tokens per output token, so BE decode tok/s is capped
  at (spare prefill tokens/s) / 66 whatever happens after prefill: about 37 tok/s on 4×A100 and 108 on 4×H100 at
  light LS load. Headroom and priority reach that cap by themselves (their BE KV limit never binds: priority and
  headroom are identical in every LongBench cell), so piggyback cannot beat them there, and 1G4C adds nothing
  where the cap binds (34B heavy: host-only and 1G4C give the same 3.44×). BE TTFT p50 (1-3.5 min) is the queue of
  the BE batch waiting for GPU prefill.
- Where piggyback wins BE tokens and LS attainment at once (heavy LS load on A100: 2.9-3.4× BE, 1.8-2.3× attainment),
  the cause is LS admission control, not CPU attention: ls-only, priority and headroom queue LS requests past the
  TTFT SLO and LS prefill eats the whole budget (BE starves), while piggyback rejects the LS requests it cannot
  serve (LS rejected column) and leaves budget for BE prefill. A headroom baseline with the same admission control
  would probably close most of that gap (not run here).
- The per-layer lag (H100). An H100 layer is ~0.6 ms of GPU time; BE rows that entered together move as a
  cluster, their CPU tasks queue FIFO on a worker and miss the half-layer merge deadline, so they advance one layer
  per iteration: BE TPOT 2.6-3.9 s (80 layers × ~45 ms) while the CPUs are only 10-35 % busy. Host DRAM bandwidth
  is not saturated; the lag is. With 1G4C the six workers split the clusters and rows cross many layers per pass
  (BE TPOT 0.05-0.08 s), hence 91 vs 22 tok/s at 2 req/s. On A100 (layers ~1.6 ms) the host mostly keeps up: BE TPOT
  0.13-0.37 s, about the GPU's own iteration, so piggyback ≈ headroom there (but 2.0 s in the 70B ShareGPT-like
  host-only cell: the same cliff).
- Host KV capacity does not bind: host KV peak ≈ 1 because a BE request reserves host KV when admitted, before its
  GPU prefill; with 2000 GiB (peak 0.69) the BE throughput is the same.
- HBM: with DailyMail-like BE (short prompts, 397 output tokens) BE decode in HBM runs at GPU speed and headroom /
  priority reach ~1,000 tok/s on 4×H100 at light load against piggyback's 117-221: piggyback loses clearly
  whenever LS leaves the GPU room, because its BE tokens pay the per-layer lag.
- TPOT 0.15 s never binds in our model: LS TPOT p99 is ~0.05 s (H100) and ~0.13 s (A100) for every GPU policy,
  headroom included (BE decode rows in the same token budget cost little HBM time here), so the paper's
  Llumnix-at-62 % effect does not appear; our attainment ratios at TPOT 0.15 s come from overload only.
- neo (no SLO control in our baseline, unlike the paper's "NEO enhanced with SLO control"): LS decode attention also
  runs on the CPUs and LS waits for host KV held by BE, so its LS attainment collapses in most cells; its BE tokens
  count in the regime map only where its LS SLOs held (8B, 1G4C).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid and a short horizon (< 2 min)")
    parser.add_argument("--speed-only", action="store_true", help="run only the 30-minute speed test")
    parser.add_argument("--horizon-s", type=float, default=None, help="simulated seconds per scenario")
    parser.add_argument("--drain-s", type=float, default=None, help="LS drain after the horizon")
    parser.add_argument("--be-count", type=int, default=None, help="BE batch size (never runs out)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--write", action="store_true", help="write results even with --quick")
    args = parser.parse_args()

    if args.speed_only:
        speed_test()
        return
    horizon = args.horizon_s or (45.0 if args.quick else 150.0)
    # LS requests still running at the horizon get drain_s to finish (else they count as misses): a 2048-token
    # ShareGPT-like answer at A100's ~0.13 s TPOT needs ~270 s; 60 s cut such requests off and showed up as a
    # spurious 4-point attainment loss for every BE-running policy.
    drain = args.drain_s or (60.0 if args.quick else 240.0)
    be_count = args.be_count or (400 if args.quick else 1000)
    started = time.perf_counter()
    comp_cells, reg_cells = comparison_cells(args.quick), regime_cells(args.quick)
    sims = run_all(with_policies(comp_cells) + with_policies(reg_cells), horizon, be_count, drain, args.jobs)
    comp_md, records = comparison_report(comp_cells, sims)
    diag_md = diagnostics_table(comp_cells, sims)
    claims_md = claims_table(records)
    reg_md, regimes = regime_report(reg_cells, sims)
    notes = findings(records, regimes)
    speed = None if args.quick else speed_test()
    wall = time.perf_counter() - started
    sim_wall = sum(s["wall_s"] for s in sims.values())

    print("\n## Paper comparisons (attainment at the row's SLO; BE LongBench-v2-like)\n" + comp_md)
    print("\n## Against the paper's claims\n" + claims_md)
    print("\n## Diagnostics (loose SLO)\n" + diag_md)
    print("\n## Regime map (* = LS SLO held)\n" + reg_md)
    print("\n## Findings\n" + "\n".join(f"- {n}" for n in notes))
    print("\n" + EXPLANATION)
    print(f"wall time {wall:.0f} s ({len(sims)} simulations, {sim_wall:.0f} s of simulation CPU time)")

    if args.quick and not args.write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/paper_scenarios.py" + (" --quick" if args.quick else "")
    plot(regimes, RESULTS / "paper_scenarios.png")
    speed_md = ("not run (--quick)" if speed is None else
                f"`{SPEED_CMD}`: {speed['requests']} requests (LS ShareGPT-like Poisson 5.5 req/s for 1800 s + 300 "
                f"LongBench-v2-like BE), {speed['simulated_s']:.0f} simulated s, {speed['iterations']} iterations: "
                f"**{speed['wall_s']:.1f} s wall** (target < 60 s). LS attainment {speed['ls_attainment']:.3f}, "
                f"BE {speed['be_tokens_per_s']:.1f} tok/s.")  # fmt: skip
    text = f"""# OmniServe paper scenarios in the simulator

Command: `{command}` — {datetime.date.today().isoformat()}, on {cpu_model_name()} ({os.cpu_count()} cores), wall time
{wall:.0f} s for {len(sims)} simulations ({horizon:.0f} simulated s each, BE batch of {be_count}, LS drain
{drain:.0f} s; BE tokens count only before the horizon).

Simulated, not measured: GPU Dense and all-reduce timings are Vidur's measured operator data
(microsoft/vidur 7d47513); GPU attention, lm_head and CPU attention are analytic (CPU attention = KV bytes /
(DRAM bandwidth × 0.8) + 20 µs a task). The scheduler is the runtime's own planner.

Setup: host CPUs = 24 cores, 2 sockets × 200 GB/s, 400 GiB (the paper's Xeon Gold 6342 box); 1G4C = that host
plus 4 CPU-only nodes of the same kind (24 cores, 400 GB/s, 400 GiB each) on 100 Gbps links (preset `1g4c` with
per-node figures overridden). Host KV = `min(host_kv_memory_gib, 80% of host + remote DRAM)`, with
host_kv_memory_gib 400 (host) or 2000 (1G4C). Engine: max_num_batched_tokens 512, max_num_seqs 512;
piggyback: max_be_requests 1024, max_be_rows_per_layer 512, 2 CPU workers; slo_control.max_be_queue 100000;
headroom_be_kv_share default (0.3). LS: `conv` = splitwise_conv.csv lengths with Poisson arrivals at the rate;
`sharegpt-like` = the preset. SLOs TTFT/TPOT in ms; attainment counts a rejected or unfinished LS request as a
miss. GPU-only baselines (priority, ls-only, headroom) do not depend on the CPUs or the SLO, so they run once per
workload and their attainment is recomputed for each SLO from the same records.

"Held" (regime map): LS attainment ≥ {ATTAINMENT_TARGET}, or, where no policy reaches that (LS overload), within 1
point of the best attainment any policy reaches in that cell. The winner is the held policy with the most BE tokens/s.

## Against the paper's claims

{claims_md}

## Findings

{chr(10).join(f"- {n}" for n in notes)}

{EXPLANATION}
## Paper comparisons (attainment at the row's SLO; BE LongBench-v2-like)

{comp_md}

## Diagnostics (loose SLO; gpu busy = GPU busy share, host GB/s = KV bytes read by CPU attention per second,
## host KV peak = share of host KV blocks in use)

{diag_md}

## Regime map (* = LS SLO held)

{reg_md}

![regime map](paper_scenarios.png)

## Speed

{speed_md}
"""
    (RESULTS / "paper_scenarios.md").write_text(text)
    print(f"wrote {RESULTS / 'paper_scenarios.md'} and {RESULTS / 'paper_scenarios.png'}")


if __name__ == "__main__":
    main()
