"""Overload: a real `piggyback serve` on loopback driven at several times its capacity.

Bounded and loopback only. Starts the runtime on 127.0.0.1 with tight LS SLOs (so admission control
binds), measures its LS capacity with a short closed-loop ramp (the rate of LS requests that finish
within their SLO when clients retry 429s at once), then drives Poisson LS arrivals at `--multiple` times
that rate, plus a closed-loop BE batch, for `--duration-s`. Every request loop is bounded in count and
time. Reported and checked:
- none lost: sent = successes + each error class (429, other HTTP status, transport error); nothing left
  pending after the drain bound;
- admitted LS requests meet their SLO (as the client measured them) at the service's attainment target;
- the runtime's counters (/metrics: requests by outcome, admission rejections) equal what the client saw;
- memory: RSS of the runtime's process tree, sampled through the run (start, peak, end), stays flat.

    python benchmarks/overload.py [--duration-s 60] [--multiple 5] [--model synthetic://small-llama]

Prints a table, writes benchmarks/results/overload.md and overload.png; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from piggyback_runtime import metrics as m
from piggyback_runtime.client import (
    STREAM_OK,
    STREAM_REJECTED,
    free_port,
    start_server,
    stream_completion,
    wait_ready,
)
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.hardware import cpu_model_name

RESULTS = Path(__file__).parent / "results"
LS, BE = "chat", "batch"
OK, REJECTED = STREAM_OK, STREAM_REJECTED
MiB = 2**20


@dataclass
class Record:
    service: str
    phase: str
    sent_s: float
    outcome: str = "pending"  # ok | 429 | HTTP <code> | <transport error class> | pending (never ended)
    first_token_s: float | None = None
    last_token_s: float | None = None
    output_tokens: int = 0

    def timing(self) -> m.RequestTiming:
        return m.RequestTiming(self.sent_s, None, self.first_token_s, self.last_token_s, self.output_tokens)


@dataclass
class Settings:
    model: str = "synthetic://small-llama"
    duration_s: float = 60.0
    multiple: float = 5.0
    ramp_s: float = 10.0
    ramp_concurrency: int = 12
    be_concurrency: int = 2
    ttft_ms: float = 2000.0
    tpot_ms: float = 250.0
    # The client shares this host's cores with the runtime (and on a 2-core machine steals a good part of
    # them); a wider margin than the default 0.1 keeps the profiled latency model's predictions honest.
    safety_margin: float = 0.3
    attainment_target: float = 0.9
    ls_max_tokens: int = 16
    be_max_tokens: int = 32
    request_timeout_s: float = 120.0  # per request (client side): a hung request ends as ReadTimeout
    drain_s: float = 150.0  # after the load stops, in-flight requests get this long; then what is left is lost
    seed: int = 0


@dataclass
class Report:
    settings: Settings
    capacity_rps: float = 0.0
    headroom_rps: float | None = None
    target_rps: float = 0.0
    records: list[Record] = field(default_factory=list)
    client_counts: dict[str, Counter[str]] = field(default_factory=dict)
    runtime_counts: dict[str, dict[str, float]] = field(default_factory=dict)
    runtime_rejections: dict[str, float] = field(default_factory=dict)
    runtime_attainment: float | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds into the overload phase, bytes)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)


def overload_config(settings: Settings, port: int) -> RuntimeConfig:
    return RuntimeConfig.from_dict({
        "model": {"uri": settings.model, "max_model_len": 1024},
        "device": "cpu",
        "services": [
            {"name": LS, "class": "LS", "slo": {"ttft_ms": settings.ttft_ms, "tpot_ms": settings.tpot_ms,
                                                 "attainment_target": settings.attainment_target}},
            {"name": BE, "class": "BE"},
        ],
        "engine": {"max_num_batched_tokens": 256, "num_kv_blocks": 1024, "block_size": 16, "max_num_seqs": 64,
                   "policy": "piggyback"},
        "piggyback": {"num_host_kv_blocks": 512, "max_be_requests": 32, "cpu_threads_per_worker": 1},
        # A short BE queue: under overload BE requests beyond it are refused (429) rather than queued forever.
        "slo_control": {"max_be_queue": 16, "safety_margin": settings.safety_margin},
        "server": {"host": "127.0.0.1", "port": port},
        "metrics": {"attainment_window_s": 3600},
    })  # fmt: skip


# --- one request -------------------------------------------------------------------------------------------
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "serve", "model", "request", "token",
          "batch", "latency", "answer", "question")  # fmt: skip


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


async def _send(client: httpx.AsyncClient, record: Record, prompt: str, max_tokens: int) -> None:
    record.outcome = await stream_completion(client, record.service, prompt, max_tokens, record)


def _attained(record: Record, settings: Settings) -> bool:
    ttft_ok, tpot_ok = m.slo_attained(record.timing(), settings.ttft_ms / 1000, settings.tpot_ms / 1000)
    return record.outcome == OK and ttft_ok and tpot_ok


# --- the runtime's side ------------------------------------------------------------------------------------
def _scrape(base_url: str) -> tuple[dict[str, dict[str, float]], dict[str, float], float | None, float | None]:
    """(requests by service and outcome, admission rejections by service, LS attainment, LS headroom)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    counts: dict[str, dict[str, float]] = {LS: {}, BE: {}}
    rejections: dict[str, float] = {LS: 0.0, BE: 0.0}
    attainment = headroom = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == m.REQUESTS and sample.name.endswith("_total"):
                counts[sample.labels["model_name"]][sample.labels["outcome"]] = sample.value
            elif family.name == m.ADMISSION_REJECTIONS and sample.name.endswith("_total"):
                rejections[sample.labels["model_name"]] += sample.value
            elif family.name == m.SLO_ATTAINMENT and sample.labels.get("model_name") == LS:
                attainment = sample.value
            elif family.name == m.LS_HEADROOM_RPS:
                headroom = sample.value
    return counts, rejections, attainment, headroom


