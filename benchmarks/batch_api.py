"""Batch API vs live requests: BE output tokens/s of the same lines, through /v1/batches and as live requests.

Starts one `piggyback serve` on loopback (BE service `bulk`, the Batch API on, SQLite in a temp dir), then
1. finds the best live concurrency: the first --sweep-lines lines as live non-streamed chat requests at each
   concurrency of --concurrency (output tokens over wall time, first request sent to last answer read);
2. sends all --lines lines live at that concurrency;
3. uploads the same lines as one batch file, creates the batch, and polls it until `completed` (created to
   completed: leasing, running, recording every result durably, writing the output file), then reads the output
   file for the output tokens.
The ratio batch / live (step 3 over step 2) is the cost of the durable bookkeeping (goal >= 0.97). Each run has
the runtime to itself; the batch runner's share is --max-inflight-lines (batch.max_inflight_lines) lines in
flight, by default the best live concurrency, so that both sides keep as many requests in the engine.
The default (10,000 lines of 2 output tokens on the tiny synthetic model) finishes in about half an hour on a
loaded 2-core VM: short answers make the per-line cost (HTTP or leasing and recording) as large a share as it
can be, which is what the ratio is about. The machine's load average is recorded with the figures.

    python benchmarks/batch_api.py [--lines 10000] [--max-tokens 2] [--sweep-lines 1000]
        [--concurrency 64,128,256] [--max-inflight-lines 0] [--model synthetic://tiny-llama] [--device auto]

Prints a table and writes benchmarks/results/batch_api.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from piggyback_runtime.client import free_port, start_server, wait_ready
from piggyback_runtime.config import RuntimeConfig

RESULTS = Path(__file__).parent / "results" / "batch_api.md"


def config(port: int, args: argparse.Namespace, directory: Path) -> RuntimeConfig:
    return RuntimeConfig.from_dict({
        "model": {"uri": args.model, "max_model_len": 512},
        "device": args.device,
        "services": [{"name": "bulk", "class": "BE"}],
        # The token budget holds one decode token of every running sequence (a budget below max_num_seqs is refused).
        "engine": {"policy": args.policy, "max_num_seqs": max(256, *args.concurrencies),
                   "max_num_batched_tokens": max(512, *args.concurrencies)},
        "piggyback": {"max_be_requests": max(256, *args.concurrencies)},
        "slo_control": {"enabled": False},
        "server": {"host": "127.0.0.1", "port": port},
        "batch": {"enabled": True, "directory": str(directory), "poll_interval_s": 0.2,
                  # set for the batch run (step 3) through the server's config; see main()
                  "max_inflight_lines": args.max_inflight_lines or max(args.concurrencies)},
    })  # fmt: skip


def lines(count: int, max_tokens: int) -> list[dict]:
    return [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "bulk", "messages": [{"role": "user", "content": f"Summarise item {i} of the backlog"}],
                      "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
            for i in range(count)]  # fmt: skip


async def live(base: str, items: list[dict], concurrency: int) -> tuple[float, int]:
    """(seconds, output tokens) of every line sent as a live request, `concurrency` at a time."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            item = queue.get_nowait()
            response = await client.post("/v1/chat/completions", json=item["body"])
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        start = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.monotonic() - start, tokens


def batch(base: str, items: list[dict]) -> tuple[float, int, dict]:
    """(seconds from create to completed, output tokens, the final batch object)."""
    content = "".join(json.dumps(item) + "\n" for item in items).encode()
    file_id = httpx.post(f"{base}/v1/files", files={"file": ("bench.jsonl", content)}, data={"purpose": "batch"},
                         timeout=600).json()["id"]  # fmt: skip
    start = time.monotonic()
    created = httpx.post(f"{base}/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                     "completion_window": "24h"}, timeout=60).json()  # fmt: skip
    while (state := httpx.get(f"{base}/v1/batches/{created['id']}", timeout=60).json())["status"] not in (
            "completed", "failed", "cancelled", "expired"):  # fmt: skip
        time.sleep(0.05)
    seconds = time.monotonic() - start
    output = httpx.get(f"{base}/v1/files/{state['output_file_id']}/content", timeout=600).content
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                 for line in output.decode().splitlines() if line)  # fmt: skip
    return seconds, tokens, state


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


