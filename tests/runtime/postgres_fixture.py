"""A real Postgres server for a test: Debian's `postgresql` package, a fresh cluster in a temp dir, on a free
port, stopped afterwards. Postgres refuses to run as root, so as root the cluster runs as the `postgres` user
the package creates. Without the package the test fails (it does not skip) and names the install step."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from piggyback_runtime.client import free_port

INSTALL_STEP = ("Postgres is not installed: run `apt-get install -y postgresql` (Debian/Ubuntu; `make setup` does it "
                "as root), which provides initdb and pg_ctl under /usr/lib/postgresql/<version>/bin")  # fmt: skip


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path is None:
        pytest.fail(INSTALL_STEP)
    return Path(on_path).parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throwaway Postgres; yields its SQLAlchemy asyncpg URL."""
    bin_dir = postgres_bin()
    # Its own temp dir (pytest's are private to the test user, and the server may run as another one).
    workdir = Path(tempfile.mkdtemp(prefix="piggyback-test-pg-"))
    data, sockets = workdir / "pgdata", workdir / "pgsock"
    sockets.mkdir(parents=True)
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(workdir, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()

    def run(*args: str) -> None:
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            pytest.fail(f"{args[0]} failed ({result.returncode}): {result.stdout}{result.stderr}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(workdir / "postgres.log"), "-w", "-t", "60", "-o",
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")  # fmt: skip
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(workdir, ignore_errors=True)
