"""Every Triton attention kernel configuration the runtime launches compiles for sm_80 and sm_90, in bf16 and fp16,
without spilling registers and within the shared memory a block may have (benchmarks/triton_aot.py, no GPU).

This is where bf16 is covered (the interpreter's bf16 dot is wrong) and where what the interpreter accepts but
the compiler does not (globals, layouts, lowering) shows up. Compiled results are cached for the session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import triton_aot

pytestmark = pytest.mark.slow  # compiles every kernel configuration for two GPU generations

if not Path(triton_aot._cuobjdump()).exists():
    pytest.skip("triton's bundled CUDA tools are missing", allow_module_level=True)
if triton_aot.tp._INTERPRETED:
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions, not compilable", allow_module_level=True)

TARGETS = [
    (config, arch, dtype) for config in triton_aot.CONFIGS for arch in triton_aot.ARCHES for dtype in triton_aot.DTYPES
]


@pytest.mark.parametrize(
    ("config", "arch", "dtype"), TARGETS, ids=[f"{c.name}-sm{a}-{d}".replace(" ", "_") for c, a, d in TARGETS]
)
def test_kernel_compiles_within_budget(config: triton_aot.KernelConfig, arch: int, dtype: str) -> None:
    report = triton_aot.compile_config(config, arch, dtype)
    assert report.registers > 0
    assert not report.problems(), f"{config.name} on sm_{arch} {dtype}: {report.problems()}"


def test_compile_report_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The table of registers, spills and shared memory per configuration (shown with -s or -rP)."""
    reports = triton_aot.compile_all()
    table = triton_aot.markdown_table(reports)
    with capsys.disabled():
        print("\n" + table)
    assert table.count("\n") == len(reports) + 1
    assert all(f"sm_{arch}" in table for arch in triton_aot.ARCHES)


def test_budget_checks_name_what_is_over() -> None:
    """The checks that fail a configuration: spills, shared memory over the per-block limit, too many registers."""
    fine = triton_aot.CompileReport("k", 80, "bf16", 4, 128, 0, 160 * 1024, 1.0)
    assert fine.problems() == []
    spilling = triton_aot.CompileReport("k", 90, "bf16", 4, 255, 216, 1024, 1.0)
    assert "spills" in spilling.problems()[0]
    # 200 KiB fits an H100 block (227 KiB) but not an A100 one (163 KiB)
    assert triton_aot.CompileReport("k", 90, "fp16", 4, 64, 0, 200 * 1024, 1.0).problems() == []
    assert "shared memory" in triton_aot.CompileReport("k", 80, "fp16", 4, 64, 0, 200 * 1024, 1.0).problems()[0]
    assert "registers" in triton_aot.CompileReport("k", 80, "fp16", 16, 255, 0, 0, 1.0).problems()[0]
