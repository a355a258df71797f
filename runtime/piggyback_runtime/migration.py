"""Live migration of a running request, with its KV, from one runtime to another: the engine's side.

`Migrator` freezes a request between two iterations (it stops being scheduled and keeps its KV), exports it
(`Request.to_wire` plus its KV rows), and then either commits (the target took it: free the KV here, end the
stream with FINISH_MIGRATED) or resumes it where it was; on the target it imports one. Its methods run on the
engine thread (through AsyncEngine.call). The HTTP endpoints that drive it for the pool router are in
server/internal.py; this module imports nothing of the server or the router.

What moves: prompt and output token ids, sampling params (the seed too: sampling draws from a hash of
(seed, token index), sampling.py, so an exported seed continues the same random stream), the incremental
detokeniser state, the SLO target and the request's timings (re-based onto the target's clock), and its KV:
accelerator KV for requests that decode on the accelerator (LS), host KV for those on the CPU path (BE), in
both cases the rows of positions [0, num_computed_tokens). The next token is computed on the target from
exactly these bytes, so a greedy request continues token for token as it would have without migrating.

Wire form of an import (`encode_import`): a 4-byte big-endian header length, the JSON header
(`Request.to_wire` plus `kv`: dtype and shape), then the raw K and V bytes.

A frozen request nobody commits or resumes (the router died mid-migration) is resumed after FROZEN_TIMEOUT_S
(`expire_frozen`).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.engine import Engine, RequestError
from piggyback_runtime.request import Request, RequestOutput, RequestStatus
from piggyback_runtime.sampling import request_seed

log = logging.getLogger(__name__)

FINISH_MIGRATED = "migrated"  # the source's stream ends so: the request goes on elsewhere
FROZEN_TIMEOUT_S = 30.0  # a frozen request nobody commits or resumes is resumed (the router died)
_HEADER_LEN = struct.Struct(">I")


class MigrationRefused(Exception):
    """The request cannot be exported or imported now (unknown, not in decode, no room); HTTP 409."""


class NotBetweenSteps(MigrationRefused):
    """The request is mid-token (a BE token walking the layers, or still prefilling): try again shortly."""


@dataclass
class Frozen:
    request: Request
    on_host_path: bool
    be_row: Any  # the BE row taken off the CPU path (piggyback.be_path.BERow), None for accelerator requests
    frozen_s: float


# --- on the engine thread -------------------------------------------------------------------------------------
def _positions(blocks: list[int], num_tokens: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, offset) of every position in [0, num_tokens)."""
    positions = torch.arange(num_tokens)
    table = torch.tensor(blocks, dtype=torch.long)
    return table[positions // block_size], positions % block_size


def _cache_and_blocks(engine: Engine, request_id: str, on_host_path: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     list[int], int]:  # fmt: skip
    if on_host_path:
        pb = engine.runner.piggyback
        assert pb is not None
        return pb.buffers.key_cache, pb.buffers.value_cache, pb.host_kv.blocks_of(request_id), pb.block_size
    cache = engine.runner.kv_cache
    return cache.key, cache.value, engine.allocator.blocks_of(request_id), cache.block_size


def _refuse_under_tensor_parallelism(engine: Engine) -> None:
    # Each rank holds its KV heads, and the other ranks' state follows rank 0's plans: not moved (yet).
    if engine.ranks is not None:
        raise MigrationRefused("live migration is not supported under tensor parallelism "
                               "(engine.tensor_parallel_size > 1)")  # fmt: skip


class Migrator:
    """Freeze / export / commit / resume on the source and import on the target; methods run on the engine
    thread (through AsyncEngine.call), so they see the engine between two iterations, never inside one."""

    def __init__(self, engine: Engine, metrics: m.RuntimeMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.frozen: dict[str, Frozen] = {}

    def export(self, request_id: str) -> tuple[dict[str, Any], bytes]:
        """Freeze the request (it stops being scheduled, keeps its KV) and return its header and KV bytes."""
        engine = self.engine
        _refuse_under_tensor_parallelism(engine)
        request = engine.requests.get(request_id)
        if request is None or request_id in self.frozen:
            raise MigrationRefused(f"request {request_id!r} is not running here")
        on_host_path = engine.planner.on_host_path(request)
        be_row = None
        if on_host_path:
            pb = engine.runner.piggyback
            be_row = pb.rows.get(request_id) if pb is not None else None
            # Only between tokens (the row waits to enter layer 0): no CPU task of it is in flight.
            if be_row is None or be_row.state != "enter" or be_row.released:
                raise NotBetweenSteps(f"request {request_id!r} is not between two decode steps; retry")
            assert pb is not None
            if pb.on_remote_node(be_row):
                raise MigrationRefused(f"request {request_id!r} keeps its KV on a remote attention node; "
                                       "only host or accelerator KV migrates")  # fmt: skip
            del pb.rows[request_id]
        else:
            if request not in engine.scheduler.running or not request.in_decode:
                raise NotBetweenSteps(f"request {request_id!r} is not decoding (still prefilling); retry")
            engine.scheduler.running.remove(request)
        request_seed(request)  # an unseeded request gets its seed now, so it travels with it
        # On the CPU path the row's position counts the computed tokens (the request's counter stays at its
        # value from when it left the accelerator).
        num_computed = be_row.position if be_row is not None else request.num_computed_tokens
        key, value, blocks, block_size = _cache_and_blocks(engine, request_id, on_host_path)
        block_index, offset = _positions(blocks, num_computed, block_size)
        key_rows = key[:, block_index, offset].contiguous().cpu()  # [layers, tokens, heads, dim]
        value_rows = value[:, block_index, offset].contiguous().cpu()
        self.frozen[request_id] = Frozen(request, on_host_path, be_row, time.monotonic())
        header = request.to_wire(num_computed, now_s=time.monotonic())
        header["kv"] = {"dtype": str(key_rows.dtype).removeprefix("torch."), "shape": list(key_rows.shape)}
        payload = _tensor_bytes(key_rows) + _tensor_bytes(value_rows)
        return header, payload

    def resume(self, request_id: str) -> bool:
        """Put a frozen request back where it was (the migration failed); False if it is no longer frozen."""
        frozen = self.frozen.pop(request_id, None)
        if frozen is None:
            return False
        if request_id not in self.engine.requests:  # aborted while frozen (client gone): its KV is freed
            self._forget_row(frozen)
            return False
        if frozen.on_host_path:
            pb = self.engine.runner.piggyback
            assert pb is not None
            pb.rows[request_id] = frozen.be_row
        else:
            frozen.request.status = RequestStatus.RUNNING
            self.engine.scheduler.running.append(frozen.request)
        return True

    def commit(self, request_id: str) -> RequestOutput | None:
        """The target holds the request now: free its KV here and end its stream here with FINISH_MIGRATED."""
        frozen = self.frozen.pop(request_id, None)
        if frozen is None:
            return None
        engine = self.engine
        if request_id not in engine.requests:  # aborted while frozen; the target's copy expires unclaimed
            self._forget_row(frozen)
            return None
        request = frozen.request
        if frozen.on_host_path:
            pb = engine.runner.piggyback
            assert pb is not None
            pb._free(frozen.be_row)
        else:
            engine.allocator.free(request_id)
        engine.requests.pop(request_id, None)
        request.status = RequestStatus.FINISHED
        request.finish_reason = FINISH_MIGRATED
        engine.refresh_gauges()
        return RequestOutput(request_id, [], "", True, FINISH_MIGRATED, num_prompt_tokens=len(request.prompt_token_ids),
                             num_output_tokens=len(request.output_token_ids))  # fmt: skip

    def _forget_row(self, frozen: Frozen) -> None:
        """An aborted frozen BE request: the engine freed its host KV, but its row still held the slot."""
        pb = self.engine.runner.piggyback
        if frozen.be_row is not None and pb is not None:
            pb.row_by_slot.pop(frozen.be_row.slot, None)
            pb.pool.forget(frozen.be_row.worker, frozen.be_row.slot)

    def expire_frozen(self) -> list[str]:
        now = time.monotonic()
        stale = [rid for rid, f in self.frozen.items() if now - f.frozen_s > FROZEN_TIMEOUT_S]
        for rid in stale:
            log.warning("request %s was frozen for migration for over %.0f s: resuming it here", rid, FROZEN_TIMEOUT_S)
            self.resume(rid)
        return stale

    def import_request(self, header: dict[str, Any], payload: bytes) -> Request:
        """Take a request exported by another runtime; its next step is a decode step on this one."""
        engine = self.engine
        _refuse_under_tensor_parallelism(engine)
        try:
            request = Request.from_wire(header, now_s=time.monotonic())
            dtype = getattr(torch, header["kv"]["dtype"])
            shape = tuple(header["kv"]["shape"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RequestError(f"malformed migration header: {exc}") from None
        if request.request_id in engine.requests:
            raise MigrationRefused(f"request {request.request_id!r} already runs here")
        engine.validate(request)  # service hosted here, fits this runtime's caches
        num_tokens = request.num_computed_tokens
        if request.num_tokens - num_tokens != 1 or not request.output_token_ids:
            raise RequestError("only a request in decode (all but its newest token computed) can be imported")
        key_rows, value_rows = _tensors_from(payload, dtype, shape)
        if shape[0] != engine.arch.num_hidden_layers or shape[1] != num_tokens:
            raise RequestError(f"KV shape {list(shape)} does not fit this model and request")
        on_host_path = engine.planner.on_host_path(request)
        if on_host_path:
            pb = engine.runner.piggyback
            assert pb is not None and engine.planner.host_kv is not None
            reserved_tokens = request.max_num_tokens
            if not engine.planner.host_kv.reserve(request.request_id, reserved_tokens):
                raise MigrationRefused("no host KV memory or BE slot free for this request")
        else:
            allocator = engine.allocator
            if not allocator.can_hold(request.request_id, num_tokens + 1):
                raise MigrationRefused(f"no room for {num_tokens + 1} tokens of accelerator KV")
            allocator.ensure(request.request_id, num_tokens + 1)
        key, value, blocks, block_size = _cache_and_blocks(engine, request.request_id, on_host_path)
        block_index, offset = _positions(blocks, num_tokens, block_size)
        key[:, block_index, offset] = key_rows.to(key.device, key.dtype)
        value[:, block_index, offset] = value_rows.to(value.device, value.dtype)
        engine.requests[request.request_id] = request
        request.status = RequestStatus.RUNNING
        if on_host_path:
            assert engine.runner.piggyback is not None
            engine.runner.piggyback.start_decode(request)
        else:
            engine.scheduler.running.append(request)
        return request


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _tensors_from(payload: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    element = torch.empty((), dtype=dtype).element_size()
    size = element
    for dim in shape:
        size *= dim
    if len(payload) != 2 * size:
        raise RequestError(f"KV payload has {len(payload)} bytes; header promises {2 * size}")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return raw[:size].view(dtype).reshape(shape), raw[size:].view(dtype).reshape(shape)


def encode_import(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return _HEADER_LEN.pack(len(head)) + head + payload


def decode_import(body: bytes) -> tuple[dict[str, Any], bytes]:
    if len(body) < _HEADER_LEN.size:
        raise RequestError("import body too short")
    (length,) = _HEADER_LEN.unpack_from(body)
    try:
        header = json.loads(body[_HEADER_LEN.size : _HEADER_LEN.size + length])
    except ValueError as exc:
        raise RequestError(f"import header is not JSON: {exc}") from None
    return header, body[_HEADER_LEN.size + length :]