class Server:
    """One `piggyback serve` for the benchmark, warmed up (kernels, allocator) before it is measured."""

    def __init__(self, args: argparse.Namespace, workdir: Path, items: list[dict]) -> None:
        self.args, self.workdir, self.items = args, workdir, items

    def __enter__(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.process = start_server(config(port, self.args, self.workdir / "batch"), self.workdir,
                                    self.workdir / "server.log")  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, self.process, timeout_s=600)
            asyncio.run(live(base, self.items[: min(64, len(self.items))], 32))
        except BaseException:
            self.__exit__()
            raise
        return base

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--sweep-lines", type=int, default=1000, help="lines per concurrency of the live sweep")
    parser.add_argument("--concurrency", default="64,128,256", help="the live concurrencies to sweep")
    parser.add_argument("--max-inflight-lines", type=int, default=0, help="0: the best live concurrency")
    parser.add_argument("--model", default="synthetic://tiny-llama")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--policy", default="priority")
    args = parser.parse_args()
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    items = lines(args.lines, args.max_tokens)
    runs: list[tuple[str, float, int, str]] = []  # (run, seconds, output tokens, load average after it)

    def report(name: str, seconds: float, tokens: int, note: str = "") -> None:
        runs.append((name, seconds, tokens, load_average()))
        print(f"{name:40s} {seconds:8.1f} s {tokens:8d} tok {tokens / seconds:9.1f} tok/s  load {runs[-1][3]} {note}",
              flush=True)  # fmt: skip

    started_load = load_average()
    with tempfile.TemporaryDirectory(prefix="piggyback-bench-batch-") as tmp:
        sweep: dict[int, float] = {}
        if len(args.concurrencies) > 1:
            with Server(args, Path(tmp) / "sweep", items) as base:
                for concurrency in args.concurrencies:
                    seconds, tokens = asyncio.run(live(base, items[: args.sweep_lines], concurrency))
                    sweep[concurrency] = tokens / seconds
                    report(f"sweep: live, concurrency {concurrency} ({args.sweep_lines} lines)", seconds, tokens)
        best = max(sweep, key=lambda c: sweep[c]) if sweep else args.concurrencies[0]
        args.max_inflight_lines = args.max_inflight_lines or best
        with Server(args, Path(tmp) / "measured", items) as base:
            l_seconds, l_tokens = asyncio.run(live(base, items, best))
            report(f"live, concurrency {best} ({args.lines} lines)", l_seconds, l_tokens)
            b_seconds, b_tokens, state = batch(base, items)
            report(f"Batch API, max_inflight_lines {args.max_inflight_lines} ({args.lines} lines)", b_seconds,
                   b_tokens, f"({state['status']}, {state['request_counts']})")  # fmt: skip
    assert state["status"] == "completed" and b_tokens == l_tokens, (state, b_tokens, l_tokens)
    ratio = (b_tokens / b_seconds) / (l_tokens / l_seconds)
    print(f"batch / live (concurrency {best}): {ratio:.3f}  (goal >= 0.97)")
    rows = "\n".join(f"| {name} | {s:.1f} | {t} | {t / s:.1f} | {load} |" for name, s, t, load in runs)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        f"# Batch API vs live BE requests\n\n"
        f"`python benchmarks/batch_api.py --lines {args.lines} --max-tokens {args.max_tokens} --sweep-lines "
        f"{args.sweep_lines} --concurrency {args.concurrency} --model {args.model} --device {args.device} "
        f"--policy {args.policy}` ({time.strftime('%Y-%m-%d %H:%M %Z')})\n\n"
        f"CPU: {cpu_model()} ({os.cpu_count()} cores visible); device {args.device}. The machine was shared with "
        f"other jobs: load average (1/5/15 min) {started_load} at the start, after each run in the table.\n\n"
        f"| run | seconds | output tokens | tok/s | load average after |\n|---|---|---|---|---|\n{rows}\n\n"
        f"Batch / live at the best concurrency ({best}): **{ratio:.3f}** (goal >= 0.97).\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
