"""Tests of the evaluation store on real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_v2.errors import StoreError
from agent_v2.protocol import EvaluationRequest, Outcome, Status
from agent_v2.server import EvaluationRecord, EvaluationStore
from agent_v2.server._store import _FinishedCache


def _record(key: str | None = None, instance_id: str = "a") -> EvaluationRecord:
    return EvaluationRecord(
        id=uuid.uuid4().hex,
        request=EvaluationRequest(instance_id=instance_id, container_id="c"),
        status=Status.QUEUED,
        created_at=time.time(),
        idempotency_key=key,
    )


@contextlib.asynccontextmanager
async def _opened(path: Path) -> AsyncIterator[EvaluationStore]:
    """Open the store at ``path`` for the block, then close it."""
    store = EvaluationStore(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EvaluationStore]:
    async with _opened(tmp_path / "store.sqlite3") as store:
        yield store


async def test_add_then_get_returns_the_same_evaluation(store: EvaluationStore) -> None:
    """A stored evaluation reads back with its request, status and key."""
    record = _record(key="k1")
    stored, created = await store.add(record)

    assert created and stored == record
    assert await store.get(record.id) == record
    assert await store.find_by_key("k1") == record
    assert await store.get("missing") is None


async def test_same_idempotency_key_returns_the_first_evaluation(
    store: EvaluationStore,
) -> None:
    """A second add with a key already used inserts nothing and returns the first."""
    first, _ = await store.add(_record(key="same"))
    second, created = await store.add(_record(key="same", instance_id="b"))

    assert not created
    assert second.id == first.id
    assert second.request.instance_id == "a"
    assert (await store.count_by_status()) == {Status.QUEUED: 1}


async def test_add_many_commits_together_and_answers_in_order(
    store: EvaluationStore,
) -> None:
    """add_many answers as add would for each record, in order: a key taken
    before, or by an earlier record of the same call, returns that evaluation."""
    taken, _ = await store.add(_record(key="old"))
    records = [
        _record(key="new"),
        _record(key="old", instance_id="b"),
        _record(),
        _record(key="new", instance_id="c"),
    ]
    added = await store.add_many(records)

    assert [created for _, created in added] == [True, False, True, False]
    assert [record.id for record, _ in added] == [
        records[0].id,
        taken.id,
        records[2].id,
        records[0].id,
    ]
    assert (await store.count_by_status()) == {Status.QUEUED: 3}
    assert await store.add_many([]) == []


async def test_concurrent_adds_with_one_key_create_exactly_one(
    store: EvaluationStore,
) -> None:
    """Many simultaneous adds with the same key: one created, all see its id."""
    results = await asyncio.gather(*(store.add(_record(key="k")) for _ in range(50)))

    assert sum(created for _, created in results) == 1
    assert len({record.id for record, _ in results}) == 1


async def test_many_concurrent_adds_are_all_committed(tmp_path: Path) -> None:
    """A burst of adds (batched by the writer) is durable after close and reopen."""
    path = tmp_path / "store.sqlite3"
    records = [_record(key=f"k{i}") for i in range(1000)]
    async with _opened(path) as store:
        await asyncio.gather(*(store.add(record) for record in records))

    async with _opened(path) as reopened:
        found = await reopened.get_many(record.id for record in records)
    assert len(found) == 1000


async def test_restart_requeues_queued_and_running_in_creation_order(
    tmp_path: Path,
) -> None:
    """After a reopen, unfinished evaluations come back queued, oldest first."""
    path = tmp_path / "store.sqlite3"
    records = [_record() for _ in range(4)]
    async with _opened(path) as store:
        for record in records:
            await store.add(record)
        store.mark_running(records[1], time.time())
        await store.finish(
            records[2],
            status=Status.SUCCEEDED,
            outcome=Outcome(success=True, reward=1.0),
            finished_at=time.time(),
        )

    async with _opened(path) as store:
        unfinished = await store.requeue_unfinished()
        done = await store.get(records[2].id)
    assert [r.id for r in unfinished] == [records[i].id for i in (0, 1, 3)]
    assert all(r.status is Status.QUEUED for r in unfinished)
    assert unfinished[1].attempts == 1
    assert done is not None and done.outcome is not None
    assert done.status is Status.SUCCEEDED and done.outcome.reward == 1.0


async def test_baselines_are_cached_across_reopen(tmp_path: Path) -> None:
    """put_baseline survives a restart; an unknown key reads as None."""
    path = tmp_path / "store.sqlite3"
    async with _opened(path) as store:
        assert await store.get_baseline("ds/test/a/cpu") is None
        await store.put_baseline("ds/test/a/cpu", {"BM_a": 1.5e-3})

    async with _opened(path) as store:
        assert await store.get_baseline("ds/test/a/cpu") == {"BM_a": 1.5e-3}


async def test_container_records_keep_the_first_and_are_forgotten_on_delete(
    store: EvaluationStore,
) -> None:
    """The first exec result per (container, key) and the container made under a
    creation key are kept until the container goes, then forgotten together."""
    await store.put_exec_result("c1", "k", {"exit_code": 0})
    await store.put_exec_result("c1", "k", {"exit_code": 1})
    await store.put_created_container("made", "c1", {"container_id": "c1"})
    await store.put_created_container("made", "c2", {"container_id": "c2"})
    await store.put_created_container("other", "c2", {"container_id": "c2"})
    assert await store.get_exec_result("c1", "k") == {"exit_code": 0}
    assert await store.get_exec_result("c2", "k") is None
    assert await store.get_created_container("made") == {"container_id": "c1"}

    await store.forget_container("c1")
    assert await store.get_exec_result("c1", "k") is None
    assert await store.get_created_container("made") is None
    assert await store.get_created_container("other") == {"container_id": "c2"}


async def test_a_closed_store_raises_store_error(tmp_path: Path) -> None:
    """Using a store that is not open raises StoreError, not a driver error."""
    store = EvaluationStore(tmp_path / "store.sqlite3")
    with pytest.raises(StoreError):
        await store.get("x")
    with pytest.raises(StoreError):
        await store.add(_record())


async def test_an_unopenable_path_raises_store_error_naming_it(tmp_path: Path) -> None:
    """A store path that cannot be created fails with the path in the message."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = EvaluationStore(blocker / "store.sqlite3")
    with pytest.raises(StoreError, match=r"store\.sqlite3"):
        await store.open()


