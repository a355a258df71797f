"""Suite-wide fixtures: `make_runtime_config` (tests/runtime/configs.py) for every test directory."""

from __future__ import annotations

from tests.runtime.configs import make_runtime_config  # noqa: F401  (a fixture: pytest finds it here)
