"""CPU time the runtime's HTTP thread spends per LS refusal (429), with and without the early refusal layer.

Under overload most LS requests are refused, and the HTTP thread that answers them shares the process (and
the GIL) with the engine thread (issue #26 §2). This measures one refusal's CPU on the thread that answers it:
- `asgi`: the app driven in-process (no sockets), the CPU time of the calling thread per request;
- `http`: `piggyback serve`'s uvicorn server (as `cli.py` configures it) on loopback in a thread of this
  process, a keep-alive client in another process; the CPU time of the server's thread per request
  (/proc/self/task/<tid>/schedstat), so uvicorn's parsing and socket writes are in it;
each `before` (every request through FastAPI to the handler: the app without server/early_refusal.py) and
`after` (as `create_app` builds it), then where a refusal's CPU goes now, part by part.

The service's SLO (TTFT 1 µs) refuses every LS request, even at an idle engine: the admission view is empty,
so the decision is at its cheapest (under real overload it also walks the queued LS requests; both paths make
the same decision). Requests are those of benchmarks/overload.py: a 16-48 word prompt, `stream: true`.

    python benchmarks/refusal_cost.py [--requests 3000] [--http-requests 3000] [--skip-http]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SERVICE = "chat"
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "serve", "request",
         "token", "model", "latency", "answer", "question", "summary", "explain", "write")  # fmt: skip


def _config(profile_dir: Path) -> Any:
    from piggyback_runtime.config import RuntimeConfig

    return RuntimeConfig.from_dict({
        "model": {"uri": "synthetic://tiny-llama", "max_model_len": 1024},
        "device": "cpu",
        "services": [{"name": SERVICE, "class": "LS", "slo": {"ttft_ms": 0.001, "tpot_ms": 0.001}},
                     {"name": "batch", "class": "BE"}],
        "engine": {"max_num_batched_tokens": 256, "num_kv_blocks": 1024, "block_size": 16, "max_num_seqs": 64,
                   "policy": "headroom-admit"},  # LS admission from the latency model; no CPU attention workers
        "slo_control": {"profile_cache_dir": str(profile_dir)},
    })  # fmt: skip


def _bodies(n: int, chat: bool, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    bodies = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 48)))
        fields: dict[str, Any] = {"model": SERVICE, "max_tokens": 16, "temperature": 0.0, "stream": True}
        if chat:
            fields["messages"] = [{"role": "user", "content": prompt}]
        else:
            fields["prompt"] = prompt
        bodies.append(json.dumps(fields).encode())
    return bodies


def _apps(runtime: Any) -> dict[str, Any]:
    from piggyback_runtime.server.app import create_app
    from piggyback_runtime.server.early_refusal import EarlyRefusal

    before = create_app(runtime)
    before.user_middleware = [m for m in before.user_middleware if m.cls is not EarlyRefusal]
    return {"before": before, "after": create_app(runtime)}


# --- in-process ---------------------------------------------------------------------------------------------
def _asgi_cpu_per_request_s(app: Any, path: str, bodies: list[bytes]) -> float:
    """CPU seconds of this thread per request, each sent to the ASGI app as uvicorn would hand it over."""
    statuses: dict[int, int] = {}

    async def one(body: bytes) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000), "state": {},
                 "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}  # fmt: skip
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays connected
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        await app(scope, receive, send)

    async def run(batch: list[bytes]) -> None:
        for body in batch:
            await one(body)

    asyncio.run(run(bodies[:200]))  # warm-up: the middleware stack is built on the first request
    started = time.thread_time()
    asyncio.run(run(bodies))
    cpu_s = time.thread_time() - started
    if set(statuses) != {429}:
        raise SystemExit(f"expected only 429s, got {statuses}")
    return cpu_s / len(bodies)


def _parts(runtime: Any, bodies: list[bytes], chat: bool) -> list[tuple[str, float]]:
    """Where one early refusal's CPU goes, step by step (each step timed alone over every body, in the order
    `refuse_before_routing` runs them)."""
    from starlette.datastructures import Headers

    from piggyback_runtime.server import app as server
    from piggyback_runtime.server.protocol import ChatCompletionRequest, CompletionRequest

    engine = runtime.engine
    model = ChatCompletionRequest if chat else CompletionRequest
    headers = Headers({"content-type": "application/json"})
    parsed = [model.model_validate(json.loads(b)) for b in bodies]
    prompts = [server._prompt_ids(p, engine) for p in parsed]
    requests = [server._engine_request(runtime, engine, p, headers, ids)
                for p, ids in zip(parsed, prompts, strict=True)]  # fmt: skip
    refused = [engine.refuse_early(r, forwarding=False) for r in requests]
    assert all(r is not None for r in refused)
    steps: list[tuple[str, Callable[[int], object]]] = [
        ("body: json.loads + pydantic validation", lambda i: model.model_validate(json.loads(bodies[i]))),
        ("one-token question (refuses_every_prompt)", lambda i: engine.engine.refuses_every_prompt(SERVICE, None)),
        ("tokenise" + (" (chat template + tokenizer)" if chat else ""),
         lambda i: server._prompt_ids(parsed[i], engine)),
        ("engine request (max_tokens, sampling, id)",
         lambda i: server._engine_request(runtime, engine, parsed[i], headers, prompts[i])),
        ("validate", lambda i: engine.engine.validate(requests[i])),
        ("refusal: decision + counters + arrival note", lambda i: engine.refuse_early(requests[i], forwarding=False)),
        ("429 response object", lambda i: server.rejection_error(refused[i]).response()),  # type: ignore[arg-type]
    ]  # fmt: skip
    measured = []
    for name, step in steps:
        started = time.thread_time()
        for i in range(len(bodies)):
            step(i)
        measured.append((name, (time.thread_time() - started) / len(bodies)))
    return measured


# --- over HTTP ----------------------------------------------------------------------------------------------
def _thread_cpu_s(native_id: int) -> float:
    """CPU time of one thread of this process (the scheduler's own count, nanoseconds)."""
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_cpu_per_request_s(app: Any, path: str, bodies_file: Path, n: int, connections: int) -> float:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread_id: list[int] = []

    def serve() -> None:
        thread_id.append(threading.get_native_id())
        server.run()

    thread = threading.Thread(target=serve, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    client = [sys.executable, __file__, "--client", str(port), path, str(bodies_file), str(n), str(connections)]
    subprocess.run([*client[:5], str(bodies_file), "200", str(connections)], check=True)  # warm-up
    started = _thread_cpu_s(thread_id[0])
    subprocess.run(client, check=True)
    cpu_s = _thread_cpu_s(thread_id[0]) - started
    server.should_exit = True
    thread.join(10)
    return cpu_s / n


def _client(port: int, path: str, bodies_file: Path, n: int, connections: int) -> None:
    """Send n requests over `connections` keep-alive connections; every answer must be a 429."""
    bodies = [line.encode() for line in bodies_file.read_text().splitlines()]

    async def worker(k: int, statuses: dict[int, int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(k, n, connections):
            body = bodies[i % len(bodies)]
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            status = int((await reader.readline()).split(b" ", 2)[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    async def run() -> None:
        statuses: dict[int, int] = {}
        await asyncio.gather(*(worker(k, statuses) for k in range(connections)))
        if set(statuses) != {429}:
            raise SystemExit(f"expected only 429s, got {statuses}")

    asyncio.run(run())


# --- report -------------------------------------------------------------------------------------------------
def main() -> None:
    from piggyback_runtime.hardware import cpu_model_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="in-process requests per path and variant")
    parser.add_argument("--http-requests", type=int, default=3000, help="requests over HTTP per path and variant")
    parser.add_argument("--connections", type=int, default=4, help="client keep-alive connections (HTTP)")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement, before and after in turn; "
                        "the median is shown")
    args = parser.parse_args()

    from piggyback_runtime.server.app import CHAT_COMPLETIONS_PATH, COMPLETIONS_PATH, Runtime

    lines = [f"`python benchmarks/refusal_cost.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"on {cpu_model_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the start", ""]
    with tempfile.TemporaryDirectory() as tmp:
        runtime = Runtime(_config(Path(tmp) / "profiles"))
        runtime.load()
        if runtime.engine is None:
            raise SystemExit(f"the runtime did not load: {runtime.load_error}")
        apps = _apps(runtime)
        rows = []
        for path, chat in ((COMPLETIONS_PATH, False), (CHAT_COMPLETIONS_PATH, True)):
            bodies = _bodies(args.requests, chat)
            bodies_file = Path(tmp) / "bodies.jsonl"
            bodies_file.write_text("\n".join(b.decode() for b in bodies))
            asgi_runs: dict[str, list[float]] = {name: [] for name in apps}
            http_runs: dict[str, list[float]] = {name: [] for name in apps}
            for _ in range(args.repeats):  # before and after in turn: a change in the machine's load hits both
                for name, app in apps.items():
                    asgi_runs[name].append(_asgi_cpu_per_request_s(app, path, bodies))
                    if not args.skip_http:
                        http_runs[name].append(_http_cpu_per_request_s(app, path, bodies_file, args.http_requests,
                                                                       args.connections))  # fmt: skip
            asgi = {name: statistics.median(runs) for name, runs in asgi_runs.items()}
            http = {name: statistics.median(runs) for name, runs in http_runs.items() if runs}
            rows.append((path, asgi, http, _parts(runtime, bodies[:1000], chat)))
        runtime.engine.stop()

    lines += ["| route | measured | before (µs CPU per 429) | after | before ÷ after |", "|---|---|---|---|---|"]
    for path, asgi, http, _ in rows:
        for where, cpu in (("in-process ASGI app (calling thread)", asgi), ("over HTTP (uvicorn thread)", http)):
            if cpu:
                lines.append(f"| {path} | {where} | {cpu['before'] * 1e6:.0f} | {cpu['after'] * 1e6:.0f} | "
                             f"{cpu['before'] / cpu['after']:.2f} |")  # fmt: skip
    for path, _, _, parts in rows:
        total = sum(s for _, s in parts)
        lines += ["", f"An early refusal on {path}, step by step (each timed alone; µs CPU):", "",
                  "| step | µs | share |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {name} | {s * 1e6:.1f} | {s / total:.0%} |" for name, s in parts]
        lines.append(f"| all steps | {total * 1e6:.1f} | |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "refusal_cost.md").write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        _client(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
