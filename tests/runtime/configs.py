"""One builder for the runtime configs tests write: what every test shares, and only what a test sets besides.

`runtime_config(policy="piggyback", engine={"block_size": 16}, server={"port": port})` is a tiny model
(synthetic://tiny-llama) on the CPU serving `chat` (LS, an SLO no test run misses) and `batch` (BE); each
keyword section is merged over that base, field by field, and validated as the runtime validates its file.
Light on purpose (no torch): planner and config tests import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from piggyback_runtime.config import RuntimeConfig

TINY_MODEL = "synthetic://tiny-llama"
LS_SLO = {"ttft_ms": 60_000, "tpot_ms": 60_000}  # generous: a loaded 2-core machine must not miss it
CHAT_AND_BATCH: tuple[dict[str, Any], ...] = (
    {"name": "chat", "class": "LS", "slo": LS_SLO},
    {"name": "batch", "class": "BE"},
)


def runtime_config_dict(
    *,
    uri: str = TINY_MODEL,
    device: str | None = "cpu",
    services: Sequence[dict[str, Any]] = CHAT_AND_BATCH,
    policy: str | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """The config file's contents. `device=None` leaves the device to the runtime's default; `policy` is
    engine.policy; every other keyword is a top-level section (model, engine, piggyback, slo_control,
    server, metrics, ...) whose fields override the base's."""
    data: dict[str, Any] = {"model": {"uri": uri}, "services": [dict(s) for s in services]}
    if device is not None:
        data["device"] = device
    for section, fields in sections.items():
        data[section] = {**data.get(section, {}), **fields}
    if policy is not None:
        data["engine"] = {**data.get("engine", {}), "policy": policy}
    return data


def runtime_config(
    *,
    uri: str = TINY_MODEL,
    device: str | None = "cpu",
    services: Sequence[dict[str, Any]] = CHAT_AND_BATCH,
    policy: str | None = None,
    **sections: dict[str, Any],
) -> RuntimeConfig:
    """`runtime_config_dict(...)`, validated."""
    return RuntimeConfig.from_dict(
        runtime_config_dict(uri=uri, device=device, services=services, policy=policy, **sections)
    )


@pytest.fixture
def make_runtime_config() -> Callable[..., RuntimeConfig]:
    """The builder as a fixture, for tests that prefer to ask for it: `make_runtime_config(policy=...)`."""
    return runtime_config
