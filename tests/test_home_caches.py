"""The test suite never reads or writes the user's home caches (tests/conftest.py, tests/home_caches.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.scheduler.latency_model import default_profile_dir
from tests.home_caches import HomeCacheAudit, changes, snapshot

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_cache_the_runtime_writes_points_outside_the_home_directory_during_tests() -> None:
    home = Path.home().resolve()
    caches = {
        "latency profile": default_profile_dir(),
        "CPU-attention kernel build": cpu_attention._cache_root(),
        "Triton kernel cache": Path(os.environ["TRITON_CACHE_DIR"]),
    }
    for what, path in caches.items():
        assert not path.resolve().is_relative_to(home), f"{what} cache {path} is under the home directory {home}"


def test_a_file_created_changed_or_removed_under_a_cache_is_reported(tmp_path: Path) -> None:
    (tmp_path / "kept").write_text("a")
    (tmp_path / "edited").write_text("a")
    (tmp_path / "deleted").write_text("a")
    before = snapshot(tmp_path)
    assert changes(before, snapshot(tmp_path)) == []
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "new.json").write_text("{}")
    (tmp_path / "edited").write_text("longer")
    (tmp_path / "deleted").unlink()
    assert changes(before, snapshot(tmp_path)) == [
        f"created {tmp_path / 'sub' / 'new.json'}",
        f"removed {tmp_path / 'deleted'}",
        f"changed {tmp_path / 'edited'}",
    ]
    assert snapshot(tmp_path / "missing") == {}


def _run_inner_session(tmp_path: Path, test_body: str) -> subprocess.CompletedProcess[str]:
    """A pytest session under this suite's conftest, in a scratch project whose home is `tmp_path/home`."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (project / "test_inner.py").write_text(f"from pathlib import Path\n\n\ndef test_inner():\n{test_body}\n")
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
def test_a_session_in_which_a_test_writes_to_the_home_cache_fails_and_names_the_file(tmp_path: Path) -> None:
    written = tmp_path / "home" / ".cache" / "piggyback" / "profiles" / "profile-x.json"
    run = _run_inner_session(tmp_path, f"    Path({str(written)!r}).parent.mkdir(parents=True)\n"
                                       f"    Path({str(written)!r}).write_text('{{}}')")  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed" in run.stdout  # the test itself passed: the session failed because of what it wrote
    assert f"open {written}" in run.stdout


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
def test_a_session_that_leaves_the_home_cache_alone_passes(tmp_path: Path) -> None:
    run = _run_inner_session(tmp_path, "    assert Path.home().name == 'home'")
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_audit_records_reads_writes_and_removals_under_its_roots_only(tmp_path: Path) -> None:
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir()
    elsewhere.mkdir()
    audit = HomeCacheAudit([cache])
    audit.install()
    try:
        (elsewhere / "x").write_text("a")
        assert audit.touched == []
        (cache / "profile.json").write_text("{}")
        (cache / "profile.json").read_text()
        os.replace(cache / "profile.json", elsewhere / "moved.json")
        (cache / "sub").mkdir()
    finally:
        audit.enabled = False
    assert audit.touched == [
        f"open {cache / 'profile.json'}",
        f"open {cache / 'profile.json'}",
        f"os.rename {cache / 'profile.json'}",  # os.replace audits as os.rename
        f"os.mkdir {cache / 'sub'}",
    ]
