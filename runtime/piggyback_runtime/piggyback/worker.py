"""A CPU attention worker: a separate process that computes BE decode attention against host-DRAM KV.

Why a process: the engine loop must never wait on BE attention, and Python threads would share its GIL.
A process has its own interpreter; the native kernel inside it runs its own thread team. All bulky
data lives in shared memory created by the engine (the host KV cache and per-request q/k/v/out slots),
so messages carry only small integers:

    engine -> worker: ("register", slot, block_ids)           a BE request's host block table
                      ("run", [(slot, layer, position, gen)])  compute attention for these rows
                      ("forget", slot)                         the request is gone
    worker -> engine: ("ready", pid)
                      ("done", [(slot, layer, gen)], busy_s)   out[slot] holds the result; busy_s: compute time
                      ("error", message)                       a task failed (the worker keeps going)

`gen` is the slot's generation: a result for a slot that was freed and reused is recognisably stale.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from piggyback_runtime.attention.cpu_attention import head_major
from piggyback_runtime.kv.allocator import flat_slot


@dataclass
class SharedBuffers:
    """Tensors in shared memory, created by the engine and handed to every worker at spawn."""

    key_cache: torch.Tensor  # [layers, blocks, block_size, kv_heads, head_dim], head-major storage (see head_major)
    value_cache: torch.Tensor
    q_in: torch.Tensor  # [slots, q_heads, head_dim] float32
    k_in: torch.Tensor  # [slots, kv_heads, head_dim] float32
    v_in: torch.Tensor
    out: torch.Tensor  # [slots, q_heads, head_dim] float32
    # A lock-free shared flag (multiprocessing.RawValue): tasks run only while it is 1. Tests hold and release
    # tasks with it. Not an Event: a worker killed while waiting on an Event leaves its lock broken.
    hold: Any

    @classmethod
    def allocate(
        cls, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, q_heads: int, head_dim: int,
        num_slots: int, kv_dtype: torch.dtype, hold: Any,
    ) -> SharedBuffers:  # fmt: skip
        storage_shape = (num_layers, num_blocks, kv_heads, block_size, head_dim)
        return cls(
            key_cache=head_major(shared_zeros(storage_shape, kv_dtype)),
            value_cache=head_major(shared_zeros(storage_shape, kv_dtype)),
            q_in=shared_zeros((num_slots, q_heads, head_dim), torch.float32),
            k_in=shared_zeros((num_slots, kv_heads, head_dim), torch.float32),
            v_in=shared_zeros((num_slots, kv_heads, head_dim), torch.float32),
            out=shared_zeros((num_slots, q_heads, head_dim), torch.float32),
            hold=hold,
        )


def shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor allocated straight in shared memory, its pages touched only when first written.

    (torch.zeros(...).share_memory_() would write every byte of a many-GiB host KV cache twice at start-up.)
    """
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def worker_main(conn: Connection, buffers: SharedBuffers, scale: float, num_threads: int) -> None:
    """Process entry point: serve attention tasks until the engine closes the connection."""
    from piggyback_runtime.attention.cpu_attention import native_available, paged_decode_attention, write_kv

    # The kernel runs on its own thread team (num_threads is passed to it). torch's own pool stays at one
    # thread: the worker's torch ops are small, and OpenMP threads left spinning after a parallel op
    # compete with the team for the cores (in benchmarks/cpu_attention.py that cost a quarter of the
    # kernel's bandwidth at 2 threads).
    torch.set_num_threads(1)
    native_available()  # build or load the native kernel now: "ready" must mean ready to serve at speed
    block_tables: dict[int, list[int]] = {}
    block_size = buffers.key_cache.shape[2]
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the engine went away
        kind = message[0]
        if kind == "register":
            block_tables[message[1]] = message[2]
        elif kind == "forget":
            block_tables.pop(message[1], None)
        elif kind == "run":
            while not buffers.hold.value:
                time.sleep(0.001)
            tasks: list[tuple[int, int, int, int]] = message[1]
            started = time.perf_counter()
            try:
                by_layer: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
                for task in tasks:
                    by_layer[task[1]].append(task)
                for layer, group in by_layer.items():
                    slots = torch.tensor([t[0] for t in group], dtype=torch.long)
                    positions = [t[2] for t in group]
                    tables = [block_tables[t[0]] for t in group]
                    key_cache, value_cache = buffers.key_cache[layer], buffers.value_cache[layer]
                    # The newest token's k/v go into the host cache first, then every row attends over it.
                    slot_mapping = torch.tensor(
                        [flat_slot(table, p, block_size) for table, p in zip(tables, positions, strict=True)],
                        dtype=torch.long,
                    )
                    write_kv(key_cache, value_cache, slot_mapping, buffers.k_in[slots], buffers.v_in[slots])
                    width = max(len(t) for t in tables)
                    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
                    lengths = torch.tensor([p + 1 for p in positions], dtype=torch.int32)
                    result = paged_decode_attention(
                        buffers.q_in[slots], key_cache, value_cache, table_tensor, lengths, scale,
                        num_threads=num_threads,
                    )  # fmt: skip
                    buffers.out[slots] = result
                conn.send(("done", [(t[0], t[1], t[3]) for t in tasks], time.perf_counter() - started))
            except Exception:
                conn.send(("error", traceback.format_exc(limit=5), [(t[0], t[1], t[3]) for t in tasks]))
