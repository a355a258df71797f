"""The main job: a runtime serving one LS and one BE service of a synthetic model under mixed load.

Starts `piggyback serve` as a real process on loopback, drives Poisson LS arrivals and a closed-loop BE
batch through the OpenAI streaming API for a bounded time, shows progress, and prints per-service
TTFT/TPOT percentiles, LS SLO attainment and throughput, next to what the runtime's /metrics reports.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from piggyback_runtime import metrics as m
from piggyback_runtime.client import STREAM_OK, STREAM_REJECTED, free_port, start_server, stream_completion, wait_ready
from piggyback_runtime.config import RuntimeConfig, SLOConfig
from piggyback_runtime.scheduler.policies import policy_class

LS_SERVICE = "chat"
BE_SERVICE = "batch"
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "serve",
    "model",
    "request",
    "token",
    "batch",
    "latency",
    "answer",
    "question",
    "summary",
    "write",
    "explain",
    "translate",
    "system",
    "user",
    "assistant",
    "hello",
    "world",
    "piggyback",
    "scheduler",
    "queue",
]


@dataclass
class RequestRecord:
    service: str
    sent_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    rejected: bool = False  # HTTP 429 at arrival (admission control): an SLO miss, not a failure

    def timing(self) -> m.RequestTiming:
        """The SLO figures as the client saw them (sent → first token read), with the runtime's definitions."""
        return m.RequestTiming(self.sent_s, None, self.first_token_s, self.last_token_s, self.output_tokens)

    def attained(self, slo: SLOConfig) -> bool:
        return self.error is None and not self.rejected and all(m.slo_attained(self.timing(), slo.ttft_s, slo.tpot_s))


@dataclass
class LoadResult:
    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0


def demo_config(model_uri: str, port: int) -> RuntimeConfig:
    return RuntimeConfig.from_dict({
        "model": {"uri": model_uri, "dtype": "auto"},
        "device": "auto",
        "services": [
            {"name": LS_SERVICE, "class": "LS", "slo": {"ttft_ms": 2000, "tpot_ms": 250, "attainment_target": 0.9}},
            {"name": BE_SERVICE, "class": "BE"},
        ],
        "engine": {"max_num_batched_tokens": 256, "num_kv_blocks": 2048, "block_size": 16, "max_num_seqs": 64},
        # One CPU attention worker thread: on a small CPU-only host the other cores run the "accelerator".
        "piggyback": {"num_host_kv_blocks": 1024, "max_be_requests": 64, "cpu_threads_per_worker": 1},
        "server": {"host": "127.0.0.1", "port": port},
        "metrics": {"attainment_window_s": 600},
    })  # fmt: skip


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


# The runtime's Retry-After is at least 1 s; a batch client that retried at once would only count 429s.
BE_BACKOFF_AFTER_429_S = 1.0


async def _stream_one(
    client: httpx.AsyncClient, service: str, prompt: str, max_tokens: int, record: RequestRecord
) -> RequestRecord:
    outcome = await stream_completion(client, service, prompt, max_tokens, record)
    record.rejected = outcome == STREAM_REJECTED
    record.error = None if outcome in (STREAM_OK, STREAM_REJECTED) else outcome
    return record


