"""The per-layer stream between the engine and one remote attention node: length-prefixed binary frames.

A frame is a small JSON header (the message kind, its integers, and the dtype and shape of each tensor) followed
by the tensors' raw bytes, back to back:

    u32 header length | u64 payload length | header (UTF-8 JSON) | payload

No pickle: whatever reaches the node's port can only be parsed, never executed, and the first frame on a
connection must carry the token the engine gave the actor through Ray (see node.py).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import torch

_PREFIX = struct.Struct("!IQ")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 34

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64,
    "int32": torch.int32,
}  # fmt: skip
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class WireError(ConnectionError):
    """The peer sent something that is not a frame of this protocol (or closed the stream mid-frame)."""


def encode(header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> list[memoryview | bytes]:  # type: ignore[assignment]
    """The frame as a list of buffers for one `sendmsg`/`sendall` each (no copy of the tensor bytes)."""
    parts: list[memoryview | bytes] = []
    specs = []
    payload = 0
    for tensor in tensors:
        flat = tensor.detach().contiguous()
        specs.append([_NAMES[flat.dtype], list(flat.shape)])
        raw = memoryview(flat.view(torch.uint8).numpy()).cast("B") if flat.numel() else memoryview(b"")
        payload += raw.nbytes
        parts.append(raw)
    head = json.dumps({**header, "tensors": specs}, separators=(",", ":")).encode()
    return [_PREFIX.pack(len(head), payload), head, *parts]


def send(sock: socket.socket, header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> int:  # type: ignore[assignment]
    """Send one frame; returns the bytes it took on the wire."""
    parts = encode(header, tensors)
    total = 0
    for part in parts:
        sock.sendall(part)
        total += len(part) if isinstance(part, bytes) else part.nbytes
    return total


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise WireError("the stream closed mid-frame" if got else "the stream closed")
        got += n
    return buffer


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[torch.Tensor], int]:
    """Receive one frame: its header, its tensors (owning their memory), and the bytes it took on the wire."""
    head_len, payload_len = _PREFIX.unpack(_recv_exactly(sock, _PREFIX.size))
    if head_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise WireError(f"frame too large (header {head_len} B, payload {payload_len} B): not this protocol")
    try:
        header = json.loads(_recv_exactly(sock, head_len))
        specs = header.pop("tensors")
    except (ValueError, KeyError) as exc:
        raise WireError(f"bad frame header: {exc}") from None
    payload = _recv_exactly(sock, payload_len) if payload_len else bytearray()
    tensors: list[torch.Tensor] = []
    offset = 0
    for name, shape in specs:
        dtype = _DTYPES.get(name)
        if dtype is None:
            raise WireError(f"unknown dtype {name!r} in a frame")
        count = 1
        for extent in shape:
            count *= int(extent)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > payload_len:
            raise WireError("frame payload shorter than its tensors")
        chunk = (torch.frombuffer(payload, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes
                 else torch.empty(0, dtype=torch.uint8))  # fmt: skip
        tensors.append(chunk.view(dtype).reshape(shape))
        offset += nbytes
    return header, tensors, _PREFIX.size + head_len + payload_len
