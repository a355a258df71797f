"""The OpenAI Batch API: BE jobs submitted as JSONL files, run durably and exactly once, across replicas.

- files.py: input files, validated line by line at upload;
- schema.py: the database tables and their versioned migrations;
- store.py: batch and line state (SQLite in batch.directory, or a shared Postgres), leases, results;
- runner.py: one per replica; leases lines, runs them as BE requests, records results, writes output files;
- routes.py: /v1/files and /v1/batches.

`batch_extension` is what `piggyback serve` hands to `create_app` when `batch.enabled` is set: it registers the
routes, and opens the store and starts the runner with the app (closing them when it stops).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from fastapi import FastAPI

from piggyback_runtime.batch.routes import BatchService, register_routes
from piggyback_runtime.batch.runner import BatchRunner
from piggyback_runtime.batch.store import BatchStore
from piggyback_runtime.config import BatchConfig
from piggyback_runtime.server.app import Runtime

LOCK_FILE = "runtime.lock"


def database_url(config: BatchConfig) -> str | None:
    """The shared database's URL (from the environment variable the config names, else the config), or None."""
    if config.database_url_env and os.environ.get(config.database_url_env):
        return os.environ[config.database_url_env]
    return config.database_url


def _lock_directory(directory: Path) -> IO[bytes]:
    """One runtime per SQLite directory: a second would lease the first one's lines from under it."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = (directory / LOCK_FILE).open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(f"another runtime uses the batch directory {directory} (SQLite serves one replica); "
                           "give each its own batch.directory, or share a Postgres batch.database_url") from None
    return handle


def batch_extension(app: FastAPI, runtime: Runtime) -> contextlib.AbstractAsyncContextManager[None]:
    """Register the Batch API on `app`; the returned context runs the store and the runner with the app."""
    config = runtime.config.batch
    register_routes(app)

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[None]:
        url = database_url(config)
        directory = Path(config.directory) if config.directory else None
        lock = _lock_directory(directory) if url is None and directory is not None else None
        store = await BatchStore.open(url, directory, config.lease_timeout_s)
        runner = BatchRunner(runtime, store, config)
        app.state.batch = BatchService(runtime, store, runner, config)
        runner.start()
        try:
            yield
        finally:
            await runner.stop()
            await store.close()
            if lock is not None:
                lock.close()

    return running()
