"""The batch database: tables, and the versioned migrations run at start (SQLite and Postgres alike).

`batch_schema_migrations` holds one row per applied version. At start every version above the highest applied
one runs, each in its own transaction; on Postgres an advisory lock makes replicas starting together take turns.
A new version appends a function to MIGRATIONS; an applied version is never edited.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine

metadata = MetaData()

schema_migrations = Table(
    "batch_schema_migrations", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
)  # fmt: skip

files = Table(
    "batch_files", metadata,
    Column("id", String(64), primary_key=True),
    Column("purpose", String(32), nullable=False),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("created_ns", BigInteger, nullable=False),  # list order (created_at is whole seconds)
    Column("line_count", Integer, nullable=False),
    # "disk": under batch.directory; "database": in batch_file_contents (replicas share it through Postgres).
    Column("storage", String(16), nullable=False),
    # The services its lines name, as ",a,b," (an output file: its batch's): an API key must open them all.
    Column("services", Text),
)  # fmt: skip

file_contents = Table(
    "batch_file_contents", metadata,
    Column("file_id", String(64), primary_key=True),
    Column("content", LargeBinary, nullable=False),
)  # fmt: skip

batches = Table(
    "batches", metadata,
    Column("id", String(64), primary_key=True),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("created_ns", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger),
    Column("finalizing_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("failed_at", BigInteger),
    Column("expired_at", BigInteger),
    Column("cancelling_at", BigInteger),
    Column("cancelled_at", BigInteger),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("errors", Text),  # JSON list of {code, line, message, param}
    Column("metadata", Text),  # JSON object
    Column("total", Integer, nullable=False, default=0),
    # Finalizing: the terminal status it leads to, and which replica writes the files until when.
    Column("finalize_target", String(16)),
    Column("finalize_owner", String(64)),
    Column("finalize_lease_until", Float),
    Column("services", Text),  # its input file's services (schema version 2)
)  # fmt: skip

# Line states: pending (not run, or released), leased (a replica runs it), completed (its output line is in
# `result`), failed (its error line is in `result`). completed and failed are final: nothing leases them again.
lines = Table(
    "batch_lines", metadata,
    Column("batch_id", String(64), nullable=False),
    Column("line_no", Integer, nullable=False),  # 1-based, as in error messages
    Column("custom_id", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    # How many times a replica leased the line to run it, and the lease that recorded its result: a finished
    # line leased again would show attempts > finished_attempt.
    Column("attempts", Integer, nullable=False, default=0),
    Column("finished_attempt", Integer),
    Column("result", Text),  # the output or error file line (JSON)
    PrimaryKeyConstraint("batch_id", "line_no"),
    UniqueConstraint("batch_id", "custom_id", name="uq_batch_lines_custom_id"),
    Index("ix_batch_lines_state", "batch_id", "state", "line_no"),
)  # fmt: skip


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, tables=[files, file_contents, batches, lines])


def _v2_services(conn: Connection) -> None:
    """Files and batches name the services they hold work for (API keys scope them). A database created at
    version 2 or later already has the column (version 1 creates the tables as they are now)."""
    for table in (files, batches):
        if "services" not in {column["name"] for column in inspect(conn).get_columns(table.name)}:
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN services TEXT"))


MIGRATIONS: list[Callable[[Connection], None]] = [_v1_initial, _v2_services]  # version N is MIGRATIONS[N - 1]
SCHEMA_VERSION = len(MIGRATIONS)
_PG_MIGRATION_LOCK = 0x5069_6767_7962  # any constant shared by all replicas ("Piggyb")


async def migrate(engine: AsyncEngine) -> int:
    """Apply the migrations this database lacks; returns the schema version it is at afterwards."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        await conn.run_sync(lambda sync: metadata.create_all(sync, tables=[schema_migrations]))
        applied = (await conn.execute(select(schema_migrations.c.version))).scalars().all()
        current = max(applied, default=0)
        if current > SCHEMA_VERSION:
            raise RuntimeError(f"the batch database is at schema version {current}, newer than this runtime's "
                               f"{SCHEMA_VERSION}: run a runtime at least as new as the one that migrated it")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            await conn.run_sync(MIGRATIONS[version - 1])
            await conn.execute(schema_migrations.insert().values(version=version, applied_at=time.time()))
    return SCHEMA_VERSION
