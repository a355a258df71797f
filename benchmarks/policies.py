"""All scheduling policies on the same model and the same arrival trace: LS SLO attainment and BE throughput.

Policies (engine.policy): by default every policy in scheduler/policies/ (`piggyback serve --help` describes
each), the product `piggyback` and the baselines.

Trace (seeded, the same for every policy): LS requests arrive as a Poisson process with ShareGPT-like
lengths; BE batches of each `--be-levels` size with LongBench-v2-like lengths are kept in flight (closed
loop). Lengths are log-normal around published means (ShareGPT 161 prompt / 338 output tokens as reported
in the vLLM paper; LongBench-v2 8952 / 136 as reported for OmniServe), then scaled so a CPU run stays short
(`--scale` for LS; `--be-prompt-scale`, `--be-output-scale` for BE; on CPU by default 1/8, 1/32 and 1/2,
on a GPU 1). LS requests still running when the trace ends get
`--drain-s` to finish; then anything unfinished counts as a miss, as does every rejected LS request.

On a CPU-only machine the "accelerator" is the same two cores that run BE attention, so the numbers only
show that the control works (LS attainment held as BE load grows); the same script runs unchanged on a GPU.

`CPU busy` is the CPU attention workers' busy share over the run, for policies with a host path: seconds the
workers spent computing tasks (each worker times its own) / (run seconds x workers). With a BE backlog (BE
batch > 0) it says how much of the CPU side the BE rows keep busy, i.e. whether CPU-resident BE decode is
bound by the CPU (share near 1) or by the per-layer pacing of the rows (well below 1). `KV moves`: BE requests
whose KV hybrid placement moved between HBM and host KV (both ways); with HBM spare (`--kv-blocks`) `hybrid`
keeps BE decode in HBM and moves nothing.

    python benchmarks/policies.py [--quick] [--policies piggyback,ls-only,...]   (default: every registered policy)
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import AdmissionRejected, Engine
from piggyback_runtime.hardware import describe_device
from piggyback_runtime.model.loader import LoadedModel, load_model
from piggyback_runtime.request import Request, SamplingParams
from piggyback_runtime.scheduler.policies import policy_names

RESULTS = Path(__file__).parent / "results"
SHAREGPT_MEAN = (161, 338)
LONGBENCH_V2_MEAN = (8952, 136)


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt_len: int
    output_len: int


def _lognormal(rng: random.Random, mean: float, sigma: float, low: int, high: int) -> int:
    mu = math.log(mean) - sigma**2 / 2  # so the distribution's mean is `mean`
    return int(min(high, max(low, rng.lognormvariate(mu, sigma))))


def make_trace(
    seed: int, duration_s: float, ls_rate: float, scale: float, be_scale: tuple[float, float], max_len: int
) -> tuple[list[Arrival], list[Arrival]]:
    """LS arrivals over the run, and a pool of BE requests (consumed in order by the closed loop)."""
    rng = random.Random(seed)
    ls: list[Arrival] = []
    t = rng.expovariate(ls_rate)
    while t < duration_s:
        ls.append(Arrival(t, _lognormal(rng, SHAREGPT_MEAN[0] * scale, 0.8, 4, max_len // 4),
                          _lognormal(rng, SHAREGPT_MEAN[1] * scale, 0.6, 2, max_len // 4)))  # fmt: skip
        t += rng.expovariate(ls_rate)
    be = [
        Arrival(0.0, _lognormal(rng, LONGBENCH_V2_MEAN[0] * be_scale[0], 0.4, 16, max_len // 2),
                _lognormal(rng, LONGBENCH_V2_MEAN[1] * be_scale[1], 0.4, 4, max_len // 8))
        for _ in range(4096)
    ]  # fmt: skip
    return ls, be


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [1] + [rng.randrange(10, 2000) for _ in range(length - 1)]


@dataclass
class Result:
    policy: str
    be_concurrency: int
    ls_offered: int
    ls_rejected: int
    ttft_attained: float
    tpot_attained: float
    both_attained: float
    be_tokens_per_s: float
    cpu_wait_s: float
    cpu_busy_share: float | None  # CPU attention workers' busy share over the run (None: no host path)
    kv_moves: int  # BE KV moves between HBM and host KV (hybrid placement), both ways


def run_policy(
    policy: str, loaded: LoadedModel, ls_trace: list[Arrival], be_pool: list[Arrival], args: argparse.Namespace,
    be_concurrency: int,
) -> Result:  # fmt: skip
    config = RuntimeConfig.from_dict({
        "model": {"uri": args.model}, "device": str(loaded.device),
        "services": [{"name": "chat", "class": "LS", "slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms}},
                     {"name": "batch", "class": "BE"}],
        "engine": {"policy": policy, "max_num_batched_tokens": args.token_budget,
                   "max_num_seqs": min(256, args.token_budget),  # a budget below max_num_seqs is refused
                   "num_kv_blocks": args.kv_blocks, "block_size": 16},
        "piggyback": {"num_host_kv_blocks": args.host_kv_blocks, "max_be_requests": 256,
                      "cpu_threads_per_worker": args.cpu_threads, "num_cpu_workers": args.cpu_workers},
    })  # fmt: skip
    engine = Engine(config, loaded=loaded)
    rng = random.Random(7)
    ls_requests: list[Request] = []
    rejected = 0
    be_requests: list[Request] = []
    be_next = 0
    next_ls = 0
    start = time.monotonic()

    def add_be() -> None:
        nonlocal be_next
        spec = be_pool[be_next % len(be_pool)]
        be_next += 1
        request = Request(f"be{be_next}", "batch", "BE", _prompt(rng, spec.prompt_len),
                          SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True))  # fmt: skip
        engine.add_request(request)
        be_requests.append(request)

    pb = engine.piggyback
    busy_share: float | None = None
    try:
        for _ in range(be_concurrency):
            add_be()
        busy_before_s = pb.pool.busy_seconds() if pb is not None else 0.0
        while True:
            now = time.monotonic() - start
            if now >= args.duration_s:
                break
            while next_ls < len(ls_trace) and ls_trace[next_ls].at_s <= now:
                spec = ls_trace[next_ls]
                next_ls += 1
                params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
                request = Request(f"ls{next_ls}", "chat", "LS", _prompt(rng, spec.prompt_len), params)
                try:
                    engine.add_request(request)
                except AdmissionRejected:
                    rejected += 1
                    continue
                ls_requests.append(request)
            engine.step()
            in_flight = sum(1 for r in be_requests if r.finish_reason is None)
            for _ in range(be_concurrency - in_flight):
                add_be()
        be_tokens = sum(len(r.output_token_ids) for r in be_requests)
        be_rate = be_tokens / args.duration_s
        if pb is not None:
            pb.collect()  # the busy time of tasks done by now
            busy_s = pb.pool.busy_seconds() - busy_before_s
            busy_share = busy_s / (args.duration_s * len(pb.pool.workers))
        for request in be_requests:  # stop the BE batch; let the LS requests finish
            if request.finish_reason is None:
                engine.abort(request.request_id)
        drain_until = time.monotonic() + args.drain_s
        while engine.has_work() and time.monotonic() < drain_until:
            engine.step()
    finally:
        cpu_wait = engine.metrics.cpu_attention_wait_seconds._value.get()
        kv_moves = engine.planner.moves_to_host + engine.planner.moves_to_gpu
        engine.close()
    offered = len(ls_requests) + rejected
    ttft_ok = [
        r for r in ls_requests if r.first_token_s is not None and r.first_token_s - r.arrival_s <= args.ttft_ms / 1e3
    ]

    def tpot_ok(r: Request) -> bool:
        t = r.timing().tpot_s
        return r.finish_reason is not None and (t is None or t <= args.tpot_ms / 1e3)

    tpot_good = [r for r in ls_requests if tpot_ok(r)]
    both = [r for r in ttft_ok if tpot_ok(r)]
    share = (lambda n: n / offered) if offered else (lambda n: 1.0)
    return Result(policy, be_concurrency, offered, rejected, share(len(ttft_ok)), share(len(tpot_good)),
                  share(len(both)), be_rate, cpu_wait, busy_share, kv_moves)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--model", default="synthetic://llama-3-8b" if gpu else "synthetic://small-llama")
    parser.add_argument("--policies", default=",".join(policy_names()), help="comma-separated (default: all)")
    parser.add_argument("--be-levels", default="0,8,32", help="BE batch sizes kept in flight (comma-separated)")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--drain-s", type=float, default=15.0)
    parser.add_argument("--ls-rate", type=float, default=2.0 if not gpu else 4.0, help="LS requests/s")
    parser.add_argument("--scale", type=float, default=1.0 if gpu else 1 / 8, help="length scale of LS requests")
    parser.add_argument("--be-prompt-scale", type=float, default=1.0 if gpu else 1 / 32)
    parser.add_argument("--be-output-scale", type=float, default=1.0 if gpu else 1 / 2)
    # On this CPU an LS-only iteration of small-llama takes ~11 ms: 30 ms TPOT leaves room for some BE work only.
    parser.add_argument("--ttft-ms", type=float, default=1000.0 if gpu else 500.0)
    parser.add_argument("--tpot-ms", type=float, default=100.0 if gpu else 30.0)
    parser.add_argument("--token-budget", type=int, default=256 if not gpu else 1024)
    parser.add_argument("--kv-blocks", type=int, default=1024)
    parser.add_argument("--host-kv-blocks", type=int, default=8192)
    parser.add_argument("--cpu-threads", type=int, default=1 if not gpu else 8)
    parser.add_argument("--cpu-workers", type=int, default=1, help="CPU attention worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="three policies, two BE levels, short runs")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="where policies.md and policies.png go (default: benchmarks/results)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.policies, args.be_levels, args.duration_s, args.drain_s = "hybrid,piggyback,priority", "0,16", 12.0, 8.0
    device = "cuda" if gpu else "cpu"
    base = RuntimeConfig.from_dict({"model": {"uri": args.model}, "device": device,
                                    "services": [{"name": "x", "class": "BE"}]})  # fmt: skip
    loaded = load_model(base.model, device)
    be_scale = (args.be_prompt_scale, args.be_output_scale)
    ls_trace, be_pool = make_trace(args.seed, args.duration_s, args.ls_rate, args.scale, be_scale, loaded.max_model_len)
    where = describe_device(device)
    description = (
        f"{args.model} on {where}; LS Poisson {args.ls_rate}/s ({len(ls_trace)} requests), SLO TTFT "
        f"{args.ttft_ms:.0f} ms / TPOT {args.tpot_ms:.0f} ms, {args.duration_s:.0f} s per run, length scales: LS "
        f"{args.scale:g}, BE prompt {args.be_prompt_scale:g} / output {args.be_output_scale:g}"
    )
    print(description)
    results = []
    for level in (int(x) for x in args.be_levels.split(",")):
        for policy in args.policies.split(","):
            result = run_policy(policy, loaded, ls_trace, be_pool, args, level)
            results.append(result)
            print(
                f"  BE {level:3d}  {policy:9}  LS attained {result.both_attained:6.1%}  "
                f"BE {result.be_tokens_per_s:7.1f} tok/s  rejected {result.ls_rejected}  "
                f"CPU busy {_share(result.cpu_busy_share)}  KV moves {result.kv_moves}",
                flush=True,
            )
    header = (
        f"{'BE batch':>8} {'policy':10} {'LS offered':>10} {'rejected':>8} {'TTFT ok':>8} {'TPOT ok':>8} "
        f"{'LS SLO ok':>9} {'BE tok/s':>9} {'CPU wait s':>10} {'CPU busy':>8} {'KV moves':>8}"
    )
    lines = [header, "-" * len(header)]
    lines += [f"{r.be_concurrency:8d} {r.policy:10} {r.ls_offered:10d} {r.ls_rejected:8d} {r.ttft_attained:8.1%} "
              f"{r.tpot_attained:8.1%} {r.both_attained:9.1%} {r.be_tokens_per_s:9.1f} {r.cpu_wait_s:10.2f} "
              f"{_share(r.cpu_busy_share):>8} {r.kv_moves:8d}"
              for r in results]  # fmt: skip
    print("\n" + "\n".join(lines))
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/policies.py" + (" --quick" if args.quick else "") + (
        f" --cpu-workers {args.cpu_workers}" if args.cpu_workers != 1 else "")
    (results_dir / "policies.md").write_text(
        f"# Policies side by side\n\nCommand: `{command}`\n\n{description}\n\n```\n" + "\n".join(lines)
        + "\n```\n\n![policies](policies.png)\n"
    )
    _plot(results, results_dir / "policies.png", f"{args.model} on {where}")
    print(f"\nplot: {results_dir / 'policies.png'}")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r.policy for r in results))
    levels = sorted({r.be_concurrency for r in results})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in policies:
        rows = [next(r for r in results if r.policy == policy and r.be_concurrency == lv) for lv in levels]
        left.plot(levels, [r.both_attained * 100 for r in rows], marker="o", label=policy)
        right.plot(levels, [r.be_tokens_per_s for r in rows], marker="o", label=policy)
    left.set(xlabel="BE requests in flight", ylabel="LS SLO attainment (%)", ylim=(0, 105), title="LS SLO attainment")
    right.set(xlabel="BE requests in flight", ylabel="BE output tokens/s", title="BE throughput")
    left.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
