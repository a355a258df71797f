"""Prometheus-backed checks skip where Prometheus is missing, saying how to install it; in CI they fail."""

from __future__ import annotations

import os

import pytest

from dashboards.live import missing_prometheus


@pytest.fixture(scope="session")
def prometheus_tools() -> None:
    reason = missing_prometheus()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Prometheus-backed checks: {reason}")
    pytest.skip(reason)
