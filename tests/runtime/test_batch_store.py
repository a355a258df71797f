"""Exactly once across replicas, in-process and deterministic: two BatchStore instances (two replicas) on one
database, with a clock the test moves. A replica dies holding leases; the survivor must run those lines before
the batch may complete, and a late result from the dead replica's lease must not count."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from piggyback_runtime.batch import schema as s
from piggyback_runtime.batch import store as st
from tests.runtime.postgres_fixture import postgres_server

LEASE_TIMEOUT_S = 30.0
LINES = 6


class Clock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str | None, Path]]:
    if request.param == "sqlite":
        yield None, tmp_path / "batch"
    else:
        with postgres_server() as url:
            yield url, tmp_path / "batch"


@pytest.fixture
async def replicas(database: tuple[str | None, Path]) -> AsyncIterator[tuple[st.BatchStore, st.BatchStore, Clock]]:
    url, directory = database
    clock = Clock()
    a = await st.BatchStore.open(url, directory, LEASE_TIMEOUT_S, owner="replica-a", clock=clock)
    b = await st.BatchStore.open(url, directory, LEASE_TIMEOUT_S, owner="replica-b", clock=clock)
    try:
        yield a, b, clock
    finally:
        await a.close()
        await b.close()


def _parse(_: Any, content: bytes) -> tuple[list[tuple[str, str, str]], list[dict[str, Any]]]:
    return [(item["custom_id"], "bulk", "{}") for item in map(json.loads, content.splitlines())], []


async def started_batch(store: st.BatchStore) -> str:
    content = b"".join(json.dumps({"custom_id": f"line-{i}"}).encode() + b"\n" for i in range(LINES))
    file_row = await store.add_file("batch", "in.jsonl", content, LINES, st.services_text(["bulk"]))
    batch = await store.create_batch("/v1/chat/completions", file_row.id, 24 * 3600, None, file_row.services)
    await store.start_batch(batch.id, _parse)
    return str(batch.id)


def done(line: st.LeasedLine) -> st.LineResult:
    return st.LineResult(line.batch_id, line.line_no, line.attempt, st.LINE_COMPLETED,
                         json.dumps({"custom_id": line.custom_id}))  # fmt: skip


async def test_lines_of_a_dead_replica_run_again_before_the_batch_completes(
        replicas: tuple[st.BatchStore, st.BatchStore, Clock]) -> None:  # fmt: skip
    a, b, clock = replicas
    batch_id = await started_batch(a)
    held_by_b = await b.lease_lines(2)
    ran_by_a = await a.lease_lines(LINES)
    assert len(held_by_b) == 2 and len(ran_by_a) == LINES - 2
    await a.record([done(line) for line in ran_by_a])
    # b holds live leases: nothing to finalize yet.
    assert await a.claim_finalize(batch_id) is None
    clock.advance(LEASE_TIMEOUT_S + 1)  # b died: its leases expire

    # The bug this guards: with b's leases expired and no line pending, a moved the batch to finalizing
    # and wrote b's two lines to the error file as "not run".
    assert await a.claim_finalize(batch_id) is None
    taken_over = await a.lease_lines(LINES)
    assert {(line.line_no, line.attempt) for line in taken_over} == {(line.line_no, 2) for line in held_by_b}
    # b's result from its old lease arrives late (it was only slow): dropped, the line is a's now.
    await b.record([done(line) for line in held_by_b])
    assert await a.claim_finalize(batch_id) is None
    await a.record([done(line) for line in taken_over])

    assert await a.claim_finalize(batch_id) == st.COMPLETED
    final = await a.final_lines(batch_id)
    assert [row.state for row in final] == [st.LINE_COMPLETED] * LINES
    rows = await line_rows(a, batch_id)
    assert all(row.finished_attempt == row.attempts for row in rows)  # the lease that recorded it was its last
    assert sorted(row.attempts for row in rows) == [1] * (LINES - 2) + [2, 2]


async def test_a_cancel_does_not_wait_for_a_dead_replicas_leases(
        replicas: tuple[st.BatchStore, st.BatchStore, Clock]) -> None:  # fmt: skip
    a, b, clock = replicas
    batch_id = await started_batch(a)
    held_by_b = await b.lease_lines(2)
    await a.record([done(line) for line in await a.lease_lines(1)])
    await a.cancel(batch_id)
    assert await a.claim_finalize(batch_id) is None  # b may still be running its lines
    clock.advance(LEASE_TIMEOUT_S + 1)
    assert await a.claim_finalize(batch_id) == st.CANCELLED
    await b.record([done(line) for line in held_by_b])  # too late: the batch's files are being written
    states = [row.state for row in await a.final_lines(batch_id)]
    assert states.count(st.LINE_COMPLETED) == 1 and states.count(st.LINE_FAILED) == 0


async def line_rows(store: st.BatchStore, batch_id: str) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(select(s.lines).where(s.lines.c.batch_id == batch_id))).all())
