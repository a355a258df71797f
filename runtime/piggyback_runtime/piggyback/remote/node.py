"""A remote attention node: BE KV in this machine's DRAM, decode attention on its cores, served over one stream.

The engine talks to it in frames (wire.py), in order, on one TCP connection:

    hello    {token, layers, kv_heads, q_heads, head_dim, block_size, dtype, scale, kv_bytes, threads}
             -> ready {blocks}                        allocates the node's paged KV cache (head-major, like host KV)
    register {slot, gen, blocks}                      a BE request arrives: reserve its blocks here
    kv       {slot, layer, tokens} + k, v             its prefill KV of one layer (sent once, layer by layer)
    run      {layer, rows: [[slot, position, gen]], lse} + q, k, v
             -> done {layer, rows: [[slot, gen]]} + out, lse
                                                      append each row's newest k/v, attend over all of it
    forget   {slot}                                   the request is gone: free its blocks
    -> error {layer, rows, message}                   a batch failed (the node keeps serving)

The attention is the same kernel on the same data as a local CPU worker (worker.py), so a row's output is
bit-identical wherever it runs. On request (`lse: true`) the log-sum-exp of each head's scores goes back with
the output: the merge contract that lets one row's attention be split over several places. With the whole
context on one node the engine uses the output as it is and does not ask for it (it costs a second read of
the keys).

Runs in a Ray actor (actor.py) on a CPU-only node, or in a plain thread (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import threading
import traceback
from typing import Any

import torch

from piggyback_runtime.attention.cpu_attention import head_major, paged_decode_attention, write_kv
from piggyback_runtime.kv.allocator import flat_slot
from piggyback_runtime.piggyback.remote import wire

log = logging.getLogger(__name__)


class NodeState:
    """The node's KV cache and block tables; `handle` answers one frame."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None
        self.free_blocks: list[int] = []
        self.tables: dict[int, tuple[int, list[int]]] = {}  # slot -> (generation, block ids)
        self.scale = 1.0
        self.threads = 1
        self.block_size = 1

    def hello(self, header: dict[str, Any]) -> dict[str, Any]:
        if not hmac.compare_digest(str(header.get("token", "")), self.token):
            raise PermissionError("wrong token: this node serves only the engine that started it")
        dtype = getattr(torch, header["dtype"])
        self.block_size = int(header["block_size"])
        layers, kv_heads, head_dim = int(header["layers"]), int(header["kv_heads"]), int(header["head_dim"])
        block_bytes = 2 * layers * self.block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        blocks = max(1, int(header["kv_bytes"]) // block_bytes)
        shape = (layers, blocks, kv_heads, self.block_size, head_dim)
        self.key_cache = head_major(torch.zeros(shape, dtype=dtype))
        self.value_cache = head_major(torch.zeros(shape, dtype=dtype))
        self.free_blocks = list(range(blocks - 1, -1, -1))
        self.tables.clear()
        self.scale = float(header["scale"])
        self.threads = int(header["threads"])
        torch.set_num_threads(1)  # the kernel runs its own thread team (see worker.py)
        return {"kind": "ready", "blocks": blocks}

    def kv_tokens_held(self) -> int:
        return sum(len(blocks) for _, blocks in self.tables.values()) * self.block_size

    def handle(
        self, header: dict[str, Any], tensors: list[torch.Tensor]
    ) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        kind = header["kind"]
        if kind == "register":
            self._forget(int(header["slot"]))
            need = int(header["blocks"])
            if need > len(self.free_blocks):
                return {"kind": "error", "layer": -1, "rows": [[header["slot"], header["gen"]]],
                        "message": f"node KV full: {need} blocks asked, {len(self.free_blocks)} free"}, []  # fmt: skip
            self.tables[int(header["slot"])] = (int(header["gen"]), [self.free_blocks.pop() for _ in range(need)])
        elif kind == "forget":
            self._forget(int(header["slot"]))
        elif kind == "kv":
            assert self.key_cache is not None and self.value_cache is not None
            _, blocks = self.tables[int(header["slot"])]
            layer, tokens = int(header["layer"]), int(header["tokens"])
            slots = torch.tensor([flat_slot(blocks, p, self.block_size) for p in range(tokens)], dtype=torch.long)
            write_kv(self.key_cache[layer], self.value_cache[layer], slots, tensors[0], tensors[1])
        elif kind == "run":
            return self._run(header, tensors)
        else:
            raise wire.WireError(f"unknown message kind {kind!r}")
        return None

    def _forget(self, slot: int) -> None:
        entry = self.tables.pop(slot, None)
        if entry is not None:
            self.free_blocks.extend(entry[1])

    def _run(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> tuple[dict[str, Any], list[torch.Tensor]]:
        assert self.key_cache is not None and self.value_cache is not None
        layer = int(header["layer"])
        rows = header["rows"]
        try:
            q, k, v = tensors
            tables = [self.tables[int(slot)][1] for slot, _, _ in rows]
            positions = [int(position) for _, position, _ in rows]
            key_cache, value_cache = self.key_cache[layer], self.value_cache[layer]
            slot_mapping = torch.tensor(
                [flat_slot(table, p, self.block_size) for table, p in zip(tables, positions, strict=True)],
                dtype=torch.long,
            )
            write_kv(key_cache, value_cache, slot_mapping, k, v)
            width = max(len(t) for t in tables)
            table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
            lengths = torch.tensor([p + 1 for p in positions], dtype=torch.int32)
            out = paged_decode_attention(q, key_cache, value_cache, table_tensor, lengths, self.scale,
                                         num_threads=self.threads)  # fmt: skip
            want_lse = bool(header.get("lse"))
            lse = _log_sum_exp(q, key_cache, table_tensor, lengths, self.scale) if want_lse else torch.empty(0)
        except Exception:
            return {"kind": "error", "layer": layer, "rows": [[s, g] for s, _, g in rows],
                    "message": traceback.format_exc(limit=5)}, []  # fmt: skip
        return {"kind": "done", "layer": layer, "rows": [[s, g] for s, _, g in rows]}, [out, lse]


def _log_sum_exp(q: torch.Tensor, key_cache: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                 scale: float) -> torch.Tensor:  # fmt: skip
    """[rows, q_heads] float32: log Σ exp(scale · q·k) over each row's context (reads the keys once more)."""
    from piggyback_runtime.attention.cpu_attention import gather_pages

    rows, q_heads, _ = q.shape
    result = torch.empty((rows, q_heads), dtype=torch.float32)
    for i in range(rows):
        keys = gather_pages(key_cache, tables[i], int(lengths[i])).float()  # [n, kv_heads, d]
        group = q_heads // keys.shape[1]
        scores = torch.einsum("hgd,nhd->hgn", q[i].view(keys.shape[1], group, -1), keys) * scale
        result[i] = torch.logsumexp(scores, dim=-1).reshape(q_heads)
    return result


class NodeServer:
    """Listens on a TCP port and serves one engine connection at a time, on a thread of its own."""

    def __init__(self, token: str, host: str = "0.0.0.0", port: int = 0) -> None:
        self.state = NodeState(token)
        self.listener = socket.create_server((host, port))
        self.port = self.listener.getsockname()[1]
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, name="piggyback-remote-node", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
            try:
                self._serve_connection(conn)
            except (wire.WireError, OSError, PermissionError) as exc:
                log.info("engine connection ended: %s", exc)
            finally:
                conn.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        header, _, _ = wire.recv(conn)
        if header.get("kind") != "hello":
            raise wire.WireError("the first frame must be hello")
        wire.send(conn, self.state.hello(header))
        while True:
            header, tensors, _ = wire.recv(conn)
            reply = self.state.handle(header, tensors)
            if reply is not None:
                wire.send(conn, reply[0], reply[1])

    def close(self) -> None:
        """Stop listening and drop the engine's connection (what the engine sees when the node dies)."""
        self.listener.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
