"""LS per-token latency with and without a heavy BE load, same process, same run, same weights.

Runs of one engine configuration, one after another in one process (the model is loaded once and shared):
1. LS only: the LS requests alone (policy `piggyback`, nothing on its BE path).
2. LS + BE, policy `piggyback`: the same LS requests plus a BE batch whose KV lives in host DRAM and whose
   decode attention runs on a CPU worker process, merged into the Dense batch layer by layer (the product).
3. LS + BE, policy `priority`: the same, with BE entirely on the accelerator after all LS work (baseline);
   `--baselines` adds or swaps other policies (ls-only, headroom, neo).
SLO control stays as configured by default (on), with a loose LS SLO by default so that it does not bind
and the ratio measures the path itself; `--tpot-ms` makes it bind (then BE throughput gives way instead).

Workload. The BE batch (long prompts) is submitted at t=0. By default the LS arrival clock starts once every
BE request has its first token, i.e. BE prefill is over and BE is decoding: BE prefill runs on the
accelerator in chunks at low priority under both policies, and what the piggyback path changes is where BE
decode attention runs, so that is the load the LS requests see (`--ls-start t0` lets LS arrive from t=0,
during BE prefill). LS requests arrive open-loop as a seeded Poisson process; the rate is set from a warm-up
on this machine (Little's law: `--ls-concurrency` requests in flight on average when LS runs alone), and
the same arrival offsets are replayed in every run. Greedy decoding, ignore_eos, fixed lengths. A run ends
when its last LS request finishes; BE requests still running then are aborted. BE outputs are long enough by
default that BE load lasts the whole LS window (the `BE left` and `BE overlap` columns show it did).

Measured (definitions from DESIGN.md, on the engine's own monotonic timestamps): per LS request TTFT
(arrival -> first token) and TPOT ((last token - first token) / (n - 1)); p50/p90/p99 over the requests; BE
output tokens/s during the LS window; the ratios of LS TPOT p50 and p99 to run 1; whether LS greedy outputs
match run 1's; and how much CPU other processes used meanwhile (a shared host skews every figure).

On a CPU-only host the "accelerator" is the same cores that run the CPU attention worker, so BE work
competes with LS compute for them: the ratio is an upper bound on the interference. On a GPU host LS compute
runs on the GPU and BE attention on host cores: there the ratio is the product's promise (close to 1).

    python benchmarks/interference.py [--model synthetic://small-llama] [--quick] [--baselines priority,neo]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import AdmissionRejected, Engine
from piggyback_runtime.hardware import describe_device
from piggyback_runtime.model.loader import LoadedModel, load_model
from piggyback_runtime.request import FINISH_ERROR, Request, SamplingParams
from piggyback_runtime.scheduler.policies import policy_names

RESULTS = Path(__file__).parent / "results"
LS, BE = "chat", "batch"
PERCENTILES = (50, 90, 99)
FOREIGN_WARN_CORES = 0.15

MEANING_CPU = (
    "CPU-only host: the 'accelerator' is these same CPU cores, which also run the BE attention worker, so BE "
    "work competes with LS compute for them. A ratio above 1 here is the cost of sharing the cores, an upper "
    "bound on the interference: on a GPU host LS compute runs on the GPU and BE attention on host cores, and the "
    "ratio is the product's promise (close to 1). The baseline rows carry the same BE load without the piggyback path."
)
MEANING_GPU = (
    "GPU host: LS compute runs on the GPU and BE attention on host cores; BE rows only join the GPU's Dense "
    "batches. The piggyback ratio is the product's promise: close to 1. The priority row is the same BE load "
    "without the piggyback path."
)


@dataclass
class RunResult:
    name: str
    policy: str
    ttft_s: list[float]
    tpot_s: list[float]
    ls_tokens: dict[str, list[int]]
    window_s: float  # first LS arrival -> last LS token
    be_tokens_window: int  # BE output tokens emitted during the LS window
    be_tokens: int  # BE output tokens over the whole run (prefill phase included)
    be_left: int  # BE requests still running when the LS window closed (then aborted)
    be_overlap: float  # fraction of the LS window during which BE requests were still running
    be_prefill_s: float  # BE submission -> every BE request has its first token
    wall_s: float
    steps: int
    foreign_cores: float | None  # CPU use by processes other than this benchmark's, in cores, over the run
    rejected: int  # LS requests refused by admission control (SLO control, policy `piggyback`)
    failed: list[str] = field(default_factory=list)

    def p(self, values: list[float], q: int) -> float:
        return float(np.percentile(values, q)) if values else float("nan")


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(10, 2000) for _ in range(length - 1)] for _ in range(count)]


def poisson_offsets(count: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, offsets = 0.0, []
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def make_config(args: argparse.Namespace, device: str, policy: str, ls_len: int, be_len: int) -> RuntimeConfig:
    blocks = lambda tokens: -(-tokens // 16)  # noqa: E731
    ls_blocks = (args.ls_requests + args.ls_concurrency) * blocks(ls_len)
    be_blocks = args.be_requests * blocks(be_len)
    return RuntimeConfig.from_dict({
        "model": {"uri": args.model}, "device": device,
        "services": [{"name": LS, "class": "LS", "slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms}},
                     {"name": BE, "class": "BE"}],
        "slo_control": {"enabled": not args.no_slo_control},
        "engine": {"policy": policy, "block_size": 16, "num_kv_blocks": ls_blocks + be_blocks + 16,
                   # A budget below max_num_seqs is refused: a small --token-budget runs as few sequences.
                   "max_num_seqs": min(256, args.token_budget), "max_num_batched_tokens": args.token_budget},
        # Host KV and slots for LS too: policy `neo` decodes LS requests on the host path as well.
        "piggyback": {"num_host_kv_blocks": ls_blocks + be_blocks + 16,
                      "max_be_requests": args.be_requests + args.ls_requests + args.ls_concurrency,
                      "num_cpu_workers": 1, "cpu_threads_per_worker": args.cpu_threads,
                      "max_be_rows_per_layer": args.max_be_rows},
    })  # fmt: skip


def _cpu_ticks(engine: Engine) -> tuple[int, int] | None:
    """(busy ticks of the whole host, ticks of this process and its CPU workers) from /proc, or None."""
    pids = [os.getpid()]
    if engine.piggyback is not None:
        pids += [pid for pid in engine.piggyback.pool.pids() if pid is not None]
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        ours = 0
        for pid in pids:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ours += sum(int(v) for v in stat.rsplit(")", 1)[1].split()[11:13])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return sum(fields) - fields[3] - fields[4], ours


def warm_up(engine: Engine, ls_prompts: list[list[int]], max_tokens: int) -> float:
    """Run these LS requests together to completion; the mean arrival -> last token time."""
    requests = [Request(f"warm{i}-{time.monotonic_ns()}", LS, "LS", list(p), greedy(max_tokens))
                for i, p in enumerate(ls_prompts)]  # fmt: skip
    admitted = []
    for request in requests:
        try:
            engine.add_request(request)
            admitted.append(request)
        except AdmissionRejected:
            pass
    while engine.has_work():
        engine.step()
    if not admitted:
        return 1.0
    return sum(r.last_token_s - r.arrival_s for r in admitted) / len(admitted)


def drive(
    engine: Engine, name: str, ls_prompts: list[list[int]], offsets: list[float], ls_out: int,
    be_prompts: list[list[int]], be_out: int, ls_after_be_prefill: bool,
) -> RunResult:  # fmt: skip
    """Drive the engine from this thread: step, and add each LS request at its arrival time (wall clock)."""
    started = time.monotonic()
    ticks = _cpu_ticks(engine)
    be = [Request(f"be{i}", BE, "BE", list(p), greedy(be_out)) for i, p in enumerate(be_prompts)]
    for request in be:
        engine.add_request(request)
    steps = 0
    failed: list[str] = []
    be_token_times: list[tuple[float, int]] = []

    def step() -> None:
        nonlocal steps
        outputs = engine.step()
        steps += 1
        now = time.monotonic()
        count = 0
        for out in outputs:
            if out.finish_reason == FINISH_ERROR:
                failed.append(f"{out.request_id}: {out.error}")
            if out.request_id.startswith("be"):
                count += len(out.new_token_ids)
        if count:
            be_token_times.append((now, count))

    while ls_after_be_prefill and be and engine.has_work() and any(r.first_token_s is None for r in be):
        step()
    be_prefill_s = time.monotonic() - started if be else 0.0
    ls_start = time.monotonic()
    arrivals = deque((ls_start + offset, i) for i, offset in enumerate(offsets))
    ls: list[Request] = []
    rejected = 0
    while arrivals or any(r.finish_reason is None for r in ls):
        now = time.monotonic()
        while arrivals and arrivals[0][0] <= now:
            at, i = arrivals.popleft()
            # The request reached the runtime at its scheduled time: queueing behind a running step is TTFT.
            request = Request(f"ls{i}", LS, "LS", list(ls_prompts[i]), greedy(ls_out), arrival_s=at)
            try:
                engine.add_request(request)
            except AdmissionRejected:
                rejected += 1  # a miss (DESIGN.md); no retry here, the arrival trace stays the same
                continue
            ls.append(request)
        if engine.has_work():
            step()
        elif arrivals:
            time.sleep(max(0.0, min(arrivals[0][0] - time.monotonic(), 0.05)))
    # The LS window is over: BE requests still running are aborted (as if their clients left), so the run's
    # length is set by the LS requests, and the BE load lasts for the whole window when BE outputs are long.
    be_left = sum(r.finish_reason is None for r in be)
    for request in be:
        if request.finish_reason is None:
            engine.abort(request.request_id)
    while engine.has_work():  # in-flight CPU tasks of aborted rows report back before the engine closes
        step()
    ended = time.monotonic()
    foreign = None
    if ticks is not None and (now_ticks := _cpu_ticks(engine)) is not None:
        host, ours = (b - a for a, b in zip(ticks, now_ticks, strict=True))
        foreign = max(0.0, (host - ours) / os.sysconf("SC_CLK_TCK") / max(ended - started, 1e-9))
    ls_end = max((r.last_token_s or ls_start for r in ls), default=ls_start)
    be_end = ls_end if be_left else max((r.last_token_s or started for r in be), default=started)
    window = max(ls_end - ls_start, 1e-9)
    timings = [r.timing() for r in ls]
    return RunResult(
        name=name,
        policy=engine.config.engine.policy,
        ttft_s=[t.ttft_s for t in timings if t.ttft_s is not None],
        tpot_s=[t.tpot_s for t in timings if t.tpot_s is not None],
        ls_tokens={r.request_id: list(r.output_token_ids) for r in ls},
        window_s=window,
        be_tokens_window=sum(n for t, n in be_token_times if ls_start <= t <= ls_end),
        be_tokens=sum(len(r.output_token_ids) for r in be),
        be_left=be_left,
        be_overlap=min(1.0, max(0.0, (be_end - ls_start) / window)) if be else 0.0,
        be_prefill_s=be_prefill_s,
        wall_s=ended - started,
        steps=steps,
        foreign_cores=foreign,
        rejected=rejected,
        failed=failed,
    )


def run_one(
    args: argparse.Namespace, loaded: LoadedModel, device: str, name: str, policy: str,
    ls_prompts: list[list[int]], offsets: list[float] | None, be_prompts: list[list[int]],
) -> tuple[RunResult, list[float]]:  # fmt: skip
    ls_len, be_len = args.ls_prompt_len + args.ls_out, args.be_prompt_len + args.be_out
    engine = Engine(make_config(args, device, policy, ls_len, be_len), loaded=loaded)
    try:
        # Warm-up with LS alone: kernels, allocator, and (first run) the LS arrival rate.
        warm_up(engine, ls_prompts[: args.ls_concurrency], args.ls_out)  # the first pass pays one-off costs
        mean_s = warm_up(engine, ls_prompts[: args.ls_concurrency], args.ls_out)
        if offsets is None:
            rate = args.ls_rate or args.ls_concurrency / mean_s
            offsets = poisson_offsets(args.ls_requests, rate, seed=args.seed)
            print(f"  warm-up: {args.ls_concurrency} LS requests together took {mean_s:.2f} s each on average -> "
                  f"LS arrival rate {rate:.2f}/s (Poisson, seed {args.seed})", flush=True)  # fmt: skip
        result = drive(engine, name, ls_prompts, offsets, args.ls_out, be_prompts, args.be_out,
                       ls_after_be_prefill=args.ls_start == "be-decode")  # fmt: skip
    finally:
        engine.close()
    return result, offsets


def cpu_attention_kernel() -> str:
    """Build (or load from its cache) the native CPU attention kernel here, before any run: a worker builds it
    on its first task otherwise, and BE decode would stall for the whole compile inside a measured run."""
    try:
        from piggyback_runtime.attention import cpu_attention
    except ImportError:
        return "unknown"
    started = time.perf_counter()
    name = cpu_attention.kernel_name()
    if (elapsed := time.perf_counter() - started) > 1.0:
        print(f"CPU attention kernel {name}: built in {elapsed:.0f} s", flush=True)
    return name


def machine(device: str) -> str:
    """The accelerator (GPU name, or the CPU), plus the host CPU and how busy the host was before the start."""
    text = describe_device(device)
    if device.startswith("cuda"):
        text += f"; host: {describe_device('cpu')}"
    text += f", torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)"
    if (busy := _host_busy()) is not None:  # other work on the host skews every run: say how busy it was
        text += f", host {busy * 100:.0f}% busy in the second before the start"
    return text


def _host_busy(interval_s: float = 1.0) -> float | None:
    """Share of all cores' time spent busy over `interval_s` (from /proc/stat), or None off Linux."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic://small-llama")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--quick", action="store_true", help="fewer LS and BE requests (about a minute on 2 cores)")
    parser.add_argument("--ls-requests", type=int, help="default 32 (16 with --quick)")
    parser.add_argument("--ls-prompt-len", type=int, default=64)
    parser.add_argument("--ls-out", type=int, default=64)
    parser.add_argument("--ls-concurrency", type=int, default=4, help="mean LS requests in flight, LS alone")
    parser.add_argument("--ls-rate", type=float, help="LS arrivals per second (default: from the warm-up)")
    parser.add_argument("--ls-start", choices=("be-decode", "t0"), default="be-decode",
                        help="LS arrivals start once BE prefill is over (default), or at t=0 with the BE batch")
    parser.add_argument("--be-requests", type=int, help="default 64 (32 with --quick)")
    parser.add_argument("--be-prompt-len", type=int, default=512)
    parser.add_argument("--be-out", type=int, help="BE max_tokens; default 512 (256 with --quick)")
    parser.add_argument("--token-budget", type=int, default=512, help="engine.max_num_batched_tokens")
    parser.add_argument("--cpu-threads", type=int,
                        help="piggyback.cpu_threads_per_worker (default: 1 on a host with 2 cores or fewer, "
                             "else the runtime's default)")  # fmt: skip
    parser.add_argument("--max-be-rows", type=int, default=64, help="piggyback.max_be_rows_per_layer")
    parser.add_argument("--baselines", default="priority",
                        help="comma-separated policies to compare with piggyback (of "
                             f"{', '.join(n for n in policy_names() if n != 'piggyback')})")  # fmt: skip
    parser.add_argument("--ttft-ms", type=float, default=60_000, help="LS SLO; the default is loose on purpose")
    parser.add_argument("--tpot-ms", type=float, default=10_000,
                        help="LS SLO; the default is loose so SLO control does not bind and the ratio measures the "
                             "path itself (set it to watch SLO control trade BE throughput for LS latency)")
    parser.add_argument("--no-slo-control", action="store_true", help="slo_control.enabled = false")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.ls_requests = args.ls_requests or (16 if args.quick else 32)
    args.be_requests = args.be_requests if args.be_requests is not None else (32 if args.quick else 64)
    args.be_out = args.be_out or (256 if args.quick else 512)
    if args.cpu_threads is None and (os.cpu_count() or 1) <= 2:
        args.cpu_threads = 1
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    base = RuntimeConfig.from_dict({"model": {"uri": args.model}, "services": [{"name": BE, "class": "BE"}]})
    loaded = load_model(base.model, device)
    kernel = cpu_attention_kernel()
    host = machine(device)
    meaning = MEANING_GPU if device.startswith("cuda") else MEANING_CPU
    print(f"model {args.model} on {device}, {loaded.dtype}; {host}")
    print(f"LS: {args.ls_requests} requests, prompt {args.ls_prompt_len}, output {args.ls_out} tokens; "
          f"BE: {args.be_requests} requests, prompt {args.be_prompt_len}, output {args.be_out} tokens, at t=0; "
          f"LS arrivals start {'after BE prefill' if args.ls_start == 'be-decode' else 'at t=0'}; "
          f"CPU attention: 1 worker x {args.cpu_threads or 'default'} threads, kernel {kernel}",
          flush=True)  # fmt: skip
    ls_prompts = prompts(args.ls_requests, args.ls_prompt_len, seed=args.seed)
    be_prompts = prompts(args.be_requests, args.be_prompt_len, seed=args.seed + 1)
    runs = [("LS only", "piggyback", []), ("LS + BE, piggyback", "piggyback", be_prompts)]
    runs += [(f"LS + BE, {policy}", policy, be_prompts) for policy in args.baselines.split(",") if policy]
    results: list[RunResult] = []
    offsets: list[float] | None = None
    for name, policy, be in runs:
        print(f"run: {name} (policy {policy})", flush=True)
        result, offsets = run_one(args, loaded, device, name, policy, ls_prompts, offsets, be)
        results.append(result)
        print(f"  {result.wall_s:.1f} s, {result.steps} steps, LS TPOT p50 {result.p(result.tpot_s, 50) * 1e3:.1f} ms"
              + (f", BE prefill {result.be_prefill_s:.1f} s, {result.be_tokens} BE tokens, {result.be_left} BE "
                 "requests still running at the end of the LS window (aborted)" if be else ""), flush=True)  # fmt: skip
        for failure in result.failed:
            print(f"  FAILED {failure}", flush=True)
        if result.foreign_cores is not None and result.foreign_cores > FOREIGN_WARN_CORES:
            print(f"  WARNING: other processes used {result.foreign_cores:.2f} cores during this run; "
                  "its figures are skewed (run again on a quiet host)", flush=True)  # fmt: skip
    table = render(results)
    runtime_s = time.perf_counter() - started
    print("\n" + table + "\n\n" + "\n".join(_wrap(meaning)))
    print(f"\nruntime {runtime_s:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    title = f"{args.model} on {device}: LS TPOT with and without BE load"
    _plot(results, RESULTS / "interference.png", title)
    command = "python benchmarks/interference.py " + " ".join(sys.argv[1:])
    _write_md(RESULTS / "interference.md", command.strip(), host, args, device, table, meaning, results, runtime_s,
              kernel)  # fmt: skip
    print(f"plot: {RESULTS / 'interference.png'}\ntable: {RESULTS / 'interference.md'}")


def render(results: list[RunResult]) -> str:
    base = results[0]
    header = (f"{'run':20} {'LS TTFT ms p50/p90/p99':>24} {'LS TPOT ms p50/p90/p99':>24} {'TPOT p50 x':>10} "
              f"{'TPOT p99 x':>10} {'BE tok/s LS window':>18} {'BE left':>7} {'BE overlap':>10} "
              f"{'LS same':>7} {'LS rej':>6} {'other CPU':>9}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in results:
        ttft = "/".join(f"{r.p(r.ttft_s, q) * 1e3:.0f}" for q in PERCENTILES)
        tpot = "/".join(f"{r.p(r.tpot_s, q) * 1e3:.1f}" for q in PERCENTILES)
        p50 = r.p(r.tpot_s, 50) / base.p(base.tpot_s, 50)
        p99 = r.p(r.tpot_s, 99) / base.p(base.tpot_s, 99)
        be_window = f"{r.be_tokens_window / r.window_s:.0f}" if r.be_tokens else "-"
        be_left = f"{r.be_left}" if r.be_tokens else "-"
        overlap = f"{r.be_overlap * 100:.0f}%" if r.be_tokens else "-"
        same = sum(r.ls_tokens.get(k) == v for k, v in base.ls_tokens.items())
        other = "?" if r.foreign_cores is None else f"{r.foreign_cores:.2f}"
        lines.append(f"{r.name:20} {ttft:>24} {tpot:>24} {p50:9.2f}x {p99:9.2f}x {be_window:>18} {be_left:>7} "
                     f"{overlap:>10} {same:>3}/{len(base.ls_tokens):<3} {r.rejected:>6} {other:>9}")  # fmt: skip
    return "\n".join(lines)


def _wrap(text: str, width: int = 110) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]


def _write_md(
    path: Path, command: str, host: str, args: argparse.Namespace, device: str, table: str, meaning: str,
    results: list[RunResult], runtime_s: float, kernel: str,
) -> None:  # fmt: skip
    failures = [f"- {r.name}: {f}" for r in results for f in r.failed]
    busy = [r.name for r in results if r.foreign_cores is not None and r.foreign_cores > FOREIGN_WARN_CORES]
    shared = f"\nShared host: other processes used CPU during {', '.join(busy)}; those figures are skewed.\n"
    shared = shared if busy else ""
    loose = " (loose on purpose: the controller does not bind, so the ratio measures the path itself)" if (
        args.ttft_ms >= 60_000 and args.tpot_ms >= 10_000) else ""  # fmt: skip
    text = f"""# LS interference from a heavy BE load

Command: `{command}` ({runtime_s:.0f} s)

Machine: {host}; device `{device}`.

Workload: model `{args.model}`. LS: {args.ls_requests} requests, prompt {args.ls_prompt_len} tokens, \
{args.ls_out} output tokens, greedy, ignore_eos, seeded Poisson arrivals at a rate giving \
{args.ls_concurrency} LS requests in flight on average when LS runs alone (calibrated by a warm-up; the same \
arrival offsets in every run). BE: {args.be_requests} requests, prompt {args.be_prompt_len} tokens, \
{args.be_out} output tokens, all submitted at t=0; LS arrivals start \
{"once every BE request has its first token (BE prefill over, BE decoding)" if args.ls_start == "be-decode"
 else "at t=0, during BE prefill"}. Engine: token budget {args.token_budget}, block size 16; piggyback path: \
1 CPU attention worker x {args.cpu_threads or "default"} threads, CPU attention kernel `{kernel}`, \
`max_be_rows_per_layer` {args.max_be_rows}. SLO control (policy `piggyback`): \
{"off" if args.no_slo_control else "on, as configured by default"}, LS SLO TTFT {args.ttft_ms:g} ms / TPOT \
{args.tpot_ms:g} ms{loose}. One model load shared by all runs, in one process.

Columns: TTFT = arrival -> first token; TPOT = (last token - first token) / (tokens - 1), per request \
(DESIGN.md); `TPOT p50 x` / `TPOT p99 x` = the run's LS TPOT percentile over the LS-only run's; `BE tok/s LS \
window` = BE output tokens emitted between the first LS arrival and the last LS token, per second; `BE left` = \
BE requests still running when the last LS request finished (the run ends there; they are aborted); `BE overlap` \
= share of the LS window during which BE requests were running; `LS same` = LS requests whose greedy output \
equals the LS-only run's (the BE rows merged into LS batches must not change LS results); `LS rej` = LS \
requests refused by admission control (counted as misses, left out of the percentiles); `other CPU` = cores' \
worth of CPU time used by processes other than this benchmark (and its CPU workers) during the run, from /proc: \
well above 0 means the run shared the host and its figures are skewed.

```
{table}
```

What the ratio means here: {meaning}
{chr(10).join(["", "Failures:", *failures]) if failures else ""}{shared}
![interference](interference.png)
"""
    path.write_text(text)


def _plot(results: list[RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        for ax, values in ((axes[0], r.tpot_s), (axes[1], r.ttft_s)):
            xs = np.sort(np.array(values) * 1e3)
            ax.step(xs, np.arange(1, len(xs) + 1) / max(len(xs), 1), where="post", label=r.name)
    axes[0].set_xlabel("LS TPOT (ms)")
    axes[1].set_xlabel("LS TTFT (ms)")
    axes[1].set_xscale("log")
    for ax in axes[:2]:
        ax.set_ylabel("fraction of LS requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    base = results[0]
    loaded = results[1:]
    x = np.arange(len(loaded))
    p50 = [r.p(r.tpot_s, 50) / base.p(base.tpot_s, 50) for r in loaded]
    p99 = [r.p(r.tpot_s, 99) / base.p(base.tpot_s, 99) for r in loaded]
    axes[2].bar(x - 0.2, p50, width=0.4, label="LS TPOT p50 / LS only")
    axes[2].bar(x + 0.2, p99, width=0.4, label="LS TPOT p99 / LS only")
    axes[2].axhline(1.0, color="black", linewidth=0.8)
    axes[2].set_xticks(list(x), [f"{r.name.split(', ')[-1]}\nBE {r.be_tokens_window / r.window_s:.0f} tok/s"
                                 for r in loaded])  # fmt: skip
    axes[2].set_ylabel("ratio to LS only")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
