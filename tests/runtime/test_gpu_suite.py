"""benchmarks/gpu_suite.py runs end to end on this CPU with tiny shapes, so that it is known to work before it
first meets a GPU: every section passes, the report and plot are written to a temporary directory, and nothing
lands in benchmarks/results/gpu/ (which holds GPU results only)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the GPU suite script as a process

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
RESULTS_GPU = ROOT / "benchmarks" / "results" / "gpu"


def _listing(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def test_the_suite_runs_every_section_on_cpu_with_tiny_shapes_and_reports_outside_the_gpu_results(
    tmp_path: Path,
) -> None:
    before = _listing(RESULTS_GPU)
    env = {**os.environ, "PIGGYBACK_PROFILE_DIR": str(tmp_path / "profiles"), "TRITON_INTERPRET": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    done = subprocess.run([sys.executable, str(SUITE)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    for section in ("profile", "sync", "kernels", "throughput", "policies", "interference"):
        assert re.search(rf"^\[ok\] {section} ", done.stdout, re.MULTILINE), (section, output[-4000:])
    report = Path(re.findall(r"^report: (.+)$", done.stdout, re.MULTILINE)[-1])
    assert RESULTS_GPU not in report.parents  # a CPU run never writes GPU results
    text = report.read_text()
    assert text.startswith("# GPU suite: CPU ") and "synthetic://small-llama" in text
    assert "| interference | ok |" in text and "## kernels" in text and "fixed cost per iteration" in text
    assert report.with_suffix(".png").stat().st_size > 0
    assert _listing(RESULTS_GPU) == before


def test_an_unknown_section_is_refused_with_the_list_of_sections() -> None:
    sys.path.insert(0, str(SUITE.parent))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(SUITE.parent))
    with pytest.raises(SystemExit) as info:
        gpu_suite.main(["--sections", "sync,warp-drive"])
    assert info.value.code == 2
