"""Keeping the test suite out of the user's home caches (used by tests/conftest.py).

The runtime writes two caches under the home directory: the latency profile (~/.cache/piggyback/profiles,
$PIGGYBACK_PROFILE_DIR) and the native CPU-attention kernel build (~/.cache/piggyback/cpu_attention,
$XDG_CACHE_HOME); Triton's kernel cache (~/.triton/cache, $TRITON_CACHE_DIR) is the third on a GPU. A test
that reads a profile measured hours ago by another process, or leaves one behind for the user's runtime, is
a test of the machine's history. So a test session points them elsewhere:

- the latency profile: a fresh directory per session (profiles are per machine load; a session profiles
  each model once and every later engine start probes that profile, see profiler.load_or_profile);
- kernel builds (XDG_CACHE_HOME, TRITON_CACHE_DIR): one directory per user in the system temp dir, kept
  between sessions, because the kernel build takes 4-15 s on 2 shared cores and its directory is keyed by
  the source, flags and torch version (reuse is exact, never stale).

`HomeCacheAudit` (a Python audit hook) records every file this test process opens, creates, renames or
removes under the real home caches: the session fails on any. `snapshot` and `changes` also compare the home
caches before and after the session; that is only reported, since any process on the machine (a runtime the
user started, another checkout's tests) may have written there.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Under the user's home: what the runtime would fill without the redirect.
HOME_CACHE_DIRS: tuple[str, ...] = (".cache/piggyback", ".triton/cache")
# The variables the redirect sets; each names a directory the runtime or a library it uses writes to.
PROFILE_DIR_ENV = "PIGGYBACK_PROFILE_DIR"
BUILD_CACHE_ENVS: tuple[str, ...] = ("XDG_CACHE_HOME", "TRITON_CACHE_DIR")

Snapshot = dict[str, tuple[int, int]]  # path -> (size in bytes, mtime in ns)


def shared_build_cache_dir() -> Path:
    """Where test sessions keep kernel builds: per user, outside the home directory, reused between runs."""
    return Path(tempfile.gettempdir()) / f"piggyback-test-cache-{os.getuid()}"


def redirected_environment(profile_dir: Path, build_dir: Path) -> dict[str, str]:
    """The environment variables that keep the runtime's caches out of the home directory."""
    return {
        PROFILE_DIR_ENV: str(profile_dir),
        "XDG_CACHE_HOME": str(build_dir / "xdg"),
        "TRITON_CACHE_DIR": str(build_dir / "triton"),
    }


def snapshot(root: Path) -> Snapshot:
    """Every file under `root` (recursively) with its size and modification time; {} if there is no root."""
    found: Snapshot = {}
    if not root.is_dir():
        return found
    for path in root.rglob("*"):
        try:
            stat = path.lstat()
        except OSError:  # removed while walking
            continue
        if not path.is_dir():
            found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """Files created, changed or removed between two snapshots, one line each (empty: untouched)."""
    lines = [f"created {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines


# Audit events that name a path this process touches: (event, index of the path argument(s)).
_PATH_EVENTS: dict[str, tuple[int, ...]] = {
    "open": (0,),
    "os.mkdir": (0,),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.rename": (0, 1),  # os.rename and os.replace
    "os.truncate": (0,),
    "os.utime": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (0, 1),
    "shutil.move": (0, 1),
}


class HomeCacheAudit:
    """Records what this process does under `roots` (reads included: a test that reads a stale profile from
    the home cache is the bug this guards against). Installed once per process with sys.addaudithook (audit
    hooks cannot be removed); `enabled` switches it off."""

    def __init__(self, roots: list[Path]) -> None:
        self.prefixes = tuple(f"{os.path.realpath(root)}{os.sep}" for root in roots)
        self.touched: list[str] = []
        self.enabled = True

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        positions = _PATH_EVENTS.get(event)
        if positions is None or not self.enabled:
            return
        for position in positions:
            path = args[position] if position < len(args) else None
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            elif isinstance(path, os.PathLike):
                path = os.fspath(path)
            if isinstance(path, str) and os.path.isabs(path):
                resolved = f"{os.path.realpath(path)}{os.sep}"
                if resolved.startswith(self.prefixes):
                    self.touched.append(f"{event} {path}")
