"""Batch API vs live requests: BE output tokens/s of the same lines, through /v1/batches and as live requests.

Starts one `piggyback serve` on loopback (BE service `bulk`, the Batch API on, SQLite in a temp dir), then
1. sends the lines as live non-streamed chat requests at each concurrency of --concurrency, and keeps the best
   (output tokens over wall time, first request sent to last answer read);
2. uploads the same lines as a batch file, creates the batch, and polls it until `completed` (created to
   completed: leasing, running, recording every result durably, writing the output file), then reads the output
   file for the output tokens.
The ratio batch / best live is the cost of the durable bookkeeping (goal >= 0.97). Both runs have the runtime to
themselves; the batch runner's share is --max-inflight-lines (batch.max_inflight_lines) lines in flight.

    python benchmarks/batch_api.py [--lines 10000] [--max-tokens 16] [--concurrency 32,64,128]
        [--max-inflight-lines 128] [--model synthetic://tiny-llama] [--device auto]

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
        "engine": {"policy": args.policy, "max_num_seqs": max(256, args.max_inflight_lines)},
        "piggyback": {"max_be_requests": max(256, args.max_inflight_lines)},
        "slo_control": {"enabled": False},
        "server": {"host": "127.0.0.1", "port": port},
        "batch": {"enabled": True, "directory": str(directory), "max_inflight_lines": args.max_inflight_lines,
                  "poll_interval_s": 0.2},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", default="32,64,128")
    parser.add_argument("--max-inflight-lines", type=int, default=128)
    parser.add_argument("--model", default="synthetic://tiny-llama")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--policy", default="priority")
    args = parser.parse_args()
    items = lines(args.lines, args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="piggyback-bench-batch-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        process = start_server(config(port, args, workdir / "batch"), workdir, workdir / "server.log")
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process, timeout_s=600)
            asyncio.run(live(base, items[: min(64, len(items))], 32))  # warm-up: kernels, allocator
            live_runs = {}
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                seconds, tokens = asyncio.run(live(base, items, concurrency))
                live_runs[concurrency] = (seconds, tokens, tokens / seconds)
                print(f"live  concurrency {concurrency:4d}: {seconds:8.1f} s  {tokens:8d} tok  "
                      f"{tokens / seconds:9.1f} tok/s", flush=True)  # fmt: skip
            b_seconds, b_tokens, state = batch(base, items)
            print(f"batch max_inflight {args.max_inflight_lines:4d}: {b_seconds:8.1f} s  {b_tokens:8d} tok  "
                  f"{b_tokens / b_seconds:9.1f} tok/s  ({state['status']}, {state['request_counts']})", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    best_c, (_, _, best_rate) = max(live_runs.items(), key=lambda kv: kv[1][2])
    ratio = (b_tokens / b_seconds) / best_rate
    print(f"batch / best live (concurrency {best_c}): {ratio:.3f}  (goal >= 0.97)")
    rows = "\n".join(f"| live, concurrency {c} | {s:.1f} | {t} | {r:.1f} |" for c, (s, t, r) in live_runs.items())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        f"# Batch API vs live BE requests\n\n"
        f"`python benchmarks/batch_api.py --lines {args.lines} --max-tokens {args.max_tokens} --concurrency "
        f"{args.concurrency} --max-inflight-lines {args.max_inflight_lines} --model {args.model} --device "
        f"{args.device} --policy {args.policy}`\n\n"
        f"CPU: {cpu_model()} ({os.cpu_count()} cores visible); device {args.device}.\n\n"
        f"| run | seconds | output tokens | tok/s |\n|---|---|---|---|\n{rows}\n"
        f"| Batch API, max_inflight_lines {args.max_inflight_lines} | {b_seconds:.1f} | {b_tokens} | "
        f"{b_tokens / b_seconds:.1f} |\n\n"
        f"Batch / best live (concurrency {best_c}): **{ratio:.3f}** (goal >= 0.97).\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
