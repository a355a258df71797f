"""The remote node's frames and its attention, in-process (no server, no Ray): what goes over the wire comes
back bit-exact, and a node's `run` gives the same output as attention over the row's whole context, with the
log-sum-exp when asked. A stranger without the token is refused."""

from __future__ import annotations

import socket

import pytest
import torch

from piggyback_runtime.piggyback.remote import wire
from piggyback_runtime.piggyback.remote.node import NodeState

LAYOUT = {"layers": 2, "kv_heads": 2, "q_heads": 4, "head_dim": 16, "block_size": 8, "dtype": "float32",
          "scale": 0.25, "threads": 1, "kv_bytes": 1 << 20}  # fmt: skip


def test_frames_carry_tensors_of_every_dtype_exactly() -> None:
    left, right = socket.socketpair()
    with left, right:
        tensors = [torch.randn(3, 4), torch.randn(2, 5).bfloat16(), torch.arange(7), torch.empty(0, 3)]
        sent = wire.send(left, {"kind": "run", "rows": [[1, 2, 3]]}, tensors)
        header, got, size = wire.recv(right)
    assert header == {"kind": "run", "rows": [[1, 2, 3]]} and size == sent
    for a, b in zip(tensors, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_a_frame_that_is_not_this_protocol_is_refused() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 16)
        with pytest.raises(wire.WireError):
            wire.recv(right)


def test_the_node_needs_the_engine_s_token() -> None:
    with pytest.raises(PermissionError):
        NodeState("secret").hello({"kind": "hello", "token": "guess", **LAYOUT})


def test_a_node_run_is_attention_over_the_whole_context_with_its_log_sum_exp() -> None:
    torch.manual_seed(0)
    node = NodeState("t")
    assert node.hello({"kind": "hello", "token": "t", **LAYOUT})["blocks"] > 0
    context = 19  # prefill tokens on the node before the decode step
    keys = torch.randn(context + 1, 2, 16)
    values = torch.randn(context + 1, 2, 16)
    node.handle({"kind": "register", "slot": 5, "gen": 0, "blocks": 3}, [])
    node.handle({"kind": "kv", "slot": 5, "layer": 1, "tokens": context}, [keys[:context], values[:context]])
    q = torch.randn(1, 4, 16)
    reply = node.handle({"kind": "run", "layer": 1, "rows": [[5, context, 7]], "lse": True},
                        [q, keys[context:], values[context:]])  # fmt: skip
    assert reply is not None
    header, (out, lse) = reply
    assert header["kind"] == "done" and header["rows"] == [[5, 7]]
    # Reference: plain attention, q head h reads kv head h // 2.
    kv_of = torch.arange(4) // 2
    scores = torch.einsum("hd,nhd->hn", q[0], keys[:, kv_of]) * 0.25
    expected = torch.einsum("hn,nhd->hd", scores.softmax(-1), values[:, kv_of])
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[0], torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    # Forgetting the request frees its blocks.
    free = len(node.free_blocks)
    node.handle({"kind": "forget", "slot": 5}, [])
    assert len(node.free_blocks) == free + 3 and not node.tables


def test_a_node_out_of_kv_says_so_for_that_request() -> None:
    node = NodeState("t")
    blocks = node.hello({"kind": "hello", "token": "t", **LAYOUT})["blocks"]
    reply = node.handle({"kind": "register", "slot": 1, "gen": 0, "blocks": blocks + 1}, [])
    assert reply is not None and reply[0]["kind"] == "error" and "KV full" in reply[0]["message"]
    assert reply[0]["rows"] == [[1, 0]] and not node.tables
