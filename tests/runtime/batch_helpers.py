"""Builders shared by the Batch API tests: runtime configs with the Batch API on, JSONL input files, and
readers of the batch database (to count how often each line ran)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from piggyback_runtime.attention.cpu_attention import ENV_BACKEND
from piggyback_runtime.batch.store import SQLITE_FILE
from piggyback_runtime.config import RuntimeConfig
from tests.runtime.helpers import LS_SLO

# The runtimes these tests start use the pure-torch CPU attention: they test the batch machinery, and a first
# build of the native kernel on a busy machine would take longer than the whole test.
TORCH_ATTENTION = (ENV_BACKEND, "torch")


def batch_config(port: int, batch: dict[str, Any], max_be_requests: int = 64) -> RuntimeConfig:
    """A tiny synthetic model on the CPU hosting an LS service `chat` and BE services `bulk` and `bulk2`."""
    return RuntimeConfig.from_dict({
        "model": {"uri": "synthetic://tiny-llama", "max_model_len": 256},
        "device": "cpu",
        "services": [{"name": "chat", "class": "LS", "slo": LS_SLO}, {"name": "bulk", "class": "BE"},
                     {"name": "bulk2", "class": "BE"}],
        "engine": {"block_size": 8, "num_kv_blocks": 512, "max_num_batched_tokens": 256, "policy": "priority",
                   "max_num_seqs": 128},
        "piggyback": {"max_be_requests": max_be_requests},
        "slo_control": {"enabled": False},
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 2},
        "batch": {"enabled": True, **batch},
    })  # fmt: skip


def chat_line(custom_id: str, model: str = "bulk", max_tokens: int = 2, **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"say {custom_id}"}],
                     "max_tokens": max_tokens, "temperature": 0, **extra}}  # fmt: skip


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def parse_jsonl(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.decode().splitlines() if line]


def sqlite_lines(directory: Path, batch_id: str) -> list[sqlite3.Row]:
    """The batch's line rows, read straight from the SQLite file (a reader, not the runtime)."""
    connection = sqlite3.connect(directory / SQLITE_FILE)
    connection.row_factory = sqlite3.Row
    try:
        return list(connection.execute("SELECT * FROM batch_lines WHERE batch_id = ? ORDER BY line_no", (batch_id,)))
    finally:
        connection.close()
