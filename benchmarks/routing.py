"""Routing across a pool's replicas in the simulator: round-robin, least-loaded (Llumnix-style), length-aware (L4).

Setup (sim/cluster.py states the model): N replicas of Llama-3-8B, one H100 each; Poisson arrivals with
prompts from a bounded Pareto over 100..100K tokens (median ~400, a few percent above 30K) and log-normal
outputs (median 256, up to 4K). Decode attention is charged for length heterogeneity within a batch
(a · Σ contexts · (1 + p · (1 − mean/max)), p = 1: mixed batches run 1.1–2× slower, as L4 measures).
Length-aware plans its stages with the DP from a second sample of the same distribution (another seed),
refines boundaries every 5 s, and migrates requests (KV over a 50 GB/s link, at most 3 at once).

For each pool size and offered load (requests/s per replica) the script prints mean and p99 end-to-end
latency, output throughput and SLO attainment (latency within 5× and 20× the request's unloaded latency) per
router; then, per pool size, length-aware against the better baseline at the highest load length-aware
sustains (SLO@5× ≥ 90%; every load is in the full table), and the maximum sustainable throughput (the
highest load whose 5× SLO attainment is ≥ 90%),
next to L4's published figures (16×H20; they are the paper's, on its hardware and workload, not ours).

    python benchmarks/routing.py [--quick] [--instances 4,8,16] [--rates 1.0,2.0,3.0,4.0] [--duration-s 120]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from piggyback_runtime.sim.cluster import ClusterResult, h100_llama3_8b_profile, run_router, skewed_workload

RESULTS = Path(__file__).parent / "results"
ROUTERS = ("roundRobin", "leastLoaded", "lengthAware")
SUSTAINABLE_ATTAINMENT = 0.9  # a load is sustainable while ≥ 90% of requests meet the 5× SLO

# L4 / CascadeInfer (arXiv 2512.19179), headline and 16×H20 figures (shared/reference/l4.md).
L4_MEAN_LATENCY_REDUCTION = 0.67
L4_P99_LATENCY_REDUCTION = 0.69
L4_THROUGHPUT_VS_LLUMNIX = 1.71
L4_THROUGHPUT_MAX = 2.89
L4_SLO_RATIO_AT_5X = "3.8–7.6×"


@dataclass
class Row:
    instances: int
    rate_per_replica: float
    router: str
    mean_s: float
    p99_s: float
    tokens_s: float
    slo_5x: float
    slo_20x: float
    migrations: int
    finished: int
    total: int
    plan: str


def attainment(result: ClusterResult, scale: float) -> float:
    hits = sum(1 for r in result.records if r.latency_s is not None and r.latency_s <= scale * r.unloaded_latency_s)
    return hits / len(result.records) if result.records else 1.0


def run(instances: list[int], rates: list[float], duration_s: float, seed: int) -> list[Row]:
    device = h100_llama3_8b_profile()
    rows: list[Row] = []
    for n in instances:
        for rate in rates:
            trace = skewed_workload(rate * n, duration_s, seed=seed)
            sample = skewed_workload(rate * n, duration_s, seed=seed + 1000)
            for router in ROUTERS:
                started = time.time()
                result = run_router(router, device, n, trace, duration_s, plan_sample=sample)
                plan = "" if result.plan is None else " ".join(
                    f"{len(s.replicas)}@{s.lower_tokens}" for s in result.plan.stages)  # fmt: skip
                rows.append(Row(n, rate, router, result.mean_latency_s, result.latency_percentile_s(99),
                                result.throughput_tokens_s, attainment(result, 5.0), attainment(result, 20.0),
                                result.migrations, len(result.finished()), len(result.records), plan))  # fmt: skip
                r = rows[-1]
                print(f"{n:>3} x H100  {rate:4.1f} req/s/replica  {router:<12} mean {r.mean_s:7.2f} s  "
                      f"p99 {r.p99_s:7.2f} s  {r.tokens_s:8.0f} tok/s  SLO@5x {r.slo_5x:6.1%}  "
                      f"SLO@20x {r.slo_20x:6.1%}  migrations {r.migrations:5d}  ({time.time() - started:.1f} s)",
                      flush=True)  # fmt: skip
    return rows


def sustainable_tokens_s(rows: list[Row], router: str, n: int) -> float:
    ok = [r.tokens_s for r in rows if r.router == router and r.instances == n and r.slo_5x >= SUSTAINABLE_ATTAINMENT]
    return max(ok, default=0.0)


def summary(rows: list[Row]) -> list[str]:
    lines = ["| replicas | load (req/s/replica) | ours: mean latency vs best baseline | L4 "
             "| ours: p99 vs best baseline | L4 | ours: SLO@5× ratio | L4 "
             "| ours: max sustainable throughput vs least-loaded (Llumnix-style) "
             "| L4 (16×H20 vs Llumnix; max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n in sorted({r.instances for r in rows}):
        mine = [r for r in rows if r.instances == n]
        # Compare where it matters: the highest load length-aware still sustains (else the highest tested).
        sustained = [r.rate_per_replica for r in mine
                     if r.router == "lengthAware" and r.slo_5x >= SUSTAINABLE_ATTAINMENT]  # fmt: skip
        rate = max(sustained or [r.rate_per_replica for r in mine])
        at = {r.router: r for r in mine if r.rate_per_replica == rate}
        la = at["lengthAware"]
        best_mean = min(at["roundRobin"].mean_s, at["leastLoaded"].mean_s)
        best_p99 = min(at["roundRobin"].p99_s, at["leastLoaded"].p99_s)
        best_slo = max(at["roundRobin"].slo_5x, at["leastLoaded"].slo_5x)
        la_max, ll_max = sustainable_tokens_s(rows, "lengthAware", n), sustainable_tokens_s(rows, "leastLoaded", n)
        # Both maxima are read off the grid of loads: approximate; if length-aware meets the bar even at the
        # highest load tested, its true maximum is higher still (a lower bound).
        top = max(r.rate_per_replica for r in mine)
        capped = "≥ " if any(r.router == "lengthAware" and r.rate_per_replica == top
                             and r.slo_5x >= SUSTAINABLE_ATTAINMENT for r in mine) else "≈ "  # fmt: skip
        throughput = f"{capped}{la_max / ll_max:.2f}×" if ll_max > 0 else "least-loaded sustains no tested load"
        lines.append(
            f"| {n} | {rate:g} | {la.mean_s / best_mean - 1:+.0%} | −{L4_MEAN_LATENCY_REDUCTION:.0%} "
            f"| {la.p99_s / best_p99 - 1:+.0%} | −{L4_P99_LATENCY_REDUCTION:.0%} "
            f"| {la.slo_5x / best_slo if best_slo > 0 else float('inf'):.2f}× | {L4_SLO_RATIO_AT_5X} "
            f"| {throughput} | {L4_THROUGHPUT_VS_LLUMNIX}× ; up to {L4_THROUGHPUT_MAX}× |")
    return lines


def table(rows: list[Row]) -> list[str]:
    lines = ["| replicas | req/s/replica | router | mean s | p99 s | output tok/s | SLO@5× | SLO@20× | migrations "
             "| finished | stages (replicas@lower bound, after refinement) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r.instances} | {r.rate_per_replica:g} | {r.router} | {r.mean_s:.2f} | {r.p99_s:.2f} | "
              f"{r.tokens_s:.0f} | {r.slo_5x:.1%} | {r.slo_20x:.1%} | {r.migrations} | {r.finished}/{r.total} | "
              f"{r.plan} |" for r in rows]  # fmt: skip
    return lines


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = sorted({r.instances for r in rows})
    fig, axes = plt.subplots(2, len(pools), figsize=(4.5 * len(pools), 7), squeeze=False)
    for column, n in enumerate(pools):
        for router in ROUTERS:
            mine = sorted((r for r in rows if r.instances == n and r.router == router),
                          key=lambda r: r.rate_per_replica)
            rates = [r.rate_per_replica for r in mine]
            axes[0][column].plot(rates, [r.mean_s for r in mine], marker="o", label=router)
            axes[1][column].plot(rates, [r.slo_5x for r in mine], marker="o", label=router)
        axes[0][column].set_title(f"{n} × H100, Llama-3-8B")
        axes[0][column].set_ylabel("mean end-to-end latency (s)")
        axes[1][column].set_ylabel("SLO attainment (≤ 5× unloaded)")
        axes[1][column].set_xlabel("offered load (requests/s per replica)")
        axes[0][column].legend()
    fig.suptitle("Routing in the simulator: prompts 100–100K tokens (bounded Pareto), mixing-penalised attention",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 replicas, two loads, 30 s (a smoke run)")
    parser.add_argument("--instances", default="4,8,16", help="pool sizes, comma-separated")
    parser.add_argument("--rates", default="1.0,2.0,3.0,4.0", help="offered loads in requests/s per replica")
    parser.add_argument("--duration-s", type=float, default=120.0, help="arrival window per run (simulated)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for routing.md and routing.png")
    args = parser.parse_args()
    try:
        instances = [int(x) for x in args.instances.split(",")]
        rates = [float(x) for x in args.rates.split(",")]
    except ValueError as e:
        parser.error(f"--instances and --rates take comma-separated numbers: {e}")
    if args.quick:
        instances, rates, args.duration_s = [4], [1.5, 3.0], 30.0
    if min(instances) < 1 or min(rates) <= 0 or args.duration_s <= 0:
        parser.error("--instances must be >= 1, --rates and --duration-s > 0")
    started = time.time()
    rows = run(instances, rates, args.duration_s, args.seed)
    lines = summary(rows)
    print("\n".join(["", *lines]))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    md = [
        "# Routing across replicas (simulated)",
        "",
        f"`python benchmarks/routing.py{' --quick' if args.quick else ''}` — pools {instances}, loads {rates} "
        f"req/s/replica, {args.duration_s:g} s of arrivals per run, seed {args.seed}; "
        f"{time.time() - started:.0f} s of wall time.",
        "Model and assumptions: `runtime/piggyback_runtime/sim/cluster.py` (attention = a·Σctx·(1 + 1·(1 − mean/max)),"
        " KV migration over 50 GB/s, ≤ 3 in flight). L4's figures are the paper's (16×H20 / ShareGPT), quoted for"
        " scale, not reproduced.",
        "",
        "## Length-aware against the better baseline (at the highest load length-aware sustains)",
        "",
        *lines,
        "",
        "## Every run",
        "",
        *table(rows),
        "",
    ]
    (args.out / f"routing{suffix}.md").write_text("\n".join(md))
    plot(rows, args.out / f"routing{suffix}.png")
    print(f"wrote {args.out / f'routing{suffix}.md'} and {args.out / f'routing{suffix}.png'}")


if __name__ == "__main__":
    main()
