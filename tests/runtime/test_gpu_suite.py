"""benchmarks/gpu_suite.py runs end to end on this CPU with tiny shapes, so that it is known to work before it
first meets a GPU: every section passes, the report and plot are written to a temporary directory, and nothing
lands in benchmarks/results/gpu/ (which holds GPU results only). Its exit status and report are checked with
sections that fail, fall back or are cut off."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
RESULTS_GPU = ROOT / "benchmarks" / "results" / "gpu"


def _listing(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


@pytest.mark.slow  # runs the GPU suite script as a process
@pytest.mark.timeout(1200)  # every section on this shared 2-core VM: several minutes
def test_the_suite_runs_every_section_on_cpu_with_tiny_shapes_and_reports_outside_the_gpu_results(
    tmp_path: Path,
) -> None:
    before = _listing(RESULTS_GPU)
    env = {**os.environ, "PIGGYBACK_PROFILE_DIR": str(tmp_path / "profiles"), "TRITON_INTERPRET": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    done = subprocess.run([sys.executable, str(SUITE)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    for section in ("profile", "sync", "kernels", "correctness", "graphs", "throughput", "policies", "interference"):
        assert re.search(rf"^\[ok\] {section} ", done.stdout, re.MULTILINE), (section, output[-4000:])
    report = Path(re.findall(r"^report: (.+)$", done.stdout, re.MULTILINE)[-1])
    assert RESULTS_GPU not in report.parents  # a CPU run never writes GPU results
    text = report.read_text()
    assert text.startswith("# GPU suite: CPU ") and "synthetic://small-llama" in text
    assert "| interference | ok |" in text and "## kernels" in text and "fixed cost per iteration" in text
    assert "allowed: ModelRunner._read_tokens" in text and "every section ok (exit 0)" in text
    assert "greedy fp32, 24 steps: 3 of 3 requests token-identical" in text
    assert "merged/step" in text  # graphs: with BE rows merging too (none merged would be a fallback, exit 3)
    assert report.with_suffix(".png").stat().st_size > 0
    assert _listing(RESULTS_GPU) == before


def _suite() -> Any:
    sys.path.insert(0, str(SUITE.parent))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(SUITE.parent))
    return gpu_suite


def test_an_unknown_section_is_refused_with_the_list_of_sections() -> None:
    with pytest.raises(SystemExit) as info:
        _suite().main(["--sections", "sync,warp-drive"])
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("outcomes", "code"),
    [(("ok", "ok"), 0), (("ok", "fallback"), 3), (("skipped", "ok"), 3), (("fallback", "failed"), 1),
     (("raises", "ok"), 1)],
)  # fmt: skip
def test_a_failure_exits_1_and_a_fallback_or_skip_exits_3_with_the_reason_in_the_report(
    outcomes: tuple[str, str], code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    suite = _suite()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main sets it when there is no CUDA; restored afterwards

    def runner(name: str, outcome: str) -> Any:
        def run(loaded: Any, scale: Any, out: Path) -> Any:
            if outcome == "raises":
                raise RuntimeError(f"{name} broke")
            return suite.Section(name, outcome, table=[f"{name} row"], note=f"{name} reason: {outcome}")

        return run

    monkeypatch.setitem(suite.RUNNERS, "sync", runner("sync", outcomes[0]))
    monkeypatch.setitem(suite.RUNNERS, "kernels", runner("kernels", outcomes[1]))
    assert suite.main(["--sections", "sync,kernels", "--out", str(tmp_path)]) == code
    report = next(tmp_path.glob("*.md")).read_text()
    printed = capsys.readouterr().out
    for name, outcome in zip(("sync", "kernels"), outcomes, strict=True):
        if outcome == "raises":
            assert f"| {name} | failed |" in report and f"RuntimeError: {name} broke" in report
        else:
            assert f"| {name} | {outcome} | " in report and f"{name} reason: {outcome}" in report
        if outcome != "ok":
            assert f"exit {code}: " in printed and f"{name} " in printed.split(f"exit {code}: ")[1]
    assert f"(exit {code})" in report


def test_each_section_writes_the_report_as_it_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run cut off during a section still leaves the sections before it, and names what did not run."""
    suite = _suite()
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def measured(loaded: Any, scale: Any, out: Path) -> Any:
        return suite.Section("sync", table=["measured before the cut"])

    def cut_off(loaded: Any, scale: Any, out: Path) -> Any:
        raise KeyboardInterrupt  # the borrowed GPU is taken back mid-section

    monkeypatch.setitem(suite.RUNNERS, "sync", measured)
    monkeypatch.setitem(suite.RUNNERS, "kernels", cut_off)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--sections", "sync,kernels,throughput", "--out", str(tmp_path)])
    report = next(tmp_path.glob("*.md")).read_text()
    assert "measured before the cut" in report and "| sync | ok |" in report
    assert "| kernels | not run yet |" in report and "| throughput | not run yet |" in report


def test_quick_runs_the_quick_sections_and_the_full_suite_every_section() -> None:
    suite = _suite()
    assert suite.QUICK_SECTIONS == ("profile", "sync", "kernels", "correctness", "throughput")
    assert set(suite.QUICK_SECTIONS) < set(suite.SECTIONS) == set(suite.RUNNERS)
    assert suite.QUICK_SCALE.model == suite.GPU_SCALE.model == "synthetic://llama-3-8b"
