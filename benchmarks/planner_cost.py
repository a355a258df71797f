"""Cost of the SLO controller per iteration at high concurrency, as a share of an iteration's own time.

512 running requests (a quarter LS, the rest BE, with ShareGPT-like LS and LongBench-like BE lengths) are
held as the engine holds them (`Request` objects). Each iteration measures:
- gather: the O(n) pass turning the engine's requests into `LSRequestState`s and an `IterationDemand`;
- choose: `SLOController.choose` (the two binary searches);
- admit: `SLOController.admit_ls` for one new LS arrival (per arrival, not per iteration, but timed each time);
then advances every request by a token, so no two iterations see the same state.
The typical iteration time comes from a latency profile of synthetic://small-llama on this machine (profiled
now, or read from the profile cache), and, as a GPU reference, from any cached GPU profile.

    python benchmarks/planner_cost.py [--requests 512] [--iterations 3000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from piggyback_runtime.request import Request, SamplingParams, SLOTarget
from piggyback_runtime.scheduler.latency_model import (
    LatencyModel,
    ProfileKey,
    default_profile_dir,
    prefill_chunk_load,
)
from piggyback_runtime.scheduler.slo_control import (
    IterationDemand,
    LSRequestState,
    NewLSRequest,
    PrefillChunk,
    SLOController,
)

RESULTS = Path(__file__).parent / "results"
LS_SLO = SLOTarget(ttft_s=2.0, tpot_s=0.1)
CHUNK = 512


def build_requests(n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    requests: list[Request] = []
    for i in range(n):
        ls = i % 4 == 0
        prompt = int(rng.lognormvariate(5.5, 0.8)) + 1 if ls else rng.randint(1000, 9000)
        output = int(rng.lognormvariate(5.0, 0.7)) + 2 if ls else rng.randint(100, 400)
        request = Request(
            f"r{i}",
            "chat" if ls else "batch",
            "LS" if ls else "BE",
            [1] * prompt,
            SamplingParams(max_tokens=output),
            slo=LS_SLO if ls else None,
            arrival_s=-rng.uniform(0, 30),
        )
        # Most are decoding already (some tokens out); a few LS are still prefilling.
        if ls and rng.random() < 0.05:
            request.num_computed_tokens = rng.randrange(0, prompt)
        else:
            request.output_token_ids = [0] * rng.randint(1, output)
            request.num_computed_tokens = request.num_tokens - 1
            request.first_token_s = request.arrival_s + 0.5
        requests.append(request)
    return requests


def gather(requests: list[Request], now_s: float) -> tuple[list[LSRequestState], IterationDemand]:
    """What the engine does each iteration: one pass over its LS requests (FCFS order), sums for BE."""
    states: list[LSRequestState] = []
    decode_rows = 0
    decode_load = 0
    chunks: list[PrefillChunk] = []
    budget = CHUNK
    be_rows = 0
    for r in requests:
        if r.service_class != "LS":
            be_rows += 1
            continue
        slo = r.slo
        assert slo is not None
        computed = r.num_computed_tokens
        remaining = len(r.prompt_token_ids) - computed
        if remaining > 0:
            deadline = r.arrival_s + slo.ttft_s
            states.append(LSRequestState(slo.tpot_s, deadline, remaining, computed))
            take = min(remaining, budget)
            if take > 0:
                chunks.append(PrefillChunk(take, prefill_chunk_load(computed, take)))
                budget -= take
        else:
            states.append(LSRequestState(slo.tpot_s, None, 0, computed + 1))
            decode_rows += 1
            decode_load += computed + 1
    demand = IterationDemand(
        ls_decode_rows=decode_rows,
        ls_decode_attention_load=float(decode_load),
        ls_prefill_chunks=chunks,
        be_prefill_tokens_available=max(0, budget - decode_rows),
        be_prefill_context_start=0,
        be_decode_rows_ready=be_rows,  # every BE row ready at some layer (CPU attention done)
    )
    return states, demand


def advance(requests: list[Request]) -> None:
    for r in requests:
        if r.num_remaining_tokens == 1 and r.output_token_ids:
            r.output_token_ids.append(0)
            r.num_computed_tokens += 1
        else:
            r.num_computed_tokens = min(r.num_computed_tokens + 64, len(r.prompt_token_ids))


def measure(model: LatencyModel, n: int, iterations: int) -> dict[str, list[float]]:
    requests = build_requests(n, seed=n)
    controller = SLOController(model, safety_margin=0.1, ls_chunk_tokens=CHUNK)
    new = NewLSRequest(prompt_tokens=300, ttft_s=LS_SLO.ttft_s, tpot_s=LS_SLO.tpot_s, arrival_s=0.0)
    times: dict[str, list[float]] = {"gather": [], "choose": [], "admit": [], "total": []}
    clock = time.perf_counter_ns
    for i in range(iterations):
        now = i * 0.05
        t0 = clock()
        states, demand = gather(requests, now)
        t1 = clock()
        controller.choose(demand, states, now)
        t2 = clock()
        controller.admit_ls(new, states, demand, now)
        t3 = clock()
        times["gather"].append((t1 - t0) / 1e3)
        times["choose"].append((t2 - t1) / 1e3)
        times["admit"].append((t3 - t2) / 1e3)
        times["total"].append((t3 - t0) / 1e3)
        if i % 10 == 0:
            advance(requests)
    return times


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def typical_iteration_s(model: LatencyModel, n: int) -> tuple[float, float]:
    """(planned, light): the latency the controller predicts for the benchmark's own iteration at n requests,
    and a light decode-only iteration of the LS rows alone (the worst case for the planner's share)."""
    requests = build_requests(n, seed=n)
    states, demand = gather(requests, 0.0)
    controller = SLOController(model, safety_margin=0.1, ls_chunk_tokens=CHUNK)
    planned = controller.choose(demand, states, 0.0).predicted_latency_s
    light = model.predict_parts(demand.ls_decode_rows, 0.0, demand.ls_decode_attention_load)
    return planned, light


def cached_gpu_profiles() -> list[tuple[ProfileKey, LatencyModel]]:
    found = []
    for path in sorted(default_profile_dir().glob("profile-*.json")):
        try:
            key, model = LatencyModel.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not key.device_name.startswith("cpu"):
            found.append((key, model))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()

    from piggyback_runtime.config import ModelConfig
    from piggyback_runtime.model.loader import load_model
    from piggyback_runtime.profiler import load_or_profile, profile_key

    loaded = load_model(ModelConfig(uri="synthetic://small-llama"), "cpu")
    started = time.perf_counter()
    cpu_model = load_or_profile(loaded)
    elapsed = time.perf_counter() - started
    print(f"CPU profile of synthetic://small-llama ({profile_key(loaded).device_name}): {elapsed:.1f} s")

    sweep = sorted({64, 128, 256, args.requests})
    results = {n: measure(cpu_model, n, args.iterations if n == args.requests else args.iterations // 3) for n in sweep}
    header = f"{'requests':>8} {'part':>7} {'median µs':>10} {'p99 µs':>8}"
    print("\nplanner cost per iteration (this machine, pure Python)\n" + header)
    for n in sweep:
        for part in ("gather", "choose", "admit", "total"):
            times = results[n][part]
            print(f"{n:>8} {part:>7} {statistics.median(times):>10.1f} {p(times, 0.99):>8.1f}")

    total = results[args.requests]["total"]
    median_us, p99_us = statistics.median(total), p(total, 0.99)
    references: list[tuple[str, float, float]] = []
    planned, light = typical_iteration_s(cpu_model, args.requests)
    references.append(("small-llama, this CPU", planned, light))
    gpu = cached_gpu_profiles()
    for key, model in gpu:
        planned, light = typical_iteration_s(model, args.requests)
        references.append((f"{key.model_uri.removeprefix('synthetic://')}, {key.device_name}", planned, light))
    print(
        f"\nshare of an iteration at {args.requests} running requests "
        f"(planner median {median_us:.0f} µs, p99 {p99_us:.0f} µs)"
    )
    print(f"{'profile':<44} {'planned ms':>10} {'median share':>12} {'p99 share':>9} {'light ms':>9} {'p99 share':>9}")
    for name, planned, light in references:
        print(
            f"{name[:44]:<44} {planned * 1e3:>10.2f} {median_us / (planned * 1e6):>12.3%} "
            f"{p99_us / (planned * 1e6):>9.3%} {light * 1e3:>9.2f} {p99_us / (light * 1e6):>9.3%}"
        )
    if not gpu:
        print("GPU reference: no GPU profile (run `piggyback profile` on a GPU machine to cache one)")
    _plot(results, sweep, references, median_us, RESULTS / "planner_cost.png")
    print(f"\nplot: {RESULTS / 'planner_cost.png'}")


def _plot(
    results: dict[int, dict[str, list[float]]],
    sweep: list[int],
    references: list[tuple[str, float, float]],
    median_us: float,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for part in ("gather", "choose", "admit", "total"):
        left.plot(sweep, [statistics.median(results[n][part]) for n in sweep], marker="o", label=f"{part} (median)")
    left.plot(sweep, [p(results[n]["total"], 0.99) for n in sweep], marker="x", linestyle="--", label="total (p99)")
    left.set_xlabel("running requests")
    left.set_ylabel("µs per iteration")
    left.set_title("SLO controller cost per iteration")
    left.legend(fontsize=8)
    names = [name for name, _, _ in references]
    planned_share = [median_us / (planned * 1e6) * 100 for _, planned, _ in references]
    light_share = [median_us / (light * 1e6) * 100 for _, _, light in references]
    right.barh(names, light_share, color="tab:orange", label="light iteration (LS decodes only)")
    right.barh(names, planned_share, color="tab:blue", label="planned iteration (LS + BE allowance)")
    right.set_xlabel("% of iteration time (median planner cost)")
    right.set_title(f"share at {sweep[-1]} requests")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