def _tree_rss(pid: int) -> int:
    """Resident memory of a process and its descendants (the CPU attention workers), from /proc."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


# --- the phases ----------------------------------------------------------------------------------------------
async def _measure_capacity(base_url: str, settings: Settings, report: Report, rng: random.Random) -> float:
    """Closed loop: `ramp_concurrency` clients, each sending LS requests back to back for `ramp_s` (a 429 is
    retried after a short pause). Capacity = LS requests per second that finished within their SLO."""
    deadline = time.monotonic() + settings.ramp_s
    limit = httpx.Limits(max_connections=settings.ramp_concurrency + 8)
    records: list[Record] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=settings.request_timeout_s, limits=limit) as client:

        async def loop() -> None:
            for _ in range(10_000):  # bounded in count as well as time
                if time.monotonic() >= deadline:
                    return
                record = Record(LS, "ramp", time.monotonic())
                records.append(record)
                await _send(client, record, _prompt(rng, rng.randint(16, 48)), settings.ls_max_tokens)
                if record.outcome == REJECTED:
                    await asyncio.sleep(0.02)

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(settings.ramp_concurrency)))
        elapsed = time.monotonic() - started
    report.records += records
    return sum(1 for r in records if _attained(r, settings)) / elapsed


async def _overload(base_url: str, pid: int, settings: Settings, report: Report, rng: random.Random) -> None:
    rate = report.target_rps
    max_ls = math.ceil(rate * settings.duration_s * 1.5) + 10  # Poisson arrivals: bounded in count too
    started = time.monotonic()
    deadline = started + settings.duration_s
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=30.0)
    tasks: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:

        def launch(service: str, prompt: str, max_tokens: int) -> asyncio.Task[None]:
            record = Record(service, "overload", time.monotonic())
            report.records.append(record)
            task = asyncio.create_task(_send(client, record, prompt, max_tokens))
            tasks.append(task)
            return task

        async def arrivals() -> None:
            # Arrival times on an absolute clock: a busy event loop sends late, then catches up, so the
            # offered rate is the target rate rather than the target minus the client's own lag.
            due = started
            for _ in range(max_ls):
                due += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if due >= deadline:
                    return
                launch(LS, _prompt(rng, rng.randint(16, 48)), settings.ls_max_tokens)

        async def be_loop() -> None:
            for _ in range(100_000):
                if time.monotonic() >= deadline:
                    return
                task = launch(BE, _prompt(rng, rng.randint(64, 256)), settings.be_max_tokens)
                await task
                if report.records[-1].outcome == REJECTED:
                    await asyncio.sleep(0.1)

        async def sample_rss() -> None:
            while time.monotonic() < deadline + settings.drain_s:
                report.rss.append((time.monotonic() - started, _tree_rss(pid)))
                await asyncio.sleep(0.5)

        async def progress() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(10.0)
                mine = [r for r in report.records if r.phase == "overload"]
                print(f"  [{time.monotonic() - started:4.0f}s] sent {len(mine)}, ok "
                      f"{sum(r.outcome == OK for r in mine)}, 429 {sum(r.outcome == REJECTED for r in mine)}",
                      flush=True)  # fmt: skip

        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(arrivals(), progress(), *(be_loop() for _ in range(settings.be_concurrency)))
        if tasks:  # the drain bound: whatever has not ended by then stays "pending" and counts as lost
            await asyncio.wait(tasks, timeout=settings.drain_s)
        for task in tasks:
            task.cancel()
        sampler.cancel()
        report.rss.append((time.monotonic() - started, _tree_rss(pid)))


def _delta(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {s: {o: after[s].get(o, 0) - before[s].get(o, 0) for o in m.OUTCOMES} for s in after}


def run_overload(settings: Settings) -> Report:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = Report(settings)
    rng = random.Random(settings.seed)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="piggyback-overload-") as tmp:
        log_path = Path(tmp) / "runtime.log"
        process = start_server(overload_config(settings, port), Path(tmp), log_path)
        try:
            wait_ready(base_url, process)
            report.capacity_rps = asyncio.run(_measure_capacity(base_url, settings, report, rng))
            report.headroom_rps = _scrape(base_url)[3]
            if report.capacity_rps <= 0:
                raise RuntimeError("no LS request met its SLO in the capacity ramp: the SLO is too tight here")
            report.target_rps = settings.multiple * report.capacity_rps
            before, rejections_before, _, _ = _scrape(base_url)
            print(f"capacity {report.capacity_rps:.2f} LS req/s; driving {report.target_rps:.1f} req/s "
                  f"({settings.multiple:g}x) for {settings.duration_s:.0f}s", flush=True)  # fmt: skip
            asyncio.run(_overload(base_url, process.pid, settings, report, rng))
            after, rejections_after, report.runtime_attainment, _ = _scrape(base_url)
            report.runtime_counts = _delta(after, before)
            report.runtime_rejections = {s: rejections_after[s] - rejections_before[s] for s in (LS, BE)}
            if process.poll() is not None:
                raise RuntimeError(f"the runtime exited with code {process.returncode} under load")
        except Exception:
            print(log_path.read_text()[-4000:])
            raise
        finally:
            process.terminate()
            process.wait(timeout=60)
    _check(report)
    return report


def _check(report: Report) -> None:
    settings = report.settings
    overload = [r for r in report.records if r.phase == "overload"]
    for service in (LS, BE):
        report.client_counts[service] = Counter(r.outcome for r in overload if r.service == service)
    checks = report.checks
    pending = sum(c["pending"] for c in report.client_counts.values())
    sent = len(overload)
    ended = sum(sum(n for o, n in c.items() if o != "pending") for c in report.client_counts.values())
    checks.append(("none lost: sent = successes + each error class", pending == 0 and ended == sent,
                   f"sent {sent}, ended {ended}, pending after the drain bound {pending}"))  # fmt: skip
    ls_sent = report.client_counts[LS].total()
    checks.append((f"load at least {settings.multiple:g}x capacity",
                   ls_sent >= 0.8 * settings.multiple * report.capacity_rps * settings.duration_s,
                   f"{ls_sent} LS requests in {settings.duration_s:.0f}s = {ls_sent / settings.duration_s:.1f}/s "
                   f"vs capacity {report.capacity_rps:.2f}/s"))  # fmt: skip
    rejected = report.client_counts[LS][REJECTED]
    checks.append(("admission binds (LS 429s)", rejected > 0, f"{rejected} of {ls_sent} LS requests refused"))
    admitted = [r for r in overload if r.service == LS and r.outcome == OK]
    attained = sum(_attained(r, settings) for r in admitted) / max(1, len(admitted))
    checks.append(("admitted LS requests meet their SLO at the target rate",
                   bool(admitted) and attained >= settings.attainment_target,
                   f"{attained:.1%} of {len(admitted)} admitted (client-measured) vs target "
                   f"{settings.attainment_target:.0%}"))  # fmt: skip
    for service in (LS, BE):
        client = report.client_counts[service]
        runtime = report.runtime_counts[service]
        errors = sum(n for o, n in client.items() if o not in (OK, REJECTED))
        same = (runtime[m.OUTCOME_FINISHED] == client[OK] and runtime[m.OUTCOME_REJECTED] == client[REJECTED]
                and runtime[m.OUTCOME_FAILED] + runtime[m.OUTCOME_ABORTED] == errors
                and report.runtime_rejections[service] == client[REJECTED])  # fmt: skip
        checks.append((f"runtime counters equal what the client saw ({service})", same,
                       f"client ok/429/errors {client[OK]}/{client[REJECTED]}/{errors}; runtime finished/rejected/"
                       f"failed+aborted {runtime[m.OUTCOME_FINISHED]:.0f}/{runtime[m.OUTCOME_REJECTED]:.0f}/"
                       f"{runtime[m.OUTCOME_FAILED] + runtime[m.OUTCOME_ABORTED]:.0f}, admission rejections "
                       f"{report.runtime_rejections[service]:.0f}"))  # fmt: skip
    start, peak, end = _rss_summary(report)
    # Stable: no growth with the number of requests served; allocator noise of a few tens of MiB is fine.
    checks.append(("memory stable (RSS end vs start)", end <= start * 1.10 + 64 * MiB,
                   f"start {start / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, end {end / MiB:.0f} MiB"))  # fmt: skip


def _rss_summary(report: Report) -> tuple[int, int, int]:
    values = [rss for _, rss in report.rss] or [0]
    return values[0], max(values), values[-1]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def render(report: Report) -> str:
    settings = report.settings
    overload = [r for r in report.records if r.phase == "overload"]
    lines = [
        f"model {settings.model}, LS SLO TTFT {settings.ttft_ms:.0f} ms / TPOT {settings.tpot_ms:.0f} ms "
        f"(target {settings.attainment_target:.0%}), {settings.duration_s:.0f}s of load",
        f"capacity (closed-loop ramp, LS req/s within SLO): {report.capacity_rps:.2f}; runtime headroom metric "
        f"then: {'-' if report.headroom_rps is None else f'{report.headroom_rps:.2f}'}; offered LS rate "
        f"{report.target_rps:.2f}/s ({settings.multiple:g}x)",
        "",
        "| service | sent | ok | 429 | other errors | pending (lost) | TTFT p50 / p99 ms (ok) | TPOT p50 / p99 ms (ok) "
        "| SLO attained (ok) | runtime: finished / rejected / failed / aborted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for service in (LS, BE):
        records = [r for r in overload if r.service == service]
        counts = report.client_counts[service]
        ok = [r for r in records if r.outcome == OK]
        ttfts = [t * 1000 for r in ok if (t := r.timing().ttft_s) is not None]
        tpots = [t * 1000 for r in ok if (t := r.timing().tpot_s) is not None]
        other = {o: n for o, n in counts.items() if o not in (OK, REJECTED, "pending")}
        runtime = report.runtime_counts[service]

        def fmt(values: list[float]) -> str:
            p50, p99 = _percentile(values, 50), _percentile(values, 99)
            return "-" if p50 is None or p99 is None else f"{p50:.0f} / {p99:.0f}"

        attained = (f"{sum(_attained(r, settings) for r in ok) / len(ok):.1%}" if service == LS and ok else "-")
        lines.append(
            f"| {service} | {len(records)} | {counts[OK]} | {counts[REJECTED]} | "
            f"{sum(other.values())}{f' {dict(other)}' if other else ''} | {counts['pending']} | {fmt(ttfts)} | "
            f"{fmt(tpots)} | {attained} | {runtime[m.OUTCOME_FINISHED]:.0f} / {runtime[m.OUTCOME_REJECTED]:.0f} / "
            f"{runtime[m.OUTCOME_FAILED]:.0f} / {runtime[m.OUTCOME_ABORTED]:.0f} |"
        )
    start, peak, end = _rss_summary(report)
    lines += [
        "",
        f"runtime process tree RSS: start {start / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, end {end / MiB:.0f} MiB "
        f"({len(report.rss)} samples); runtime LS attainment (its window): "
        f"{'-' if report.runtime_attainment is None else f'{report.runtime_attainment:.1%}'}",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *(f"| {name} | {'PASS' if passed else 'FAIL'} | {detail} |" for name, passed, detail in report.checks),
    ]
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overload = [r for r in report.records if r.phase == "overload"]
    start = min((r.sent_s for r in overload), default=0.0)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    bins = range(int(report.settings.duration_s) + 1)
    for outcome, colour in ((OK, "tab:green"), (REJECTED, "tab:orange")):
        times = [r.sent_s - start for r in overload if r.service == LS and r.outcome == outcome]
        ax1.hist(times, bins=list(bins), alpha=0.7, color=colour, label=f"LS {outcome}")
    ax1.axhline(report.capacity_rps, color="k", linestyle="--", label="measured capacity (req/s)")
    ax1.set_ylabel("LS requests per second (by send time)")
    ax1.legend()
    ax1.set_title(f"{report.settings.model}: {report.settings.multiple:g}x capacity")
    ax2.plot([t for t, _ in report.rss], [rss / MiB for _, rss in report.rss])
    ax2.set_ylabel("runtime RSS (MiB, process tree)")
    ax2.set_xlabel("seconds into the overload phase")
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=Settings.model)
    parser.add_argument("--duration-s", type=float, default=Settings.duration_s)
    parser.add_argument("--multiple", type=float, default=Settings.multiple)
    parser.add_argument("--ramp-s", type=float, default=Settings.ramp_s)
    args = parser.parse_args()
    report = run_overload(Settings(model=args.model, duration_s=args.duration_s, multiple=args.multiple,
                                   ramp_s=args.ramp_s))  # fmt: skip
    table = render(report)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    machine = f"{cpu_model_name()}, {os.cpu_count()} cores, client and runtime on the same host"
    (RESULTS / "overload.md").write_text(f"# Overload\n\n`python benchmarks/overload.py` on {machine}\n\n{table}\n")
    plot(report, RESULTS / "overload.png")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
