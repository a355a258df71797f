"""Remote CPU attention nodes: the per-layer data path on loopback, and BE throughput with 0-4 nodes simulated.

1. Loopback (a real local Ray cluster, one AttentionNodeActor): Ray's per-call cost (an actor call carrying one
   layer's q/k/v) against the node's own TCP stream (a `run` frame: the same bytes, plus the attention itself),
   and the bytes each BE token costs on the wire. This is why the per-layer path is a stream and Ray only
   places and watches the actors.
2. Simulator (`piggyback_runtime.sim`, Vidur timings): BE tokens/s with 0, 1, 2 and 4 remote nodes for the
   paper's Llama-2-70B TP4 H100 and 34B TP2 A100 settings, LongBench-v2-like and DailyMail-like BE, LS at the
   paper's middle rate (Splitwise conversation trace). The default policy `hybrid` (HBM while spare, then the
   host or a remote node, where the planner's tier model says the row decodes fastest: remote_tier.py) at
   the configured 512-token budget and at 2048, and `piggyback` (every BE row on the CPUs) as a second group.
   Next to each figure, the bounds that could bind, from the same device figures: GPU token supply
   (benchmarks/regime_map.py `ceiling`), the nodes' and host's DRAM (KV bytes per token over attention
   bandwidth), the network (bytes per BE token over each node's link), and the BE prefill the GPU did.

    python benchmarks/remote_nodes.py [--quick] [--skip-loopback] [--jobs 2] [--policies hybrid@512,...]

Writes benchmarks/results/remote_nodes.md (not with --quick unless --write).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from piggyback_runtime.hardware import cpu_model_name
from piggyback_runtime.remote_capacity import RemoteNodeFigures, bytes_per_be_token_per_layer
from piggyback_runtime.sim.devices import MODELS
from piggyback_runtime.sim.scenario import build_simulator, load_scenario, summary

sys.path.insert(0, str(Path(__file__).resolve().parent))
import regime_map  # a sibling script: the GPU token supply ceiling, defined once there
from paper_scenarios import CONV_TRACE, HOST, runtime_section  # the testbed and runtime, defined once there

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# The paper's testbed boxes: the GPU host is paper_scenarios.HOST and each CPU-only node the same 24-core,
# 2 × 200 GB/s, 400 GiB machine; the nodes sit behind 100 Gbit/s links.
NODE = RemoteNodeFigures(cores=24, dram_bandwidth_gb_s=400, dram_gib=400, network_gb_s=12.5)
CPU_ATTENTION_EFFICIENCY = 0.8  # sim/devices.HostSpec's default: the share of DRAM bandwidth the kernel reaches
# name -> (gpu, model, tp, LS rate (the paper_scenarios middle rate), SLO ttft/tpot ms)
SETTINGS: dict[str, tuple[str, str, int, float, tuple[int, int]]] = {
    "70B-H100x4": ("h100", "llama-2-70b", 4, 5.0, (3000, 250)),
    "34B-A100x2": ("a100-80gb", "codellama-34b", 2, 2.0, (2000, 200)),
    # Not in the default run: the regime map's light LS rate, where BE prompts get most of each iteration's
    # budget, so the GPU's prefill supply leaves room for what the nodes decode.
    "70B-H100x4 light LS": ("h100", "llama-2-70b", 4, 2.0, (3000, 250)),
}
DEFAULT_SETTINGS = ("70B-H100x4", "34B-A100x2")
BE_SHAPES = {"longbench-v2": (8952, 136), "dailymail": (1964, 397)}  # mean input / output tokens (sim presets)
NODE_COUNTS = (0, 1, 2, 4)
# policy@token budget -> simulated seconds: the default as configured and at regime_map's full budget;
# piggyback (every BE row on the CPUs) as before, on a shorter horizon (its runs are the slow ones: 844 s for
# 16 at 120 s).
# A `/hbmN` suffix caps HBM's KV at N tokens (engine.num_kv_blocks): BE decode then needs the CPU tiers, the
# regime where remote nodes can add what they hold (the paper's: a GPU node whose HBM BE outgrows).
RUNS = {"hybrid@512": 120.0, "hybrid@2048": 120.0, "piggyback@512": 60.0, "piggyback@2048": 60.0,
        "hybrid@2048/hbm80000": 120.0}
BLOCK_SIZE = 16  # EngineConfig's default block size: the HBM cap in blocks


def parse_run(run: str) -> tuple[str, int, int | None]:
    """policy@budget[/hbmN] -> (policy, token budget, HBM KV tokens or None)."""
    head, _, cap = run.partition("/hbm")
    policy, _, budget = head.partition("@")
    return policy, int(budget), int(cap) if cap else None
# The regime map's LS level of each setting's rate (for its `ceiling` and LS drain).
LEVEL = {"70B-H100x4": "medium", "34B-A100x2": "medium", "70B-H100x4 light LS": "light"}


# --- 1. loopback -------------------------------------------------------------------------------------------------
def loopback(rounds: int) -> dict[str, Any]:
    import ray
    import torch

    from piggyback_runtime.piggyback.remote import wire
    from piggyback_runtime.piggyback.remote.actor import AttentionNodeActor

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; no token file in ~/.ray
    ray.init(num_cpus=2, resources={"piggyback_cpu_attention": 1}, include_dashboard=False,
             log_to_driver=False, object_store_memory=100 * 2**20)  # fmt: skip
    try:
        token = "bench"
        actor = ray.remote(num_cpus=1, resources={"piggyback_cpu_attention": 1})(AttentionNodeActor).remote(token)
        host, port, _ = ray.get(actor.address.remote())
        # One 70B layer's shapes (all heads: the engine's rank 0 of TP4 sends a quarter of it).
        q_heads, kv_heads, head_dim, block = 64, 8, 128, 64
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire.send(sock, {"kind": "hello", "token": token, "layers": 1, "kv_heads": kv_heads, "q_heads": q_heads,
                         "head_dim": head_dim, "block_size": block, "dtype": "bfloat16", "scale": head_dim**-0.5,
                         "threads": 1, "kv_bytes": 1 << 28})  # fmt: skip
        wire.recv(sock)
        out: dict[str, Any] = {}
        for rows, context in ((1, 1), (8, 1), (1, 1024), (8, 1024)):
            for slot in range(rows):
                wire.send(sock, {"kind": "register", "slot": slot, "gen": 0, "blocks": context // block + 1})
                kv = torch.randn(context, kv_heads, head_dim).bfloat16()
                wire.send(sock, {"kind": "kv", "slot": slot, "layer": 0, "tokens": context}, [kv, kv])
            q = torch.randn(rows, q_heads, head_dim)
            k = torch.randn(rows, kv_heads, head_dim)
            frame_rows = [[s, context, 0] for s in range(rows)]
            stream, sent_bytes, got_bytes = [], 0, 0
            for _ in range(rounds):
                started = time.perf_counter()
                sent_bytes = wire.send(sock, {"kind": "run", "layer": 0, "batch": 0, "rows": frame_rows}, [q, k, k])
                _, _, got_bytes = wire.recv(sock)
                stream.append(time.perf_counter() - started)
                # the run appended one token at `context`; write it again next round (same position)
            payload = bytes(sent_bytes)
            calls = []
            for _ in range(rounds):
                started = time.perf_counter()
                ray.get(actor.ping.remote(payload))
                calls.append(time.perf_counter() - started)
            for slot in range(rows):
                wire.send(sock, {"kind": "forget", "slot": slot})
            out[(rows, context)] = {
                "stream_p50_ms": statistics.median(stream) * 1e3,
                "stream_p99_ms": sorted(stream)[int(0.99 * (len(stream) - 1))] * 1e3,
                "ray_p50_ms": statistics.median(calls) * 1e3,
                "ray_p99_ms": sorted(calls)[int(0.99 * (len(calls) - 1))] * 1e3,
                "sent_bytes": sent_bytes, "received_bytes": got_bytes,
            }  # fmt: skip
        sock.close()
        return out
    finally:
        ray.shutdown()


# --- 2. simulator ------------------------------------------------------------------------------------------------
def scenario(setting: str, be: str, nodes: int, horizon_s: float, be_count: int, budget: int = 512,
             drain_s: float = 30.0) -> dict[str, Any]:  # fmt: skip
    gpu, model, tp, rate, (ttft_ms, tpot_ms) = SETTINGS[setting]
    device: dict[str, Any] = {"gpu": gpu, "model": model, "tp": tp, "host": dict(HOST)}
    if nodes:
        device["remote"] = {"count": nodes, "cores_per_node": NODE.cores,
                            "dram_bandwidth_gb_s_per_node": NODE.dram_bandwidth_gb_s,
                            "dram_gib_per_node": NODE.dram_gib, "network_gb_s": NODE.network_gb_s,
                            "network_latency_s": NODE.network_latency_s}  # fmt: skip
    return {
        "drain_s": drain_s,
        "runtime": runtime_section(model, (ttft_ms, tpot_ms), budget, HOST["dram_gib"] + nodes * NODE.dram_gib,
                                   max_be_requests=2048),
        "device": device,
        "workload": {"seed": 1, "duration_s": horizon_s, "sources": [
            {"kind": "trace", "service": "chat", "class": "LS", "path": str(CONV_TRACE), "rate_per_s": rate},
            {"kind": "batch", "service": "batch", "class": "BE", "count": be_count,
             "lengths": {"kind": "preset", "name": be}},
        ]},
    }  # fmt: skip


def regime_cell(setting: str, be: str) -> dict[str, Any]:
    # A setting's first word is its regime-map device ("70B-H100x4 light LS" runs on "70B-H100x4").
    return {"device": setting.split()[0], "level": LEVEL[setting], "be": be, "cpu": "host"}


def simulate(key: tuple[str, str, str, int], horizon_s: float, be_count: int,
             steady_from_s: float | None = None) -> dict[str, Any]:  # fmt: skip
    """One run's figures over its horizon; with `steady_from_s`, BE tok/s and the prefill bound are taken over
    [steady_from_s, horizon] instead (the rows' population takes minutes to build from an empty start: over a
    short horizon a node's gain is mostly the ramp's)."""
    run, setting, be, nodes = key
    policy, budget, hbm_tokens = parse_run(run)
    started = time.perf_counter()
    # Every LS request that arrives within the horizon is followed to its end, as in the regime map.
    drain_s = regime_map.ls_drain_s(regime_cell(setting, be), horizon_s, be_count)
    spec = scenario(setting, be, nodes, horizon_s, be_count, budget, drain_s)
    if hbm_tokens is not None:
        spec["runtime"]["engine"]["num_kv_blocks"] = hbm_tokens // BLOCK_SIZE
    sim = build_simulator(load_scenario(spec), policy=policy)
    be_tokens_at: list[tuple[float, int, int]] = [(0.0, 0, 0)]  # (when, BE tokens, of which CPU path)
    if steady_from_s is not None:
        update = sim.planner.update

        def counted_update(plan: Any, outputs: Any, now: float) -> Any:
            events = update(plan, outputs, now)
            be_tokens_at.append((now, sim.stats.be_tokens, sim.cpu_be_tokens))
            return events

        sim.planner.update = counted_update  # type: ignore[method-assign]
    result = sim.run()
    out = summary(result)
    out["wall_s"] = time.perf_counter() - started
    out["cpu_busy_share"] = result.cpu_busy_share
    out["moves_to_host"] = result.moves_to_host
    out["cpu_tokens_per_s"] = result.cpu_be_tokens / horizon_s
    series = [rows for t, _, rows in result.host_read_series if t <= horizon_s]
    out["cpu_rows_mean"] = sum(series) / len(series) if series else 0.0
    # The GPU's BE prefill supply: BE requests it prefilled within the horizon, each worth its output tokens.
    be = [r for r in result.of("BE") if r.first_token_s is not None and r.first_token_s <= horizon_s]
    out["prefill_bound"] = sum(r.output_tokens for r in be) / horizon_s
    if steady_from_s is not None:
        (t0, n0, c0), (t1, n1, c1) = (max((m for m in be_tokens_at if m[0] <= at), default=(0.0, 0, 0))
                                      for at in (steady_from_s, horizon_s))  # fmt: skip
        out["whole_horizon_be_tokens_per_s"] = out["be_tokens_per_s"]
        out["be_tokens_per_s"] = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        out["cpu_tokens_per_s"] = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
        late = [r for r in be if r.first_token_s >= steady_from_s]
        out["prefill_bound"] = sum(r.output_tokens for r in late) / (horizon_s - steady_from_s)
    return out


def bounds(setting: str, be: str, nodes: int) -> dict[str, float]:
    """BE tokens/s each resource allows on its own, from the same figures the simulator reads."""
    _, model, _, _, _ = SETTINGS[setting]
    shape = MODELS[model]
    prompt, output = BE_SHAPES[be]
    context = prompt + output / 2  # mean context a decode step reads
    kv_bytes_per_token = shape.kv_bytes_per_token()
    per_token_read = kv_bytes_per_token * context
    host_bw = HOST["sockets"] * HOST["dram_bandwidth_gb_s_per_socket"] * 1e9 * CPU_ATTENTION_EFFICIENCY
    node_bw = NODE.dram_bandwidth_gb_s * 1e9 * CPU_ATTENTION_EFFICIENCY
    sent, received = bytes_per_be_token_per_layer(shape.num_heads, shape.num_kv_heads, shape.head_dim)
    wire_per_token = max(sent, received) * shape.num_layers
    return {
        "dram_host": host_bw / per_token_read,
        "dram_per_node": node_bw / per_token_read,
        "network_per_node": NODE.network_gb_s * 1e9 / wire_per_token,
        "wire_bytes_per_token": (sent + received) * shape.num_layers,
    }


def binding(run: str, tok_s: float, cpu_tok_s: float, supply: float, dram_bw: float, network: float,
            prefill: float, kv_peak: float, cpu_rows: float) -> str:  # fmt: skip
    """Which limit binds, first match: the bounds the figure reaches (within 20 %: all BE tokens against the GPU's
    supply and its prefill, the CPU path's against DRAM bandwidth and the network), then a full KV, then what
    the iteration traces of these runs showed (benchmarks/results/remote_nodes.md, "Reading")."""
    if tok_s >= 0.8 * supply:
        return "GPU token supply"
    if cpu_tok_s >= 0.8 * dram_bw:
        return "DRAM bandwidth"
    if cpu_tok_s >= 0.8 * network:
        return "network"
    if tok_s >= 0.8 * prefill:
        return "GPU prefill supply"
    if kv_peak >= 0.95:
        return "DRAM capacity (KV full: rows in flight capped)"
    if run.startswith("hybrid"):
        if cpu_rows < 1:
            return "GPU iterations (SLO-sized budget; BE decodes in HBM, CPU tiers unused)"
        # The planner feeds BE prompts to the CPU tiers only while their rows keep pace (planner.py
        # host_path_keeps_pace): beyond that rows wait a pass per missed layer, so the merge window binds.
        return "per-layer merge pacing (CPU tiers fed while their rows keep pace)"
    return "per-layer merge pacing (rows wait for a pass over their layer)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the results file even with --quick")
    parser.add_argument("--skip-loopback", action="store_true")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--policies", default=",".join(RUNS), help="policy@budget[/hbmN], comma-separated")
    parser.add_argument("--reuse", action="store_true", help="take the runs remote_nodes_runs.json already holds")
    parser.add_argument("--horizon", type=float, default=None, help="simulated seconds for every run (default: "
                        "RUNS' horizons; --quick 60)")  # fmt: skip
    parser.add_argument("--steady-from-s", type=float, default=None,
                        help="BE tok/s from this simulated second to the horizon (the steady state), not over all")
    parser.add_argument("--out", default="remote_nodes", help="results file stem under benchmarks/results/")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    parser.add_argument("--be", default=",".join(BE_SHAPES), help=f"comma-separated, of {list(BE_SHAPES)}")
    args = parser.parse_args()
    settings, be_shapes = args.settings.split(","), args.be.split(",")
    if unknown_settings := [s for s in settings if s not in SETTINGS] + [b for b in be_shapes if b not in BE_SHAPES]:
        parser.error(f"unknown --settings or --be: {unknown_settings}")
    runs = args.policies.split(",")
    unknown = [r for r in runs if r not in RUNS and "@" not in r]
    if unknown:
        parser.error(f"--policies takes policy@budget, not {unknown}")
    horizons = {r: args.horizon or (60.0 if args.quick else RUNS.get(r, 120.0)) for r in runs}
    if args.steady_from_s is not None and args.steady_from_s >= min(horizons.values()):
        parser.error(f"--steady-from-s {args.steady_from_s:g} must be below every run's horizon "
                     f"({', '.join(f'{r} {h:g} s' for r, h in horizons.items())}; --horizon sets them all)")
    os.environ.setdefault("PIGGYBACK_VIDUR_DIR", "/work/shared/data/vidur")
    command = " ".join(["python benchmarks/remote_nodes.py", *(shlex.quote(a) for a in sys.argv[1:])])
    lines = [f"# Remote CPU attention nodes ({datetime.date.today()}, `{command}`)", ""]
    lines += [f"CPU: {cpu_model_name()}, {os.cpu_count()} cores (a shared VM: loopback figures are indicative).", ""]
    if not args.skip_loopback:
        rounds = 50 if args.quick else 300
        loop = loopback(rounds)
        lines += ["## 1. Per-layer round trip on loopback (one 70B layer: 64 q heads, 8 kv heads, d 128)", "",
                  "| rows | context | stream p50 ms | stream p99 ms | Ray call p50 ms | Ray call p99 ms | bytes out "
                  "| bytes back |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for (rows, context), f in loop.items():
            lines.append(f"| {rows} | {context} | {f['stream_p50_ms']:.3f} | {f['stream_p99_ms']:.3f} | "
                         f"{f['ray_p50_ms']:.3f} | {f['ray_p99_ms']:.3f} | {f['sent_bytes']} | {f['received_bytes']} |")
        lines += ["", "The stream's round trip includes the node's attention (write k/v, read the context); the Ray "
                  "call carries the same bytes and does nothing with them.", ""]
    be_count = 4000
    keys = [(r, s, be, n) for r in runs for s in settings for be in be_shapes for n in NODE_COUNTS]
    budgets = sorted({parse_run(r)[1] for r in runs})
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        supplies = {(s, be, b): pool.submit(regime_map.ceiling, regime_cell(s, be), 120.0, be_count, b)
                    for s in settings for be in be_shapes for b in budgets}  # fmt: skip
        done: dict[str, dict[str, Any]] = {}
        if args.reuse and (RESULTS / f"{args.out}_runs.json").exists():
            done = json.loads((RESULTS / f"{args.out}_runs.json").read_text())
        futures = {k: pool.submit(simulate, k, horizons[k[0]], be_count, args.steady_from_s) for k in keys
                   if "|".join(map(str, k)) not in done}  # fmt: skip
        supply = {k: f.result()["GPU token supply"] for k, f in supplies.items()}
        sims = {k: futures[k].result() if k in futures else done["|".join(map(str, k))] for k in keys}
    steady = (f"; BE tok/s and the prefill bound from {args.steady_from_s:.0f} s to the horizon (steady state)"
              if args.steady_from_s is not None else "")  # fmt: skip
    lines += [f"## 2. BE tokens/s with remote nodes (simulator; horizons: "
              f"{', '.join(f'{r} {h:.0f} s' for r, h in horizons.items())}{steady}; "
              f"{time.perf_counter() - started:.0f} s wall)", "",
              "Bounds are per resource alone: GPU token supply = regime_map.py's `ceiling` at the run's token "
              "budget (every BE token passes the GPU's Dense layers once, prompt or output, at full iterations of "
              "that budget, less the LS tokens); "
              "host/node DRAM = attention bandwidth (80 % of DRAM) ÷ KV bytes a decode step reads at the mean "
              "context; network = a node's link ÷ wire bytes per BE token (fp32 q/k/v out, output back, all "
              "layers).", "",
              "Prefill bound = output tokens of the BE requests the GPU prefilled within the horizon (with "
              "--steady-from-s: within the steady window) ÷ its length (what decode could at most turn out). "
              "KV peak = peak share of host + remote KV held. CPU rows = "
              "mean BE rows decoding on the host and the nodes (0: every BE decode ran in HBM).", "",
              "| policy@budget | setting | BE | nodes | BE tok/s | of which CPU path | × of 0 nodes | gain per node ÷ "
              "one host's DRAM bound | LS att | GPU token supply | DRAM bw bound (host + nodes) | network bound "
              "(nodes) | prefill bound | KV peak | CPU rows | CPU busy | binds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        for setting in settings:
            for be in be_shapes:
                base = sims[(run, setting, be, 0)]["be_tokens_per_s"]
                for nodes in NODE_COUNTS:
                    f = sims[(run, setting, be, nodes)]
                    b = bounds(setting, be, nodes)
                    tok = f["be_tokens_per_s"]
                    dram = b["dram_host"] + nodes * b["dram_per_node"]
                    network = nodes * b["network_per_node"] if nodes else float("inf")
                    gain = (tok - base) / (nodes * b["dram_host"]) if nodes else float("nan")
                    gpu = supply[(setting, be, parse_run(run)[1])]
                    cpu_tok = f["cpu_tokens_per_s"]
                    binds = binding(run, tok, cpu_tok, gpu, dram, network, f["prefill_bound"],
                                    f["host_kv_usage_peak"], f["cpu_rows_mean"])  # fmt: skip
                    lines.append(f"| {run} | {setting} | {be} | {nodes} | {tok:.1f} | {cpu_tok:.1f} | "
                                 f"{tok / base if base else float('nan'):.2f} | {gain:.2f} | "
                                 f"{f['ls_attainment']:.3f} | {gpu:.0f} | {dram:.0f} | {network:.0f} | "
                                 f"{f['prefill_bound']:.0f} | {f['host_kv_usage_peak']:.2f} | "
                                 f"{f['cpu_rows_mean']:.1f} | {f['cpu_busy_share']:.2f} | {binds} |")  # fmt: skip
    lines += ["", f"Wire bytes per BE token: {bounds('70B-H100x4', 'dailymail', 1)['wire_bytes_per_token']:.0f} "
              f"(70B), {bounds('34B-A100x2', 'dailymail', 1)['wire_bytes_per_token']:.0f} (34B)."]
    lines += ["", f"![BE tok/s with remote nodes]({args.out}.png)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick or args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.out}.md").write_text(text)
        raw = {"|".join(map(str, k)): v for k, v in sims.items()}
        (RESULTS / f"{args.out}_runs.json").write_text(json.dumps(raw, indent=0, default=str) + "\n")
        plot(sims, supply, runs, [(s, be) for s in settings for be in be_shapes], RESULTS / f"{args.out}.png")


def plot(sims: dict[tuple[str, str, str, int], dict[str, Any]], supply: dict[tuple[str, str, int], float],
         runs: list[str], cells: list[tuple[str, str]], path: Path) -> None:  # fmt: skip
    """BE tok/s against remote nodes, one panel per setting and BE shape, with the GPU token supply and the
    DRAM bandwidth bound (host + nodes) as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(1, len(cells), figsize=(4 * len(cells), 3.6), squeeze=False)
    axes = grid[0]
    for ax, (setting, be) in zip(axes, cells, strict=True):
        for run in runs:
            ax.plot(NODE_COUNTS, [sims[(run, setting, be, n)]["be_tokens_per_s"] for n in NODE_COUNTS], "o-",
                    label=run)  # fmt: skip
        for budget, style in ((512, "-."), (2048, "--")):
            if (setting, be, budget) in supply:
                ax.axhline(supply[(setting, be, budget)], color="k", ls=style, lw=1,
                           label=f"GPU token supply @{budget}")  # fmt: skip
        dram = [bounds(setting, be, n)["dram_host"] + n * bounds(setting, be, n)["dram_per_node"] for n in NODE_COUNTS]
        ax.plot(NODE_COUNTS, dram, ":", color="grey", label="DRAM bw (host + nodes)")
        top = max(v for k, v in supply.items() if k[:2] == (setting, be))
        ax.set_ylim(0, 1.3 * max(top, *(sims[(r, setting, be, n)]["be_tokens_per_s"] for r in runs
                                        for n in NODE_COUNTS)))  # fmt: skip
        ax.set_title(f"{setting} {be}", fontsize=9)
        ax.set_xlabel("remote nodes")
        ax.set_xticks(NODE_COUNTS)
    axes[0].set_ylabel("BE tokens/s")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
