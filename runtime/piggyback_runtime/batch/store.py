"""Batch and line state in one database (SQLite in batch.directory, or a shared Postgres), through SQLAlchemy's
async engine so that both run one code path.

Exactly once rests on three rules kept here:
- a line's result is written in the same transaction that makes it final (`completed`/`failed`), and only by
  the lease that ran it (lease owner and attempt must still match), only while its batch is still running;
- a final line is never leased again (leasing takes `pending` lines and `leased` lines whose lease expired);
- a batch heads for `completed` only once every line is final: a line whose lease expired (its replica died)
  still has to run, and is leased again like a pending one;
- the output and error files are assembled from the final lines once, by the replica that moved the batch to
  `finalizing`; the batch reaches its terminal status in the transaction that records the written files.
On Postgres, leasing uses `FOR UPDATE SKIP LOCKED` (replicas never take the same line) and recording a
result holds the batch row `FOR SHARE`, which moving the batch to `finalizing` (`FOR UPDATE`) waits for.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Row, and_, bindparam, event, func, not_, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from piggyback_runtime.batch import schema as s

# Batch statuses, as OpenAI names them.
VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED = "validating", "in_progress", "finalizing", "completed"
FAILED, EXPIRED, CANCELLING, CANCELLED = "failed", "expired", "cancelling", "cancelled"
RUNNING_STATUSES = (IN_PROGRESS, CANCELLING)  # a line result may be recorded only while its batch is one of these
ACTIVE_STATUSES = (VALIDATING, IN_PROGRESS, CANCELLING, FINALIZING)
TERMINAL_STATUSES = (COMPLETED, FAILED, EXPIRED, CANCELLED)
# Line states.
PENDING, LEASED, LINE_COMPLETED, LINE_FAILED = "pending", "leased", "completed", "failed"
LINE_STATES = (PENDING, LEASED, LINE_COMPLETED, LINE_FAILED)
STORAGE_DISK, STORAGE_DATABASE = "disk", "database"
SQLITE_FILE = "batch.sqlite3"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def services_text(names: Iterable[str]) -> str:
    """The `services` column: the names between commas, so that one name is found with a LIKE."""
    return "," + ",".join(sorted(set(names))) + ","


def services_of(text: str | None) -> frozenset[str]:
    return frozenset(name for name in (text or "").split(",") if name)


def _visible(table: Any, hidden: Collection[str]) -> Any:
    """Rows whose services include none of `hidden`. A row from before schema version 2 names no services:
    only a caller from whom nothing is hidden sees it."""
    if not hidden:
        return true()
    return and_(table.c.services.is_not(None),
                *(not_(table.c.services.contains(f",{name},", autoescape=True)) for name in hidden))  # fmt: skip


@dataclass(frozen=True)
class LeasedLine:
    batch_id: str
    line_no: int
    custom_id: str
    model: str
    body: str
    endpoint: str
    attempt: int


@dataclass(frozen=True)
class LineResult:
    batch_id: str
    line_no: int
    attempt: int
    state: str  # LINE_COMPLETED or LINE_FAILED
    result: str  # the output or error file line


class NotCancellable(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL + synchronous=NORMAL: a committed transaction survives the process being killed (it is in the OS's
    # page cache); a power loss may lose the last ones, whose lines then simply run again.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _fsync_write(path: Path, content: bytes) -> None:
    """Write `content` to `path` atomically: a reader sees the whole file or none, even after a crash."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class BatchStore:
    """Every read and write of batch state. `owner` names this replica in the leases it takes."""

    def __init__(self, engine: AsyncEngine, directory: Path | None, owner: str, lease_timeout_s: float,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.engine = engine
        self.clock = clock  # wall-clock seconds: leases and batch timestamps (a test drives its own)
        self.directory = directory
        self.owner = owner
        self.lease_timeout_s = lease_timeout_s
        self.shared = engine.dialect.name != "sqlite"
        self.storage = STORAGE_DATABASE if self.shared else STORAGE_DISK

    @classmethod
    async def open(cls, database_url: str | None, directory: Path | None, lease_timeout_s: float,
                   owner: str | None = None, clock: Callable[[], float] = time.time) -> BatchStore:  # fmt: skip
        if directory is not None:
            (directory / "files").mkdir(parents=True, exist_ok=True)
        if database_url is None:
            assert directory is not None
            database_url = f"sqlite+aiosqlite:///{directory / SQLITE_FILE}"
        if database_url.startswith("sqlite"):
            # One connection: SQLite takes one writer at a time anyway, and a shared connection never meets
            # "database is locked" from a read transaction that wants to write.
            engine = create_async_engine(database_url, pool_size=1, max_overflow=0)
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            engine = create_async_engine(database_url, pool_size=5, max_overflow=5, pool_pre_ping=True)
        await s.migrate(engine)
        store = cls(engine, directory, owner or new_id("replica-"), lease_timeout_s, clock)
        if not store.shared:
            # SQLite serves one replica (its directory lock says so): leases left by a killed process are free.
            await store.release_all_leases()
        return store

    async def close(self) -> None:
        await self.engine.dispose()

    # --- files -------------------------------------------------------------------------------------------------
    def _file_path(self, file_id: str) -> Path:
        assert self.directory is not None
        return self.directory / "files" / f"{file_id}.jsonl"

    async def add_file(self, purpose: str, filename: str, content: bytes, line_count: int, services: str | None,
                       conn: AsyncConnection | None = None) -> Row[Any]:  # fmt: skip
        file_id = new_id("file-")
        now_ns = time.time_ns()
        if self.storage == STORAGE_DISK:
            path = self._file_path(file_id)
            _fsync_write(path, content)  # before the row: a row always has its bytes
            if path.read_bytes() != content:  # written and readable, or no row (and no completed batch)
                raise OSError(f"{path} does not read back as written")
        values = {"id": file_id, "purpose": purpose, "filename": filename, "bytes": len(content),
                  "created_at": now_ns // 1_000_000_000, "created_ns": now_ns, "line_count": line_count,
                  "storage": self.storage, "services": services}  # fmt: skip

        async def insert(c: AsyncConnection) -> None:
            await c.execute(s.files.insert().values(**values))
            if self.storage == STORAGE_DATABASE:
                await c.execute(s.file_contents.insert().values(file_id=file_id, content=content))

        if conn is not None:
            await insert(conn)
        else:
            async with self.engine.begin() as c:
                await insert(c)
        return await self._row(s.files, file_id, conn)

    async def _row(self, table: Any, row_id: str, conn: AsyncConnection | None = None) -> Row[Any]:
        query = select(table).where(table.c.id == row_id)
        if conn is not None:
            return (await conn.execute(query)).one()
        async with self.engine.connect() as c:
            return (await c.execute(query)).one()

    async def get_file(self, file_id: str) -> Row[Any] | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(s.files).where(s.files.c.id == file_id))).first()

    async def file_content(self, row: Row[Any]) -> bytes:
        if row.storage == STORAGE_DISK:
            return self._file_path(row.id).read_bytes()
        async with self.engine.connect() as conn:
            query = select(s.file_contents.c.content).where(s.file_contents.c.file_id == row.id)
            return bytes((await conn.execute(query)).scalar_one())

    async def list_files(self, purpose: str | None, after: str | None, limit: int, ascending: bool,
                         hidden: Collection[str] = ()) -> tuple[list[Row[Any]], bool]:  # fmt: skip
        query = select(s.files).where(_visible(s.files, hidden))
        if purpose is not None:
            query = query.where(s.files.c.purpose == purpose)
        return await self._page(s.files, query, after, limit, ascending)

    async def _page(self, table: Any, query: Any, after: str | None, limit: int,
                    ascending: bool) -> tuple[list[Row[Any]], bool]:  # fmt: skip
        """A cursor page: the `limit` rows after the row `after`, in creation order (newest first unless
        `ascending`), and whether more follow."""
        key = (table.c.created_ns, table.c.id)
        async with self.engine.connect() as conn:
            if after is not None:
                cursor = (await conn.execute(select(*key).where(table.c.id == after))).first()
                if cursor is None:
                    raise KeyError(after)
                past = (or_(key[0] > cursor[0], and_(key[0] == cursor[0], key[1] > cursor[1])) if ascending
                        else or_(key[0] < cursor[0], and_(key[0] == cursor[0], key[1] < cursor[1])))  # fmt: skip
                query = query.where(past)
            order = [k.asc() if ascending else k.desc() for k in key]
            rows = list((await conn.execute(query.order_by(*order).limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def delete_file(self, file_id: str) -> bool:
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(s.files).where(s.files.c.id == file_id))).first()
            if row is None:
                return False
            await conn.execute(s.files.delete().where(s.files.c.id == file_id))
            await conn.execute(s.file_contents.delete().where(s.file_contents.c.file_id == file_id))
        if row.storage == STORAGE_DISK:
            self._file_path(file_id).unlink(missing_ok=True)
        return True

    # --- batches -----------------------------------------------------------------------------------------------
    async def create_batch(self, endpoint: str, input_file_id: str, completion_window_s: int,
                           metadata: dict[str, str] | None, services: str | None) -> Row[Any]:  # fmt: skip
        now_ns = time.time_ns()
        now = now_ns // 1_000_000_000
        batch_id = new_id("batch_")
        async with self.engine.begin() as conn:
            await conn.execute(s.batches.insert().values(
                id=batch_id, endpoint=endpoint, input_file_id=input_file_id, completion_window="24h",
                status=VALIDATING, created_at=now, created_ns=now_ns, expires_at=now + completion_window_s,
                metadata=json.dumps(metadata) if metadata is not None else None, total=0, services=services,
            ))  # fmt: skip
        return await self._row(s.batches, batch_id)

    async def get_batch(self, batch_id: str) -> Row[Any] | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(s.batches).where(s.batches.c.id == batch_id))).first()

    async def list_batches(self, after: str | None, limit: int,
                           hidden: Collection[str] = ()) -> tuple[list[Row[Any]], bool]:  # fmt: skip
        query = select(s.batches).where(_visible(s.batches, hidden))
        return await self._page(s.batches, query, after, limit, ascending=False)

    async def line_counts(self, batch_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Lines per state of each batch."""
        counts: dict[str, dict[str, int]] = {batch_id: dict.fromkeys(LINE_STATES, 0) for batch_id in batch_ids}
        if not batch_ids:
            return counts
        query = (select(s.lines.c.batch_id, s.lines.c.state, func.count())
                 .where(s.lines.c.batch_id.in_(batch_ids)).group_by(s.lines.c.batch_id, s.lines.c.state))  # fmt: skip
        async with self.engine.connect() as conn:
            for batch_id, state, count in (await conn.execute(query)).all():
                counts[batch_id][state] = count
        return counts

    async def cancel(self, batch_id: str) -> Row[Any] | None:
        """validating/in_progress -> cancelling (new lines stop at once); None if there is no such batch."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(s.batches).where(s.batches.c.id == batch_id).with_for_update())).first()
            if row is None:
                return None
            if row.status in (CANCELLING, CANCELLED):
                return row
            if row.status not in (VALIDATING, IN_PROGRESS):
                raise NotCancellable(row.status)
            await conn.execute(update(s.batches).where(s.batches.c.id == batch_id)
                               .values(status=CANCELLING, cancelling_at=int(self.clock())))  # fmt: skip
        return await self._row(s.batches, batch_id)

    async def active_batches(self) -> list[Row[Any]]:
        async with self.engine.connect() as conn:
            query = select(s.batches).where(s.batches.c.status.in_(ACTIVE_STATUSES)).order_by(s.batches.c.created_ns)
            return list((await conn.execute(query)).all())

    async def start_batch(self, batch_id: str, parse: Any) -> None:
        """validating -> in_progress with its lines, or -> failed with `errors`, in one transaction.

        `parse(input_file_row, content)` returns (lines as (custom_id, model, body), errors)."""
        async with self.engine.begin() as conn:
            query = select(s.batches).where(s.batches.c.id == batch_id).with_for_update()
            batch = (await conn.execute(query)).first()
            if batch is None or batch.status not in (VALIDATING, CANCELLING):
                return  # another replica did it, or it was cancelled and finalized
            now = int(self.clock())
            if batch.status == CANCELLING:  # cancelled before it started: nothing to run
                await conn.execute(update(s.batches).where(s.batches.c.id == batch_id)
                                   .values(status=CANCELLED, cancelled_at=now))  # fmt: skip
                return
            file_row = (await conn.execute(select(s.files).where(s.files.c.id == batch.input_file_id))).first()
            if file_row is None:
                parsed: list[tuple[str, str, str]] = []
                errors = [{"code": "file_not_found", "line": None, "param": "input_file_id",
                           "message": f"the input file {batch.input_file_id} was deleted before the batch "
                                      "started"}]  # fmt: skip
            else:
                parsed, errors = parse(batch, await self._content_in(conn, file_row))
            if errors:
                await conn.execute(update(s.batches).where(s.batches.c.id == batch_id)
                                   .values(status=FAILED, failed_at=now, errors=json.dumps(errors)))  # fmt: skip
                return
            if parsed:
                await conn.execute(s.lines.insert(), [
                    {"batch_id": batch_id, "line_no": no, "custom_id": custom_id, "model": model, "body": body,
                     "state": PENDING, "attempts": 0}
                    for no, (custom_id, model, body) in enumerate(parsed, start=1)
                ])  # fmt: skip
            await conn.execute(update(s.batches).where(s.batches.c.id == batch_id)
                               .values(status=IN_PROGRESS, in_progress_at=now, total=len(parsed)))  # fmt: skip

    async def _content_in(self, conn: AsyncConnection, row: Row[Any]) -> bytes:
        if row.storage == STORAGE_DISK:
            return self._file_path(row.id).read_bytes()
        query = select(s.file_contents.c.content).where(s.file_contents.c.file_id == row.id)
        return bytes((await conn.execute(query)).scalar_one())

    # --- leases ------------------------------------------------------------------------------------------------
    async def lease_lines(self, limit: int) -> list[LeasedLine]:
        """Up to `limit` runnable lines of in_progress batches, oldest batch first, leased to this replica."""
        if limit <= 0:
            return []
        now = self.clock()
        lines, batches = s.lines, s.batches
        runnable = or_(lines.c.state == PENDING, and_(lines.c.state == LEASED, lines.c.lease_until < now))
        query = (select(lines.c.batch_id, lines.c.line_no, lines.c.custom_id, lines.c.model, lines.c.body,
                        lines.c.attempts, batches.c.endpoint)
                 .join(batches, batches.c.id == lines.c.batch_id)
                 .where(batches.c.status == IN_PROGRESS, batches.c.expires_at > int(now), runnable)
                 .order_by(batches.c.created_ns, lines.c.line_no).limit(limit)
                 .with_for_update(skip_locked=True, of=lines))  # fmt: skip
        async with self.engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return []
            await conn.execute(
                update(lines).where(lines.c.batch_id == bindparam("b_id"), lines.c.line_no == bindparam("b_no"))
                .values(state=LEASED, lease_owner=self.owner, lease_until=now + self.lease_timeout_s,
                        attempts=lines.c.attempts + 1),
                [{"b_id": row.batch_id, "b_no": row.line_no} for row in rows],
            )  # fmt: skip
        return [LeasedLine(row.batch_id, row.line_no, row.custom_id, row.model, row.body, row.endpoint,
                           row.attempts + 1) for row in rows]  # fmt: skip

    async def renew_leases(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(s.lines).where(s.lines.c.lease_owner == self.owner, s.lines.c.state == LEASED)
                               .values(lease_until=self.clock() + self.lease_timeout_s))  # fmt: skip

    async def release(self, keys: Iterable[tuple[str, int, int]]) -> None:
        """Give leased lines back (not run, or cut off): they are pending again, for any replica."""
        params = [{"b_id": b, "b_no": n, "b_attempt": a} for b, n, a in keys]
        if not params:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                update(s.lines).where(s.lines.c.batch_id == bindparam("b_id"), s.lines.c.line_no == bindparam("b_no"),
                                      s.lines.c.state == LEASED, s.lines.c.lease_owner == self.owner,
                                      s.lines.c.attempts == bindparam("b_attempt"))
                .values(state=PENDING, lease_owner=None, lease_until=None), params)  # fmt: skip

    async def release_all_leases(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(s.lines).where(s.lines.c.state == LEASED)
                               .values(state=PENDING, lease_owner=None, lease_until=None))  # fmt: skip

    async def record(self, results: Sequence[LineResult]) -> None:
        """Make lines final with their results, in one transaction (group commit). A result whose lease is no
        longer this replica's, or whose batch left in_progress/cancelling, is dropped: the line is someone
        else's now, or the batch's files are being written without it."""
        if not results:
            return
        async with self.engine.begin() as conn:
            batch_ids = sorted({r.batch_id for r in results})
            # FOR SHARE: recording waits while a batch moves to finalizing (FOR UPDATE) and sees its new status.
            query = (select(s.batches.c.id, s.batches.c.status).where(s.batches.c.id.in_(batch_ids))
                     .with_for_update(read=True))  # fmt: skip
            running = {row.id for row in (await conn.execute(query)).all() if row.status in RUNNING_STATUSES}
            params = [{"b_id": r.batch_id, "b_no": r.line_no, "b_attempt": r.attempt, "b_state": r.state,
                       "b_result": r.result} for r in results if r.batch_id in running]  # fmt: skip
            if params:
                await conn.execute(
                    update(s.lines).where(s.lines.c.batch_id == bindparam("b_id"),
                                          s.lines.c.line_no == bindparam("b_no"), s.lines.c.state == LEASED,
                                          s.lines.c.lease_owner == self.owner,
                                          s.lines.c.attempts == bindparam("b_attempt"))
                    .values(state=bindparam("b_state"), result=bindparam("b_result"),
                            finished_attempt=bindparam("b_attempt"), lease_owner=None, lease_until=None),
                    params)  # fmt: skip

    # --- finalizing --------------------------------------------------------------------------------------------
    async def claim_finalize(self, batch_id: str) -> str | None:
        """Move a batch that has nothing left to run to finalizing, owned by this replica; or take over a
        finalization whose replica died. Returns the terminal status it leads to, or None (not ours / not yet)."""
        now = self.clock()
        async with self.engine.begin() as conn:
            query = select(s.batches).where(s.batches.c.id == batch_id).with_for_update()
            batch = (await conn.execute(query)).first()
            if batch is None:
                return None
            if batch.status == FINALIZING:
                if batch.finalize_owner != self.owner and (batch.finalize_lease_until or 0) >= now:
                    return None
                target = batch.finalize_target
            else:
                if batch.status == IN_PROGRESS and batch.expires_at <= int(now):
                    target = EXPIRED
                elif batch.status == IN_PROGRESS:
                    target = COMPLETED
                elif batch.status == CANCELLING:
                    target = CANCELLED
                else:
                    return None
                this_batch = s.lines.c.batch_id == batch_id
                if target == COMPLETED:
                    # Every line must be final. A leased line whose lease expired (its replica died) is not
                    # "not running": it is waiting for another replica to lease it again, exactly like a
                    # pending one; completing without it would send it to the error file as not run.
                    busy_lines = and_(this_batch, s.lines.c.state.in_((PENDING, LEASED)))
                else:
                    # Cancelled or expired: lines stop. Those not running now (pending, or leased by a replica
                    # whose lease expired) go to the error file as not run; wait only for live leases.
                    busy_lines = and_(this_batch, s.lines.c.state == LEASED, s.lines.c.lease_until >= now)
                if (await conn.execute(select(func.count()).where(busy_lines))).scalar_one():
                    return None
            await conn.execute(update(s.batches).where(s.batches.c.id == batch_id).values(
                status=FINALIZING, finalize_target=target, finalize_owner=self.owner,
                finalize_lease_until=now + self.lease_timeout_s,
                finalizing_at=batch.finalizing_at or int(now)))  # fmt: skip
        return target

    async def final_lines(self, batch_id: str) -> list[Row[Any]]:
        query = (select(s.lines.c.line_no, s.lines.c.custom_id, s.lines.c.state, s.lines.c.result)
                 .where(s.lines.c.batch_id == batch_id).order_by(s.lines.c.line_no))  # fmt: skip
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def finish_batch(self, batch_id: str, target: str, output: tuple[bytes, int] | None,
                           errors: tuple[bytes, int] | None) -> bool:  # fmt: skip
        """Record the written files and the terminal status in one transaction (if this replica still owns the
        finalization). Files on disk are written (and fsynced) before the rows that name them."""
        async with self.engine.begin() as conn:
            query = select(s.batches).where(s.batches.c.id == batch_id).with_for_update()
            batch = (await conn.execute(query)).first()
            if batch is None or batch.status != FINALIZING or batch.finalize_owner != self.owner:
                return False
            values: dict[str, Any] = {"status": target, f"{target}_at": int(self.clock()), "finalize_owner": None,
                                      "finalize_lease_until": None}  # fmt: skip
            if output is not None:
                values["output_file_id"] = (await self.add_file("batch_output", f"{batch_id}_output.jsonl",
                                                                output[0], output[1], batch.services,
                                                                conn)).id  # fmt: skip
            if errors is not None:
                values["error_file_id"] = (await self.add_file("batch_output", f"{batch_id}_error.jsonl",
                                                               errors[0], errors[1], batch.services,
                                                               conn)).id  # fmt: skip
            await conn.execute(update(s.batches).where(s.batches.c.id == batch_id).values(**values))
        return True

    async def lines_by_batch_status(self) -> list[tuple[str, str, int]]:
        """(batch status, line state, lines) over the batches still active: the /metrics progress gauges."""
        query = (select(s.batches.c.status, s.lines.c.state, func.count())
                 .join(s.batches, s.batches.c.id == s.lines.c.batch_id)
                 .where(s.batches.c.status.in_(ACTIVE_STATUSES)).group_by(s.batches.c.status, s.lines.c.state))
        async with self.engine.connect() as conn:
            return [(a, b, c) for a, b, c in (await conn.execute(query)).all()]

    async def batches_by_status(self) -> dict[str, int]:
        query = select(s.batches.c.status, func.count()).group_by(s.batches.c.status)
        async with self.engine.connect() as conn:
            return {status: count for status, count in (await conn.execute(query)).all()}
