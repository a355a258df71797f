"""Overload: a real `piggyback serve` on loopback driven at several times its capacity.

Bounded and loopback only. Starts the runtime on 127.0.0.1 with tight LS SLOs (so admission control
binds) and a fresh latency profile (its own cache folder), measures its LS capacity with a short
closed-loop ramp (the rate of LS requests that finish within their SLO when clients retry 429s at once),
then drives Poisson LS arrivals at each of `--lower-multiples` times that rate for `--phase-s` each, then at
`--multiple` times it for `--duration-s`, with a closed-loop BE batch throughout. Every request loop is
bounded in count and time. Reported and checked:
- goodput holds under overload: LS goodput (admitted LS requests that met their SLO, per second, by send
  time) at `--multiple` × capacity is at least 90% of the best goodput at any lower offered load;
- the latency model learns: the runtime's `piggyback_latency_model_error_ratio` (its corrected predictions
  against measured iterations) is under 20% after the first 10 s of traffic;
- the headroom gauge agrees with admission, both ways (`headroom_agreement`): in the highest lower load at which
  admission did not bind (under 5% of LS refused), the gauge (`piggyback_ls_headroom_requests_per_second`,
  sampled every second, mean over the phase) plus the LS rate then admitted predicts the LS rate that fits;
  it must be within 35% of the rate admission let through under overload; and under overload, where
  admission refuses, the gauge's mean must say so (at most 35% of the rate admitted then);
- none lost: sent = successes + each error class (429, other HTTP status, transport error); nothing left
  pending after the drain bound;
- admitted LS requests meet their SLO (as the client measured them) at the service's attainment target;
- the runtime's counters (/metrics: requests by outcome, admission rejections) equal what the client saw;
- memory: RSS of the runtime's process tree, sampled through the run (start, peak, end), stays flat.

    python benchmarks/overload.py [--duration-s 30] [--multiple 5] [--lower-multiples 0.5,1,2] [--phase-s 20]

Prints a table, writes benchmarks/results/overload.md and overload.png; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from piggyback_runtime import metrics as m
from piggyback_runtime.client import STREAM_OK, STREAM_REJECTED, free_port, start_server, wait_ready
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.hardware import cpu_model_name
from piggyback_runtime.scheduler.planner import ITERATION_TRACE_ENV

sys.path.insert(0, str(Path(__file__).parent))
from iteration_trace import load as load_trace  # a sibling script, not a package
from iteration_trace import summarise as summarise_trace

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
    duration_s: float = 30.0
    multiple: float = 5.0
    lower_multiples: tuple[float, ...] = (0.5, 1.0, 2.0)  # offered loads before the overload, × capacity
    phase_s: float = 20.0  # each lower load's duration
    error_after_s: float = 10.0  # traffic after which the latency model's error must be under `error_bound`
    error_bound: float = 0.2
    goodput_share: float = 0.9  # goodput under overload vs the best at a lower load
    headroom_tolerance: float = 0.35
    not_binding_share: float = 0.05  # a phase where fewer LS requests than this were refused: admission did not bind
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
    keep_trace: Path | None = None  # where to copy the runtime's iteration trace (benchmarks/iteration_trace.py)


@dataclass
class Report:
    settings: Settings
    capacity_rps: float = 0.0
    headroom_rps: float | None = None
    target_rps: float = 0.0
    model_error_early: float | None = None  # the error gauge after `error_after_s` of traffic
    # Per phase ("0.5x", ..., the overload's): offered rate, duration, and gauges read at its end.
    phases: dict[str, dict[str, float | None]] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    client_counts: dict[str, Counter[str]] = field(default_factory=dict)
    runtime_counts: dict[str, dict[str, float]] = field(default_factory=dict)
    runtime_rejections: dict[str, float] = field(default_factory=dict)
    runtime_attainment: float | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds into the overload phase, bytes)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    headroom_samples: dict[str, list[float]] = field(default_factory=dict)  # per phase, the gauge every second
    trace_summary: str = ""  # benchmarks/iteration_trace.py's table of the runtime's iterations
    rejection_reasons: Counter[str] = field(default_factory=Counter)  # LS admission rejections by reason, whole run
    # Per phase, where the CPU went (`_cpu_snapshot` differences) and the runtime's iterations (from its trace).
    phase_cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    phase_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # monotonic start, end

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)


def overload_config(settings: Settings, port: int, profile_dir: Path | None = None) -> RuntimeConfig:
    """The runtime's config; `profile_dir`: where it caches its latency profile (a fresh folder: a profile
    measured now, on this machine as loaded now, rather than one a home cache kept from another time)."""
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
        "slo_control": {"max_be_queue": 16, "safety_margin": settings.safety_margin,
                        **({"profile_cache_dir": str(profile_dir)} if profile_dir is not None else {})},
        "server": {"host": "127.0.0.1", "port": port},
        "metrics": {"attainment_window_s": 3600},
    })  # fmt: skip


# --- one request -------------------------------------------------------------------------------------------
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "serve", "model", "request", "token",
          "batch", "latency", "answer", "question")  # fmt: skip


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


class LeanClient:
    """The benchmark's load generator: a minimal asyncio HTTP/1.1 client with keep-alive connections, for
    `POST /v1/completions` with `stream: true` only. Not the product (that is `piggyback_runtime.client`, on
    httpx): on a 2-core host the client shares the runtime's cores, and httpx spent ~2.7 ms of CPU per request
    at 120 requests/s (a third of a core) on the machinery a load generator does not need. Outcomes are those
    of `stream_completion`: STREAM_OK, STREAM_REJECTED, "HTTP <status>", "stream error <code>", "stream cut",
    or the transport error's type."""

    # The server closes a keep-alive connection idle this long (uvicorn's default is 5 s): older ones are dropped.
    IDLE_S = 4.0

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()

    def _reuse(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently idle connection that the server has not closed for idling."""
        now = time.monotonic()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if now - since < self.IDLE_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    async def stream_completion(self, service: str, prompt: str, max_tokens: int, record: Record) -> str:
        body = json.dumps({"model": service, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                           "stream": True, "ignore_eos": True,
                           "stream_options": {"include_usage": True}}).encode()  # fmt: skip
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        connection = self._reuse()
        try:
            async with asyncio.timeout(self.timeout_s):
                if connection is not None:
                    connection[1].write(head + body)
                    status = await connection[0].readline()
                    if not status:  # closed by the server before it read the request: send it afresh
                        connection[1].close()
                        connection = None
                if connection is None:
                    connection = await asyncio.open_connection(self.host, self.port)
                    connection[1].write(head + body)
                    status = await connection[0].readline()
                outcome, reusable = await self._response(status, connection[0], record)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError) as exc:
            if connection is not None:
                connection[1].close()
            return type(exc).__name__
        if reusable:
            self._idle.append((*connection, time.monotonic()))
        else:
            connection[1].close()
        return outcome

    async def _response(self, status_line: bytes, reader: asyncio.StreamReader, record: Record) -> tuple[str, bool]:
        """(outcome, whether the connection may be reused) of one response, from its status line on."""
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, reusable = 0, False, True
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value
            elif name == "connection":
                reusable = value != "close"
        if not chunked:
            await reader.readexactly(length)
            if status != 200:
                return (STREAM_REJECTED if status == 429 else f"HTTP {status}"), reusable
            return "stream cut", reusable
        pending, done, error = b"", False, None
        while size := int((await reader.readline()).split(b";")[0], 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.startswith(b"data: ") or error is not None:
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    error = f"stream error {chunk['error'].get('code')}"
                    continue
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.monotonic()
                    record.first_token_s = record.first_token_s or now
                    record.last_token_s = now
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
        await reader.readline()  # the CRLF after the last (empty) chunk
        if status != 200:
            return (STREAM_REJECTED if status == 429 else f"HTTP {status}"), reusable
        return (error or (STREAM_OK if done else "stream cut")), reusable


async def _send(client: LeanClient, record: Record, prompt: str, max_tokens: int) -> None:
    record.outcome = await client.stream_completion(record.service, prompt, max_tokens, record)


def _attained(record: Record, settings: Settings) -> bool:
    ttft_ok, tpot_ok = m.slo_attained(record.timing(), settings.ttft_ms / 1000, settings.tpot_ms / 1000)
    return record.outcome == OK and ttft_ok and tpot_ok


# --- the runtime's side ------------------------------------------------------------------------------------
def _scrape(base_url: str) -> tuple[dict[str, dict[str, float]], dict[str, float], float | None, float | None]:
    """(requests by service and outcome, admission rejections by service, LS attainment, LS headroom)."""
    counts, rejections, attainment, headroom, _ = _scrape_all(base_url)
    return counts, rejections, attainment, headroom


def _scrape_all(
    base_url: str,
) -> tuple[dict[str, dict[str, float]], dict[str, float], float | None, float | None, float | None]:
    """_scrape's figures and the latency model's error ratio."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    counts: dict[str, dict[str, float]] = {LS: {}, BE: {}}
    rejections: dict[str, float] = {LS: 0.0, BE: 0.0}
    attainment = headroom = error = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == m.REQUESTS and sample.name.endswith("_total"):
                counts[sample.labels["model_name"]][sample.labels["outcome"]] = sample.value
            elif family.name == m.ADMISSION_REJECTIONS and sample.name.endswith("_total"):
                rejections[sample.labels["model_name"]] += sample.value
                if sample.labels["model_name"] == LS:
                    rejections[f"{LS}:{sample.labels['reason']}"] = sample.value
            elif family.name == m.SLO_ATTAINMENT and sample.labels.get("model_name") == LS:
                attainment = sample.value
            elif family.name == m.LS_HEADROOM_RPS:
                headroom = sample.value
            elif family.name == m.LATENCY_MODEL_ERROR:
                error = sample.value
    return counts, rejections, attainment, headroom, error


def _ticks(stat_path: Path) -> int:
    """utime + stime (clock ticks) from a /proc .../stat file; 0 if it is gone."""
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _cpu_snapshot(pid: int) -> dict[str, float]:
    """CPU seconds so far: this client process (all its threads), the runtime's main thread (the HTTP event loop:
    parsing, tokenising, refusals, streaming), each other runtime thread by id (the engine loop is the busiest
    of them), and the runtime's child processes (CPU attention workers)."""
    hz = os.sysconf("SC_CLK_TCK")
    snapshot = {"client": time.process_time()}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        key = "server_main" if task.name == str(pid) else f"thread:{task.name}"
        snapshot[key] = _ticks(task / "stat") / hz
        # schedstat: ns on a CPU, ns runnable but waiting for one (a thread waiting for the GIL sleeps instead)
        with contextlib.suppress(OSError, IndexError, ValueError):
            snapshot[f"wait:{key}"] = int((task / "schedstat").read_text().split()[1]) / 1e9
    children = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += sum(_tree_ticks(int(c)) for c in (task / "children").read_text().split())
        except OSError:
            continue
    snapshot["server_children"] = children / hz
    return snapshot


def _tree_ticks(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        total += _ticks(task / "stat")
        try:
            total += sum(_tree_ticks(int(c)) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return total


def phase_cpu(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """CPU cores used during a phase (CPU seconds ÷ wall seconds): client, runtime HTTP thread, engine thread
    (the busiest other runtime thread), the runtime's other threads, its child processes."""
    threads = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("thread:")}
    engine = max(threads.values(), default=0.0)
    engine_key = max(threads, key=lambda k: threads[k], default="")
    engine_wait = after.get(f"wait:{engine_key}", 0.0) - before.get(f"wait:{engine_key}", 0.0)
    return {
        "engine_cpu_wait": engine_wait / seconds,
        "client": (after["client"] - before["client"]) / seconds,
        "server_main": (after["server_main"] - before["server_main"]) / seconds,
        "server_engine": engine / seconds,
        "server_other": (sum(threads.values()) - engine) / seconds,
        "server_children": (after["server_children"] - before["server_children"]) / seconds,
    }


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
    records: list[Record] = []
    client = _lean_client(base_url, settings)
    try:

        async def loop() -> None:
            for _ in range(10_000):  # bounded in count as well as time
                if time.monotonic() >= deadline:
                    return
                record = Record(LS, "ramp", time.monotonic())
                records.append(record)
                await _send(client, record, _prompt(rng, rng.randint(16, 48)), settings.ls_max_tokens)
                if record.outcome == REJECTED:
                    await asyncio.sleep(0.02)

        async def read_error() -> None:
            await asyncio.sleep(min(settings.error_after_s, settings.ramp_s))
            report.model_error_early = (await asyncio.to_thread(_scrape_all, base_url))[4]

        started = time.monotonic()
        await asyncio.gather(read_error(), *(loop() for _ in range(settings.ramp_concurrency)))
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    report.records += records
    return sum(1 for r in records if _attained(r, settings)) / elapsed


async def _overload(base_url: str, pid: int, settings: Settings, report: Report, rng: random.Random) -> None:
    """The lower loads, then the overload: Poisson LS arrivals at each phase's rate, a closed-loop BE batch
    throughout; the headroom and error gauges read at each phase's end."""
    phases = [(f"{multiple:g}x", multiple * report.capacity_rps, settings.phase_s)
              for multiple in settings.lower_multiples]  # fmt: skip
    phases.append(("overload", report.target_rps, settings.duration_s))
    total_s = sum(duration for _, _, duration in phases)
    started = time.monotonic()
    deadline = started + total_s
    tasks: list[asyncio.Task[None]] = []
    phase_name = [phases[0][0]]
    client = _lean_client(base_url, settings)
    try:

        def launch(service: str, prompt: str, max_tokens: int) -> asyncio.Task[None]:
            record = Record(service, phase_name[0], time.monotonic())
            report.records.append(record)
            task = asyncio.create_task(_send(client, record, prompt, max_tokens))
            tasks.append(task)
            return task

        async def arrivals() -> None:
            # Arrival times on an absolute clock: a busy event loop sends late, then catches up, so the
            # offered rate is the target rate rather than the target minus the client's own lag.
            phase_start = started
            for name, rate, duration in phases:
                phase_name[0] = name
                cpu_before = await asyncio.to_thread(_cpu_snapshot, pid)
                phase_end = phase_start + duration
                due = phase_start
                for _ in range(math.ceil(rate * duration * 1.5) + 10):  # Poisson arrivals: bounded in count too
                    due += rng.expovariate(rate)
                    if due >= phase_end:
                        break
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    launch(LS, _prompt(rng, rng.randint(16, 48)), settings.ls_max_tokens)
                await asyncio.sleep(max(0.0, phase_end - time.monotonic()))
                cpu_after = await asyncio.to_thread(_cpu_snapshot, pid)
                report.phase_cpu[name] = phase_cpu(cpu_before, cpu_after, time.monotonic() - phase_start)
                report.phase_bounds[name] = (phase_start, phase_end)
                _, _, _, headroom, error = await asyncio.to_thread(_scrape_all, base_url)
                report.phases[name] = {"offered_rps": rate, "duration_s": duration, "headroom_rps": headroom,
                                       "model_error": error}  # fmt: skip
                phase_start = phase_end

        async def be_loop() -> None:
            for _ in range(100_000):
                if time.monotonic() >= deadline:
                    return
                task = launch(BE, _prompt(rng, rng.randint(64, 256)), settings.be_max_tokens)
                await task
                if report.records[-1].outcome == REJECTED:
                    await asyncio.sleep(0.1)

        async def sample_headroom() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                name = phase_name[0]
                headroom = (await asyncio.to_thread(_scrape_all, base_url))[3]
                if headroom is not None:
                    report.headroom_samples.setdefault(name, []).append(headroom)

        async def sample_rss() -> None:
            while time.monotonic() < deadline + settings.drain_s:
                report.rss.append((time.monotonic() - started, _tree_rss(pid)))
                await asyncio.sleep(0.5)

        async def progress() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(10.0)
                mine = [r for r in report.records if r.phase == phase_name[0]]
                print(f"  [{time.monotonic() - started:4.0f}s] {phase_name[0]}: sent {len(mine)}, ok "
                      f"{sum(r.outcome == OK for r in mine)}, 429 {sum(r.outcome == REJECTED for r in mine)}",
                      flush=True)  # fmt: skip

        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(arrivals(), progress(), sample_headroom(),
                             *(be_loop() for _ in range(settings.be_concurrency)))  # fmt: skip
        if tasks:  # the drain bound: whatever has not ended by then stays "pending" and counts as lost
            await asyncio.wait(tasks, timeout=settings.drain_s)
        for task in tasks:
            task.cancel()
        sampler.cancel()
        report.rss.append((time.monotonic() - started, _tree_rss(pid)))
    finally:
        await client.close()


def _lean_client(base_url: str, settings: Settings) -> LeanClient:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    return LeanClient(host, int(port), settings.request_timeout_s)


def goodput_rps(report: Report, phase: str) -> float:
    """Admitted LS requests sent in `phase` that met their SLO (client-measured), per second of the phase."""
    records = [r for r in report.records if r.phase == phase and r.service == LS]
    return sum(_attained(r, report.settings) for r in records) / report.phases[phase]["duration_s"]  # type: ignore[operator]


def admitted_rps(report: Report, phase: str) -> float:
    records = [r for r in report.records if r.phase == phase and r.service == LS and r.outcome == OK]
    return len(records) / report.phases[phase]["duration_s"]  # type: ignore[operator]


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
        trace_path = Path(tmp) / "iterations.jsonl"  # every iteration's shape, prediction and measurement
        os.environ[ITERATION_TRACE_ENV] = str(trace_path)
        try:
            process = start_server(overload_config(settings, port, Path(tmp) / "profiles"), Path(tmp), log_path)
        finally:
            del os.environ[ITERATION_TRACE_ENV]
        try:
            wait_ready(base_url, process, timeout_s=900.0)  # start-up profiles afresh; slow on a busy host
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
            report.rejection_reasons = Counter({k.split(":", 1)[1]: int(v) for k, v in rejections_after.items()
                                                if k.startswith(f"{LS}:") and v})  # fmt: skip
            if process.poll() is not None:
                raise RuntimeError(f"the runtime exited with code {process.returncode} under load")
        except Exception:
            print(log_path.read_text()[-4000:])
            raise
        finally:
            process.terminate()
            process.wait(timeout=60)
        if trace_path.exists():
            trace = load_trace(trace_path)
            report.trace_summary = summarise_trace(trace, settings.error_after_s)
            _phase_iterations(report, trace)
            if settings.keep_trace is not None:
                shutil.copyfile(trace_path, settings.keep_trace)
    _check(report)
    return report


def _phase_iterations(report: Report, trace: list[dict[str, object]]) -> None:
    """Each phase's iterations from the runtime's trace (its clock is this host's monotonic clock, as ours):
    count per second, measured p50 (all, and those with an LS prefill), and the share of wall time in them."""
    for name, (start, end) in report.phase_bounds.items():
        rows = [r for r in trace if start <= float(r["t"]) < end]  # type: ignore[arg-type]
        measured = [float(r["measured_s"]) for r in rows]  # type: ignore[arg-type]
        prefill = [float(r["measured_s"]) for r in rows if r["ls_prefill_tokens"]]  # type: ignore[arg-type]
        tokens = [int(r["ls_prefill_tokens"]) for r in rows if r["ls_prefill_tokens"]]  # type: ignore[call-overload]
        cpu = report.phase_cpu.setdefault(name, {})
        cpu["iterations_per_s"] = len(rows) / (end - start)
        cpu["iteration_p50_ms"] = statistics.median(measured) * 1000 if measured else math.nan
        cpu["ls_prefill_iteration_p50_ms"] = statistics.median(prefill) * 1000 if prefill else math.nan
        cpu["ls_prefill_tokens_p50"] = statistics.median(tokens) if tokens else math.nan
        cpu["busy_share"] = sum(measured) / (end - start)
        # In an iteration but neither on a CPU nor waiting for one: waiting for the GIL (or the CPU workers).
        cpu["engine_blocked"] = cpu["busy_share"] - cpu.get("server_engine", 0.0) - cpu.get("engine_cpu_wait", 0.0)


def _check(report: Report) -> None:
    settings = report.settings
    traffic = [r for r in report.records if r.phase != "ramp"]  # every phase the runtime's counters cover
    overload = [r for r in traffic if r.phase == "overload"]
    for service in (LS, BE):
        report.client_counts[service] = Counter(r.outcome for r in traffic if r.service == service)
    checks = report.checks
    pending = sum(c["pending"] for c in report.client_counts.values())
    sent = len(traffic)
    ended = sum(sum(n for o, n in c.items() if o != "pending") for c in report.client_counts.values())
    checks.append(("none lost: sent = successes + each error class", pending == 0 and ended == sent,
                   f"sent {sent}, ended {ended}, pending after the drain bound {pending}"))  # fmt: skip
    ls_sent = sum(r.service == LS for r in overload)
    checks.append((f"load at least {settings.multiple:g}x capacity",
                   ls_sent >= 0.8 * settings.multiple * report.capacity_rps * settings.duration_s,
                   f"{ls_sent} LS requests in {settings.duration_s:.0f}s = {ls_sent / settings.duration_s:.1f}/s "
                   f"vs capacity {report.capacity_rps:.2f}/s"))  # fmt: skip
    rejected = sum(r.service == LS and r.outcome == REJECTED for r in overload)
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
    lower = [name for name in report.phases if name != "overload"]
    if lower:
        best = max(lower, key=lambda name: goodput_rps(report, name))
        good, best_good = goodput_rps(report, "overload"), goodput_rps(report, best)
        checks.append((f"goodput under overload >= {settings.goodput_share:.0%} of the best at a lower load",
                       good >= settings.goodput_share * best_good,
                       f"{good:.2f}/s at {settings.multiple:g}x vs {best_good:.2f}/s at {best}"))  # fmt: skip
        agrees, detail = headroom_agreement(report)
        checks.append(("headroom gauge agrees with the LS rate admission lets through", agrees, detail))
    error = report.model_error_early
    after = f"{settings.error_after_s:.0f}s"
    checks.append((f"latency model error under {settings.error_bound:.0%} after {after} of traffic",
                   error is not None and error < settings.error_bound,
                   f"piggyback_latency_model_error_ratio {'-' if error is None else f'{error:.3f}'}"))  # fmt: skip
    start, peak, end = _rss_summary(report)
    # Stable: no growth with the number of requests served; allocator noise of a few tens of MiB is fine.
    checks.append(("memory stable (RSS end vs start)", end <= start * 1.10 + 64 * MiB,
                   f"start {start / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, end {end / MiB:.0f} MiB"))  # fmt: skip


def ls_refused_share(report: Report, phase: str) -> float:
    records = [r for r in report.records if r.phase == phase and r.service == LS]
    return sum(r.outcome == REJECTED for r in records) / max(1, len(records))


def mean_headroom(report: Report, phase: str) -> float | None:
    samples = report.headroom_samples.get(phase) or []
    return statistics.mean(samples) if samples else None


def headroom_agreement(report: Report) -> tuple[bool, str]:
    """The gauge says how much more LS rate admission would let in; admission then shows what it lets in.

    - Predicted: in the highest lower load where admission did not bind (under `not_binding_share` of LS
      refused), mean gauge + LS rate admitted = the LS rate the gauge says fits. Under overload admission
      lets some rate through: the two must agree within `headroom_tolerance` of the latter.
    - Under overload admission refuses: the gauge's mean then must be at most `headroom_tolerance` × the
      rate admitted (a gauge that still shows room while requests are refused disagrees with admission)."""
    settings = report.settings
    let_through = admitted_rps(report, "overload")
    free = [name for name in report.phases if name != "overload"
            and ls_refused_share(report, name) < settings.not_binding_share]  # fmt: skip
    tolerance = settings.headroom_tolerance
    over_gauge = mean_headroom(report, "overload")
    over_text = "-" if over_gauge is None else f"{over_gauge:.2f}"
    quiet = over_gauge is not None and over_gauge <= tolerance * let_through
    if not free:
        return False, (f"no lower load at which admission refused under {settings.not_binding_share:.0%} of LS; "
                       f"gauge under overload {over_text}/s")  # fmt: skip
    phase = free[-1]
    gauge = mean_headroom(report, phase)
    if gauge is None:
        return False, f"no gauge samples at {phase}"
    predicted = gauge + admitted_rps(report, phase)
    close = abs(predicted - let_through) <= tolerance * let_through
    return close and quiet, (
        f"at {phase}: mean gauge {gauge:.2f}/s + admitted {admitted_rps(report, phase):.2f}/s = {predicted:.2f}/s vs "
        f"{let_through:.2f}/s admitted at {settings.multiple:g}x ({'within' if close else 'outside'} "
        f"{tolerance:.0%}); under overload mean gauge {over_text}/s ({'at most' if quiet else 'above'} "
        f"{tolerance:.0%} of what was admitted)")


def _rss_summary(report: Report) -> tuple[int, int, int]:
    values = [rss for _, rss in report.rss] or [0]
    return values[0], max(values), values[-1]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _optional(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: Report) -> str:
    settings = report.settings
    overload = [r for r in report.records if r.phase != "ramp"]  # every phase, as the runtime counted them
    lines = [
        f"model {settings.model}, LS SLO TTFT {settings.ttft_ms:.0f} ms / TPOT {settings.tpot_ms:.0f} ms "
        f"(target {settings.attainment_target:.0%}), {settings.duration_s:.0f}s of overload after "
        f"{len(report.phases) - 1} lower loads of {settings.phase_s:.0f}s, BE closed loop throughout",
        f"capacity (closed-loop ramp, LS req/s within SLO): {report.capacity_rps:.2f}; runtime headroom metric "
        f"then: {_optional(report.headroom_rps)}; latency model error after {settings.error_after_s:.0f}s of "
        f"traffic: {_optional(report.model_error_early, 3)}; offered LS rate under overload "
        f"{report.target_rps:.2f}/s ({settings.multiple:g}x)",
        "",
        "| phase | offered LS/s | LS sent | LS admitted/s | LS goodput/s (admitted, met SLO) | SLO met (admitted) "
        "| headroom gauge at its end (req/s) | headroom gauge mean (req/s) | LS refused | model error at its end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, phase in report.phases.items():
        sent = [r for r in report.records if r.phase == name and r.service == LS]
        ok = [r for r in sent if r.outcome == OK]
        met = f"{sum(_attained(r, settings) for r in ok) / len(ok):.1%}" if ok else "-"
        lines.append(f"| {name} | {_optional(phase['offered_rps'])} | {len(sent)} | {admitted_rps(report, name):.2f} "
                     f"| {goodput_rps(report, name):.2f} | {met} | {_optional(phase['headroom_rps'])} "
                     f"| {_optional(mean_headroom(report, name))} | {ls_refused_share(report, name):.0%} "
                     f"| {_optional(phase['model_error'], 3)} |")  # fmt: skip
    lines += [
        "",
        "All phases together:",
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
        f"{'-' if report.runtime_attainment is None else f'{report.runtime_attainment:.1%}'}; LS admission "
        f"rejections by reason (ramp included): {dict(report.rejection_reasons) or '-'}",
        "",
        "| check | result | detail |",
        "|---|---|---|",
        *(f"| {name} | {'PASS' if passed else 'FAIL'} | {detail} |" for name, passed, detail in report.checks),
    ]
    if report.phase_cpu:
        lines += ["", "Per phase, where the CPU went (cores: CPU seconds ÷ wall seconds) and the runtime's iterations:",
                  "", "| phase | LS admitted/s | LS 429/s | client | runtime HTTP thread | engine thread "
                  "| engine thread waiting for a CPU | other runtime threads | CPU attention workers | iterations/s "
                  "| iteration p50 ms | LS-prefill iteration p50 ms | LS prefill tokens p50 | engine busy share "
                  "| engine in an iteration but blocked (GIL) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, cpu in report.phase_cpu.items():
            duration = float(report.phases[name]["duration_s"] or 1.0)
            refused = sum(r.phase == name and r.service == LS and r.outcome == REJECTED for r in report.records)

            def value(key: str, digits: int = 2, cpu: dict[str, float] = cpu) -> str:
                return _optional(cpu.get(key), digits)

            lines.append(f"| {name} | {admitted_rps(report, name):.2f} | {refused / duration:.1f} | {value('client')} "
                         f"| {value('server_main')} | {value('server_engine')} | {value('engine_cpu_wait')} "
                         f"| {value('server_other')} "
                         f"| {value('server_children')} | {value('iterations_per_s', 1)} "
                         f"| {value('iteration_p50_ms', 1)} | {value('ls_prefill_iteration_p50_ms', 1)} "
                         f"| {value('ls_prefill_tokens_p50', 0)} | {value('busy_share')} "
                         f"| {value('engine_blocked')} |")  # fmt: skip
    if report.trace_summary:
        lines += ["", "The runtime's iterations (benchmarks/iteration_trace.py on its PIGGYBACK_ITERATION_TRACE):", "",
                  report.trace_summary]  # fmt: skip
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
    parser.add_argument("--lower-multiples", default=",".join(f"{m:g}" for m in Settings.lower_multiples),
                        help="offered LS loads before the overload, as multiples of capacity (comma-separated)")
    parser.add_argument("--phase-s", type=float, default=Settings.phase_s)
    parser.add_argument("--ttft-ms", type=float, default=Settings.ttft_ms)
    parser.add_argument("--tpot-ms", type=float, default=Settings.tpot_ms)
    parser.add_argument("--keep-trace", type=Path, default=None,
                        help="copy the runtime's per-iteration trace (JSON lines) here")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "overload.md",
                        help="the report (Markdown; its plot beside it as .png); default: the committed results file")
    args = parser.parse_args()
    lower = tuple(float(m) for m in args.lower_multiples.split(",") if m.strip())
    report = run_overload(Settings(model=args.model, duration_s=args.duration_s, multiple=args.multiple,
                                   ramp_s=args.ramp_s, lower_multiples=lower, phase_s=args.phase_s,
                                   ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms,
                                   keep_trace=args.keep_trace))  # fmt: skip
    table = render(report)
    print(table)
    load = os.getloadavg()
    machine = (f"{cpu_model_name()}, {os.cpu_count()} cores, client and runtime on the same host; load average "
               f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) when it ended")  # fmt: skip
    command = " ".join(["python benchmarks/overload.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Overload\n\n`{command}` on {machine}\n\n{table}\n")
    plot(report, args.out.with_suffix(".png"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
