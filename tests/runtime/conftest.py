"""Runtime test-suite policy: the native CPU attention kernel must build wherever it can.

A kernel that fails to compile must not turn its tests into skips and leave the suite green. Tests marked
to skip when the native kernel is unavailable (tests/runtime/test_cpu_attention.py) therefore:
- fail, with the build error, on a machine with a C++ compiler and a CPU the kernel supports;
- skip only where no compiler exists (the reason says how to install one), the CPU lacks AVX2/FMA/F16C,
  or PIGGYBACK_CPU_ATTENTION=torch deliberately selects the fallback.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from functools import cache

import pytest

from piggyback_runtime.attention import cpu_attention as ca

NATIVE_SKIP_REASON = "native CPU attention kernel unavailable"  # the reason test_cpu_attention.py skips with
INSTALL_COMPILER = (
    "no C++ compiler (set CXX or put c++ on PATH) to build the native CPU attention kernel; install one: "
    "`apt-get install g++` (Debian/Ubuntu), `dnf install gcc-c++` (Fedora/RHEL), `xcode-select --install` (macOS)"
)


@cache
def native_kernel_verdict() -> tuple[str, str] | None:
    """None if the native kernel is usable; ("skip", why) where it legitimately cannot be; ("fail", why) else."""
    if ca.native_available():
        return None
    if os.environ.get(ca.ENV_BACKEND, "").lower() == "torch":
        return "skip", f"{ca.ENV_BACKEND}=torch selects the pure-torch fallback"
    if ca.cxx_compiler() is None:
        return "skip", INSTALL_COMPILER
    if lacks := ca.cpu_lacks():
        return "skip", f"this CPU lacks {', '.join(lacks)}, which the native CPU attention kernel needs"
    return "fail", (
        f"the native CPU attention kernel did not build although a C++ compiler is present ({ca.cxx_compiler()}); "
        f"its tests would silently skip. Build error:\n{ca.native_build_error()}"
    )


def _skips_for_native_kernel(item: pytest.Item) -> bool:
    return any(NATIVE_SKIP_REASON in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (report.skipped and report.when == "setup" and _skips_for_native_kernel(item)):
        return
    verdict = native_kernel_verdict()
    if verdict is None:
        return
    kind, why = verdict
    if kind == "fail":  # a broken build is a failure of every test that needed it, not a skip
        report.outcome = "failed"
        report.longrepr = why
    elif isinstance(report.longrepr, tuple):  # keep the skip, with the reason that says what to do
        path, lineno, _ = report.longrepr
        report.longrepr = (path, lineno, f"Skipped: {why}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    verdict = native_kernel_verdict() if native_kernel_verdict.cache_info().currsize else None  # only if asked
    if verdict is not None and verdict[0] == "fail":
        terminalreporter.section("native CPU attention kernel", sep="!", red=True, bold=True)
        terminalreporter.write_line(verdict[1])