async def test_reads_under_heavy_concurrent_load_see_every_commit(
    store: EvaluationStore,
) -> None:
    """A read issued after a write committed sees it, even among many readers."""
    records = [_record() for _ in range(20)]
    for record in records:
        await store.add(record)
    stop = asyncio.Event()

    async def keep_reading(offset: int) -> None:
        await asyncio.sleep(offset / 1000)  # readers out of step, as live traffic
        while not stop.is_set():
            await store.get(records[offset % len(records)].id)
            await asyncio.sleep(0)  # a finished one is served without a pause

    readers = [asyncio.create_task(keep_reading(i)) for i in range(100)]
    try:
        for record in records:
            await store.finish(
                record,
                status=Status.SUCCEEDED,
                outcome=Outcome(success=True),
                finished_at=time.time(),
            )
            seen = await store.get(record.id)
            assert seen is not None and seen.status is Status.SUCCEEDED
    finally:
        stop.set()
        await asyncio.gather(*readers)


async def test_a_start_noted_without_waiting_commits_before_the_outcome(
    tmp_path: Path,
) -> None:
    """The start mark_running queues commits before the outcome, and the record
    it returns, once finished, is what the disk holds."""
    path = tmp_path / "store.sqlite3"
    started = time.time()
    async with _opened(path) as store:
        record, _ = await store.add(_record())
        running = store.mark_running(record, started)  # its commit is not awaited
        finished = await store.finish(
            running,
            status=Status.SUCCEEDED,
            outcome=Outcome(success=True, reward=0.5),
            finished_at=started + 1,
        )

    async with _opened(path) as store:
        on_disk = await store.get(record.id)
    assert finished.attempts == 1 and finished.started_at == started
    assert on_disk == finished


async def test_finished_evaluations_read_the_same_from_memory_and_from_disk(
    tmp_path: Path,
) -> None:
    """What get_many serves from memory equals what a fresh store reads."""
    path = tmp_path / "store.sqlite3"
    async with _opened(path) as store:
        records = [(await store.add(_record()))[0] for _ in range(5)]
        for record in records[:3]:
            await store.finish(
                store.mark_running(record, time.time()),
                status=Status.FAILED,
                outcome=Outcome(success=False, error="tests_failed", stdout="x" * 100),
                finished_at=time.time(),
            )
        in_memory = await store.get_many(record.id for record in records)

    async with _opened(path) as store:
        from_disk = await store.get_many(record.id for record in records)
    assert in_memory == from_disk
    assert [from_disk[r.id].status for r in records] == [Status.FAILED] * 3 + [
        Status.QUEUED
    ] * 2


def test_the_memory_of_finished_evaluations_keeps_within_its_budget() -> None:
    """Past its budget the cache drops the oldest evaluations, newest kept."""
    cache = _FinishedCache(budget=10_000)
    finished = [
        dataclasses.replace(
            _record(),
            status=Status.SUCCEEDED,
            outcome=Outcome(success=True, stdout="y" * 3000),
        )
        for _ in range(5)
    ]
    for record in finished:
        cache.put(record)
    cache.put(_record())  # unfinished: never kept

    kept = [record for record in finished if cache.get(record.id) is not None]
    assert kept == finished[-2:]