async def drive_load(
    base_url: str, duration_s: float, ls_rate_per_s: float, be_concurrency: int, seed: int = 0, progress: bool = True
) -> LoadResult:
    rng = random.Random(seed)
    result = LoadResult()
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=be_concurrency + 256)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks: set[asyncio.Task[RequestRecord]] = set()

        def launch(service: str, prompt: str, max_tokens: int) -> asyncio.Task[RequestRecord]:
            record = RequestRecord(service, time.monotonic())
            result.records.append(record)
            task = asyncio.create_task(_stream_one(client, service, prompt, max_tokens, record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return task

        async def be_worker() -> None:
            # LongBench-like: long prompts, medium outputs; closed loop keeps the batch full.
            while time.monotonic() < deadline:
                record = await launch(
                    BE_SERVICE,
                    _prompt(rng, _lognormal_int(rng, 300, 0.4, 64, 900)),
                    _lognormal_int(rng, 64, 0.3, 16, 128),
                )
                if record.rejected:  # the BE queue is full: back off as Retry-After asks, not hammer it
                    await asyncio.sleep(BE_BACKOFF_AFTER_429_S)

        async def ls_arrivals() -> None:
            # ShareGPT-like: short prompts and outputs, Poisson arrivals.
            while True:
                await asyncio.sleep(rng.expovariate(ls_rate_per_s))
                if time.monotonic() >= deadline:
                    return
                launch(
                    LS_SERVICE, _prompt(rng, _lognormal_int(rng, 60, 0.6, 8, 300)), _lognormal_int(rng, 24, 0.5, 4, 64)
                )

        async def report() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                await asyncio.sleep(5.0)
                done = [r for r in result.records if r.last_token_s is not None or r.error or r.rejected]
                be_tokens = sum(r.output_tokens for r in result.records if r.service == BE_SERVICE)
                print(
                    f"  [{time.monotonic() - start:5.0f}s] requests sent {len(result.records):4d}, "
                    f"done {len(done):4d}, BE tokens {be_tokens:6d}",
                    flush=True,
                )

        started = time.monotonic()
        workers = [asyncio.create_task(be_worker()) for _ in range(be_concurrency)]
        side = [asyncio.create_task(ls_arrivals())]
        if progress:
            side.append(asyncio.create_task(report()))
        await asyncio.gather(*workers, *side)
        if tasks:
            await asyncio.gather(*tasks)
        result.duration_s = time.monotonic() - started
    return result


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:8.0f}"


def summarize(result: LoadResult, config: RuntimeConfig, server_metrics: str) -> str:
    runtime_attainment = {}
    for family in text_string_to_metric_families(server_metrics):
        if family.name == m.SLO_ATTAINMENT:
            for sample in family.samples:
                runtime_attainment[sample.labels["model_name"]] = sample.value
    header = (
        f"{'service':8} {'class':5} {'reqs':>5} {'429s':>5} {'errors':>6} {'TTFT p50':>9} {'p90':>8} {'p99':>8} "
        f"{'TPOT p50':>9} {'p90':>8} {'p99':>8} {'SLO attained':>13} {'runtime says':>12} {'out tok/s':>10}"
    )
    lines = [header, "-" * len(header)]
    for service in config.services:
        records = [r for r in result.records if r.service == service.name]
        ttfts = [t for r in records if (t := r.timing().ttft_s) is not None]
        tpots = [t for r in records if (t := r.timing().tpot_s) is not None]
        errors = sum(1 for r in records if r.error)
        rejected = sum(1 for r in records if r.rejected)
        tokens = sum(r.output_tokens for r in records)
        attained = "-"
        if service.slo is not None and records:
            ok = sum(1 for r in records if r.attained(service.slo))
            attained = f"{ok / len(records):6.1%}"
        said = f"{runtime_attainment[service.name]:.1%}" if service.name in runtime_attainment else "-"
        lines.append(
            f"{service.name:8} {service.service_class:5} {len(records):5d} {rejected:5d} {errors:6d} "
            f"{_ms(_percentile(ttfts, 50)):>9} {_ms(_percentile(ttfts, 90)):>8} {_ms(_percentile(ttfts, 99)):>8} "
            f"{_ms(_percentile(tpots, 50)):>9} {_ms(_percentile(tpots, 90)):>8} {_ms(_percentile(tpots, 99)):>8} "
            f"{attained:>13} {said:>12} {tokens / max(result.duration_s, 1e-9):10.1f}"
        )
    return "\n".join(lines)


def run_demo(duration_s: float, ls_rate_per_s: float, be_concurrency: int, model_uri: str) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress
    port = free_port()
    config = demo_config(model_uri, port)
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="piggyback-demo-") as tmp:
        log_path = Path(tmp) / "runtime.log"
        print(
            f"Starting a runtime on {base_url}: model {model_uri}, services '{LS_SERVICE}' (LS, SLO "
            f"TTFT {config.services[0].slo.ttft_ms:.0f} ms / TPOT {config.services[0].slo.tpot_ms:.0f} ms) "  # type: ignore[union-attr]
            f"and '{BE_SERVICE}' (BE)",
            flush=True,
        )
        process = start_server(config, Path(tmp), log_path)
        try:
            wait_ready(base_url, process)
            print(
                f"Ready. Driving {duration_s:.0f}s of load: LS Poisson {ls_rate_per_s}/s, "
                f"BE batch of {be_concurrency} in flight.",
                flush=True,
            )
            print(f"Policy {config.engine.policy}: {policy_class(config.engine.policy).summary()}", flush=True)
            result = asyncio.run(drive_load(base_url, duration_s, ls_rate_per_s, be_concurrency))
            server_metrics = httpx.get(f"{base_url}/metrics", timeout=10.0).text
        except Exception:
            print(log_path.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            process.terminate()
            process.wait(timeout=30)
    print()
    print(summarize(result, config, server_metrics))
    print(
        "\nTTFT/TPOT in ms as the client saw them; 'SLO attained': LS requests meeting both TTFT and TPOT; "
        "'runtime says': the runtime's own sliding-window figure."
    )
    failed = sum(1 for r in result.records if r.error)
    return 1 if failed else 0
