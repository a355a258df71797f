"""`piggyback sim run SCENARIO.yaml`, `piggyback sim sweep SWEEP.yaml` and `piggyback sim cluster`."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from piggyback_runtime.config import ConfigError
from piggyback_runtime.scheduler.policies import policy_names
from piggyback_runtime.sim.scenario import (
    format_table,
    load_scenario,
    load_sweep,
    load_yaml,
    run_scenario,
    summary,
    sweep_points,
)


def _progress(horizon_s: float, label: str) -> object:
    def report(simulated_s: float) -> None:
        share = min(1.0, simulated_s / horizon_s) if horizon_s > 0 else 1.0
        bar = "#" * int(share * 30)
        print(f"\r{label} [{bar:<30}] {simulated_s:7.0f} / {horizon_s:.0f} s", end="", file=sys.stderr, flush=True)

    return report


def _run(args: argparse.Namespace) -> int:
    path = Path(args.scenario)
    spec = load_scenario(load_yaml(path), str(path))
    chosen = [p for name in args.policy or () for p in (policy_names() if name == "all" else [name])]
    policies = chosen or spec.policies or [None]
    rows = []
    for policy in policies:
        report = _progress(spec.workload.duration_s, policy or "run") if not args.quiet else None
        result = run_scenario(spec, path.parent, policy, report)  # type: ignore[arg-type]
        if report is not None:
            print(file=sys.stderr)
        row = summary(result)
        rows.append(row)
        print(f"# {row['policy']}: {'; '.join(result.notes)}")
    print(format_table(rows))
    if args.csv:
        _write_csv(rows, Path(args.csv))
    return 0


def _write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _sweep(args: argparse.Namespace) -> int:
    path = Path(args.sweep)
    spec = load_sweep(load_yaml(path), str(path))
    out = Path(args.out)
    rows: list[dict] = []
    points = sweep_points(spec)
    for index, (varied, data) in enumerate(points, 1):
        scenario = load_scenario(data, f"{path} at {varied}")
        for policy in scenario.policies or [None]:
            result = run_scenario(scenario, path.parent, policy)
            row = {**{k: str(v) for k, v in varied.items()}, **summary(result)}
            rows.append(row)
            print(f"[{index}/{len(points)}] {varied} {row['policy']}: LS attainment {row['ls_attainment']:.3f}, "
                  f"BE {row['be_tokens_per_s']:.1f} tok/s", file=sys.stderr)  # fmt: skip
    _write_csv(rows, out / "sweep.csv")
    print(format_table(rows, [*spec.vary, "policy", "ls_attainment", "ls_ttft_p99_s", "ls_tpot_p99_s",
                              "be_tokens_per_s", "gpu_busy_share", "host_bandwidth_gb_s"]))  # fmt: skip
    _plot(rows, list(spec.vary), out / "sweep.png")
    print(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}")
    return 0


def _plot(rows: list[dict], varied: list[str], path: Path) -> None:
    """BE tokens/s and LS attainment against the first varied field, one line per policy (and other fields)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, rest = varied[0], varied[1:]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[dict]] = {}
    for row in rows:
        label = " ".join([str(row["policy"]), *(f"{k}={row[k]}" for k in rest)])
        series.setdefault(label, []).append(row)
    for label, points in series.items():
        xs = [p[x_key] for p in points]
        left.plot(xs, [p["be_tokens_per_s"] for p in points], marker="o", label=label)
        right.plot(xs, [p["ls_attainment"] for p in points], marker="o", label=label)
    left.set(xlabel=x_key, ylabel="BE tokens/s", title="BE throughput")
    right.set(xlabel=x_key, ylabel="LS SLO attainment", title="LS attainment", ylim=(0, 1.02))
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cluster(args: argparse.Namespace) -> int:
    """Several replicas behind each router (sim/cluster.py), one skewed long-context trace for all."""
    from piggyback_runtime.router.policy import POLICIES
    from piggyback_runtime.sim.cluster import h100_llama3_8b_profile, run_router, skewed_workload

    routers = args.router or list(POLICIES)
    unknown = sorted(set(routers) - set(POLICIES))
    if unknown or args.instances < 1 or args.rate <= 0 or args.duration_s <= 0:
        raise ValueError(f"need known routers ({', '.join(POLICIES)}; got {', '.join(unknown) or 'ok'}), "
                         "--instances >= 1, --rate and --duration-s > 0")  # fmt: skip
    device = h100_llama3_8b_profile()
    trace = skewed_workload(args.rate * args.instances, args.duration_s, seed=args.seed)
    sample = skewed_workload(args.rate * args.instances, args.duration_s, seed=args.seed + 1000)
    for router in routers:
        result = run_router(router, device, args.instances, trace, args.duration_s, plan_sample=sample)
        print(f"{router:<12} mean {result.mean_latency_s:7.2f} s  p99 {result.latency_percentile_s(99):7.2f} s  "
              f"{result.throughput_tokens_s:8.0f} tok/s  SLO@5x {result.slo_attainment:6.1%}  "
              f"migrations {result.migrations}" + (f"  stages {result.plan}" if result.plan else ""))  # fmt: skip
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("sim", help="simulate the planner on measured GPU timings (run, sweep)")
    commands = sim.add_subparsers(dest="sim_command", required=True)
    run = commands.add_parser("run", help="run one scenario (once per policy listed in it or given here)")
    run.add_argument("scenario", help="scenario YAML (see sim/scenario.py)")
    run.add_argument("--policy", action="append", choices=[*policy_names(), "all"],
                     help="run with this policy (repeatable; overrides the file); all: every policy")  # fmt: skip
    run.add_argument("--csv", help="also write the summary rows here")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_guarded(_run))
    sweep = commands.add_parser("sweep", help="run a sweep: CSV and PNG into --out")
    sweep.add_argument("sweep", help="sweep YAML: {base: SCENARIO, vary: {dotted.path: [values]}}")
    sweep.add_argument("--out", default="sim-sweep", help="output folder")
    sweep.set_defaults(func=_guarded(_sweep))
    cluster = commands.add_parser("cluster", help="Llama-3-8B replicas on H100 behind each router (100-100K contexts)")
    cluster.add_argument("--instances", type=int, default=8, help="replicas in the pool")
    cluster.add_argument("--rate", type=float, default=2.0, help="offered load, requests/s per replica")
    cluster.add_argument("--duration-s", type=float, default=60.0, help="simulated arrival window")
    cluster.add_argument("--router", action="append", help="roundRobin, leastLoaded, lengthAware (repeatable)")
    cluster.add_argument("--seed", type=int, default=1)
    cluster.set_defaults(func=_guarded(_cluster))


def _guarded(command):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ConfigError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run
