"""CPU attention tasks are spread over all workers by work, not queued behind a worker per row (pool.py).

Pure bookkeeping, no worker processes: a pool whose workers are records and whose sends are only queued."""

from __future__ import annotations

import queue

from piggyback_runtime.piggyback.pool import CPUAttentionPool, Worker


def bookkeeping_pool(num_workers: int) -> CPUAttentionPool:
    pool = object.__new__(CPUAttentionPool)  # no processes, no sender thread: sends stay in the outbox
    pool.workers = [Worker(i, None, None) for i in range(num_workers)]  # type: ignore[arg-type]
    pool.tables = {}
    pool._outbox = queue.SimpleQueue()
    pool._busy_of_replaced = 0.0
    return pool


def test_one_layers_tasks_are_spread_over_every_worker_by_work() -> None:
    pool = bookkeeping_pool(2)
    # (slot, layer, position, generation): one long context and five short ones.
    tasks = [(0, 3, 999, 0), (1, 3, 99, 0), (2, 3, 99, 0), (3, 3, 199, 0), (4, 3, 299, 0), (5, 3, 399, 0)]
    assigned = pool.submit(tasks)
    assert set(assigned.values()) == {0, 1}
    loads = [w.work_in_flight for w in pool.workers]
    assert sum(loads) == sum(t[2] + 1 for t in tasks)
    # Largest first onto the least loaded: the long context and one short one on one worker, the other four
    # short ones on the other; the two end within one short task of each other.
    assert sorted(loads) == [1000, 1100]
    assert sorted(slot for slot, w in assigned.items() if w == assigned[0]) == [0, 2]


def test_rows_are_not_pinned_to_a_worker_and_completions_free_its_share() -> None:
    pool = bookkeeping_pool(2)
    first = pool.submit([(0, 0, 499, 0), (1, 0, 99, 0)])
    busy_worker = first[0]
    # While slot 0's long task is in flight, slot 1's next layer goes to the other worker, and so does slot
    # 2's: work in flight decides, not who held a row before.
    second = pool.submit([(2, 0, 99, 0)])
    assert second[2] != busy_worker
    pool._landed(pool.workers[busy_worker], [(0, 0, 0)])
    assert pool.workers[busy_worker].work_in_flight == 0
    third = pool.submit([(1, 1, 100, 0)])
    assert third[1] == busy_worker  # slot 1 moves to the now idle worker
    assert pool.workers[busy_worker].slots >= {1} and 1 not in pool.workers[1 - busy_worker].slots


def test_a_block_table_goes_to_every_worker_and_is_forgotten_by_all() -> None:
    pool = bookkeeping_pool(3)
    pool.register(1, 7, [4, 5])
    pool.update_table(7, [4, 5, 6])
    assert pool.tables[7] == [4, 5, 6] and pool.workers[1].slots == {7}
    pool.forget(1, 7)
    assert 7 not in pool.tables and not any(w.slots for w in pool.workers)
    assert pool._outbox.qsize() == 3 * 3  # register, grown table, forget: to each of the three workers
