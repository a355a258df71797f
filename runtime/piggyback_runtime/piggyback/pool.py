"""The engine's side of the CPU attention workers: slots, task submission, non-blocking result polling,
and replacing a worker that died.

Every BE request in decode owns one slot (its row in the shared q/k/v/out buffers). Every worker knows every
slot's host block table, so any worker can serve any row: each layer's tasks are spread over the workers by
work (a task's work is its context length; the worker with the least work in flight takes the next largest
task), not queued behind one worker per row. The worker a row's latest task went to "holds" it: if that
worker dies, the row fails (its task, and the partial state in that process, are gone). A request has at
most one attention task in flight, so the slot never holds two tasks' data at once. Nothing here ever blocks
the engine: submissions go through a sender thread, and results are collected with `poll`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from piggyback_runtime.piggyback.worker import SharedBuffers, worker_main

log = logging.getLogger(__name__)


@dataclass
class Worker:
    index: int
    process: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    slots: set[int] = field(default_factory=set)  # rows whose latest task went here (it "holds" them)
    # Tasks sent and not yet reported: (slot, layer, generation) -> work (context tokens).
    in_flight: dict[tuple[int, int, int], int] = field(default_factory=dict)
    busy_s: float = 0.0  # seconds spent computing tasks, as the worker reports them
    tasks_sent: int = 0

    @property
    def work_in_flight(self) -> int:
        return sum(self.in_flight.values())


@dataclass(frozen=True)
class Completion:
    slot: int
    layer: int
    generation: int
    error: str | None = None


@dataclass(frozen=True)
class WorkerDeath:
    worker: int
    exit_code: int | None
    slots: list[int]


class WorkerStartError(RuntimeError):
    """A CPU attention worker died before it was ready (most often: a main module without a main guard)."""


MAIN_GUARD_HINT = (
    "CPU attention workers are started with multiprocessing's 'spawn' method, which re-imports the program's main "
    "module in every worker. A program that builds the engine (Engine, Runtime, run_demo) at import time makes "
    "each worker try to start an engine of its own, which fails. Fix: put the program's entry point under "
    '`if __name__ == "__main__":` (Python docs, multiprocessing, "Safe importing of main module").'
)


def _main_module_hint() -> str:
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path:
        return ""
    try:
        guarded = "__main__" in Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f" The main module is {path}."
    return f" The main module is {path}{'' if guarded else ', and it has no such guard'}."


class CPUAttentionPool:
    def __init__(self, buffers: SharedBuffers, num_workers: int, threads_per_worker: int, scale: float) -> None:
        self.buffers = buffers
        self.scale = scale
        self.threads_per_worker = threads_per_worker
        self._ctx = mp.get_context("spawn")  # fork would copy the engine's threads and CUDA state
        self.workers: list[Worker] = [self._spawn(i) for i in range(num_workers)]
        self.restarts = 0
        self._busy_of_replaced = 0.0
        self.tables: dict[int, list[int]] = {}  # slot -> host block table, as every worker has it
        # One ordered queue of (event, action): an action runs only after its CUDA event (if any) completes,
        # so a task is sent only once its q/k/v copies have landed in shared memory.
        self._outbox: queue.SimpleQueue[tuple[torch.cuda.Event | None, Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._sender = threading.Thread(target=self._send_loop, name="cpu-attention-sender", daemon=True)
        self._sender.start()

    # --- lifecycle -------------------------------------------------------------------------------------
    def _spawn(self, index: int) -> Worker:
        if getattr(mp.process.current_process(), "_inheriting", False):
            # We are a worker re-importing an unguarded main module: say why, instead of multiprocessing's
            # generic bootstrapping error (the parent reports the same in WorkerStartError).
            raise WorkerStartError(MAIN_GUARD_HINT)
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main, args=(child, self.buffers, self.scale, self.threads_per_worker),
            name=f"piggyback-cpu-attention-{index}", daemon=True,
        )  # fmt: skip
        process.start()
        child.close()
        return Worker(index, process, parent)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until every worker has started (used once at engine start, never in the loop)."""
        for worker in self.workers:
            if not worker.ready:
                if not worker.conn.poll(timeout_s):
                    raise TimeoutError(f"CPU attention worker {worker.index} did not start within {timeout_s:.0f}s")
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):  # the worker died before saying "ready": not a bare EOFError
                    worker.process.join(timeout=5)
                    raise WorkerStartError(
                        f"CPU attention worker {worker.index} exited during start-up (exit code "
                        f"{worker.process.exitcode}) before it was ready. {MAIN_GUARD_HINT}{_main_module_hint()}"
                    ) from None
                assert message[0] == "ready", message
                worker.ready = True

    def close(self) -> None:
        self._outbox.put(None)
        for worker in self.workers:
            worker.conn.close()
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()

    def least_loaded_worker(self) -> int:
        """The worker with the least work in flight (then the fewest rows held): a new row's first holder."""
        return min(self.workers, key=lambda w: (w.work_in_flight, len(w.slots))).index

    # --- sending -----------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            event, action = item
            if event is not None:
                event.synchronize()
            # A send to a worker that died fails; poll() reports the death and fails its requests.
            with contextlib.suppress(OSError, ValueError):
                action()

    def _send(self, worker_index: int, message: tuple, event: torch.cuda.Event | None = None) -> None:
        conn = self.workers[worker_index].conn
        self._outbox.put((event, lambda: conn.send(message)))

    def after(self, event: torch.cuda.Event | None, action: Callable[[], None]) -> None:
        """Run `action` on the sender thread, in order with task submissions (e.g. host KV writes)."""
        self._outbox.put((event, action))

    def register(self, worker_index: int, slot: int, block_ids: list[int]) -> None:
        """A row's host block table (new, or grown) to every worker; `worker_index` holds the row until its
        first task goes out."""
        for worker in self.workers:
            worker.slots.discard(slot)
        self.workers[worker_index].slots.add(slot)
        self.update_table(slot, block_ids)

    def update_table(self, slot: int, block_ids: list[int]) -> None:
        """The slot's block table grew (or moved): every worker gets it before any later task."""
        self.tables[slot] = list(block_ids)
        for worker in self.workers:
            self._send(worker.index, ("register", slot, list(block_ids)))

    def forget(self, worker_index: int, slot: int) -> None:
        self.tables.pop(slot, None)
        for worker in self.workers:
            worker.slots.discard(slot)
            self._send(worker.index, ("forget", slot))

    def submit(self, tasks: list[tuple[int, int, int, int]]) -> dict[int, int]:
        """Queue attention tasks (slot, layer, position, generation), spread over the workers by work; they go
        out after everything queued before them (e.g. their q/k/v staging). Returns slot -> worker."""
        by_worker: dict[int, list[tuple[int, int, int, int]]] = {}
        assigned: dict[int, int] = {}
        # Largest first onto the least loaded worker (LPT): layers and contexts of every size mix on each worker.
        for task in sorted(tasks, key=lambda t: -t[2]):
            worker = min(self.workers, key=lambda w: (w.work_in_flight, len(by_worker.get(w.index, ()))))
            slot, layer, position, generation = task
            worker.in_flight[(slot, layer, generation)] = position + 1
            worker.tasks_sent += 1
            for other in self.workers:
                other.slots.discard(slot)
            worker.slots.add(slot)
            by_worker.setdefault(worker.index, []).append(task)
            assigned[slot] = worker.index
        for worker_index, worker_tasks in by_worker.items():
            self._send(worker_index, ("run", worker_tasks))
        return assigned

    def busy_seconds(self) -> float:
        """Seconds the workers have spent computing tasks, summed over workers (replaced ones included)."""
        return self._busy_of_replaced + sum(w.busy_s for w in self.workers)

    # --- receiving ---------------------------------------------------------------------------------------
    def poll(self) -> tuple[list[Completion], list[WorkerDeath]]:
        """Collect every finished task without blocking; report (and replace) workers that died."""
        done: list[Completion] = []
        deaths: list[WorkerDeath] = []
        for worker in self.workers:
            try:
                while worker.conn.poll():
                    message = worker.conn.recv()
                    if message[0] == "ready":
                        worker.ready = True
                    elif message[0] == "done":
                        done.extend(Completion(s, layer, g) for s, layer, g in message[1])
                        self._landed(worker, message[1])
                        worker.busy_s += message[2]
                    elif message[0] == "error":
                        log.error("CPU attention worker %d failed a batch:\n%s", worker.index, message[1])
                        done.extend(Completion(s, layer, g, error=message[1]) for s, layer, g in message[2])
                        self._landed(worker, message[2])
            except (EOFError, OSError):
                pass
            if not worker.process.is_alive():
                deaths.append(self._replace(worker))
        return done, deaths

    @staticmethod
    def _landed(worker: Worker, reported: list[tuple[int, int, int]]) -> None:
        for key in reported:
            worker.in_flight.pop(tuple(key), None)  # type: ignore[arg-type]

    def wait(self, timeout_s: float) -> None:
        """Sleep until some worker has something to say (only when the accelerator has nothing to do)."""
        wait([w.conn for w in self.workers], timeout=timeout_s)

    def _replace(self, dead: Worker) -> WorkerDeath:
        exit_code = dead.process.exitcode
        log.error("CPU attention worker %d (pid %s) died with exit code %s; replacing it",
                  dead.index, dead.process.pid, exit_code)  # fmt: skip
        death = WorkerDeath(dead.index, exit_code, sorted(dead.slots))
        dead.conn.close()
        self._busy_of_replaced += dead.busy_s
        replacement = self.workers[dead.index] = self._spawn(dead.index)
        for slot, table in self.tables.items():  # the new worker serves every row, as the others do
            if slot not in dead.slots:
                self._send(replacement.index, ("register", slot, list(table)))
        self.restarts += 1
        return death

    def pids(self) -> list[int | None]:
        return [w.process.pid for w in self.workers]


def default_threads_per_worker(num_workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // num_workers)
