"""Suite-wide fixtures and policy. `make_runtime_config` (tests/runtime/configs.py) serves every test
directory. No test reads or writes the user's home caches (see tests/home_caches.py).

At start the session points the latency-profile cache at a fresh temporary directory and the kernel build
caches at a per-user directory in the system temp dir (environment variables, so `piggyback serve`
subprocesses inherit them). The session fails if this process opened, wrote or removed anything under the
real home caches (an audit hook); what changed there meanwhile by any process is reported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.home_caches import (
    HOME_CACHE_DIRS,
    HomeCacheAudit,
    changes,
    redirected_environment,
    shared_build_cache_dir,
    snapshot,
)
from tests.runtime.configs import make_runtime_config  # noqa: F401  (a fixture: pytest finds it here)

REAL_HOME = Path.home()  # before any test changes HOME
_saved_env: dict[str, str | None] = {}
_home_before: dict[Path, dict[str, tuple[int, int]]] = {}
_profile_dir: list[Path] = []
_audit = HomeCacheAudit([REAL_HOME / relative for relative in HOME_CACHE_DIRS])
_TOUCHED = pytest.StashKey[list[str]]()
_CHANGED = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    profile_dir = Path(tempfile.mkdtemp(prefix="piggyback-test-profiles-"))
    _profile_dir.append(profile_dir)
    build_dir = shared_build_cache_dir()
    build_dir.mkdir(mode=0o700, exist_ok=True)
    for name, value in redirected_environment(profile_dir, build_dir).items():
        _saved_env[name] = os.environ.get(name)
        os.environ[name] = value
    for relative in HOME_CACHE_DIRS:
        _home_before[REAL_HOME / relative] = snapshot(REAL_HOME / relative)
    _audit.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _audit.enabled = False
    session.config.stash[_CHANGED] = [
        line for root, before in _home_before.items() for line in changes(before, snapshot(root))
    ]
    if _audit.touched:
        session.config.stash[_TOUCHED] = list(_audit.touched)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    touched = terminalreporter.config.stash.get(_TOUCHED, [])
    if touched:
        terminalreporter.section("a test used the user's home cache", sep="!", red=True, bold=True)
        terminalreporter.write_line("This test process opened or wrote files under the home caches instead of "
                                    "its temporary ones (tests/home_caches.py); the session fails:")  # fmt: skip
        for line in dict.fromkeys(touched[:200]):
            terminalreporter.write_line(f"  {line}")
    changed = terminalreporter.config.stash.get(_CHANGED, [])
    if changed and not touched:
        terminalreporter.section("the user's home cache changed during the run", sep="-", yellow=True)
        terminalreporter.write_line("Not by this process; by a subprocess of a test, or by another program on this "
                                    "machine (a runtime, another checkout's tests):")  # fmt: skip
        for line in changed[:50]:
            terminalreporter.write_line(f"  {line}")


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for profile_dir in _profile_dir:
        shutil.rmtree(profile_dir, ignore_errors=True)
