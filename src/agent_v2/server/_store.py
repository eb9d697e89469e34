"""The evaluation store: evaluations, baselines and container records, one SQLite file.

Writes go through one writer task that commits whatever is pending as one
transaction, so a burst of submissions costs one commit, not one per row;
callers still resume only after their row is committed. Reads use a second
connection, which in WAL mode never waits for the writer.

Each connection lives on a thread of its own (SQLite calls block), and each
transaction or read runs there as one call: a batch of writes crosses
between the event loop and the thread once, not once per statement.

A finished evaluation never changes again, so the store keeps the most
recent ones in memory (within a size budget): the long polls that report
them, moments after they finish, need no SQLite read and no decoding.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent_v2.errors import StoreError, StoreUnavailable
from agent_v2.protocol import EvaluationRequest, EvaluationView, Outcome, Status

__all__ = ["EvaluationRecord", "EvaluationStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]

MAX_BATCH = 512

FINISHED_CACHE_CHARS = 64 * 1024 * 1024
"""Characters of outcome text kept in memory for recently finished evaluations."""

_RECORD_CHARS = 1024
"""What a cached record counts beyond its outcome's text."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS evaluations_unfinished
    ON evaluations (status) WHERE status IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS baselines (
    key TEXT PRIMARY KEY,
    times TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS exec_results (
    container_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (container_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS created_containers (
    idempotency_key TEXT PRIMARY KEY,
    container_id TEXT NOT NULL,
    container TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS created_containers_by_id
    ON created_containers (container_id);
"""

_COLUMNS = (
    "id, idempotency_key, request, status, outcome, "
    "created_at, started_at, finished_at, attempts"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationRecord:
    """One evaluation as the store keeps it."""

    id: str
    request: EvaluationRequest
    status: Status
    created_at: float
    idempotency_key: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    outcome: Outcome | None = None

    def view(self) -> EvaluationView:
        """Return the evaluation as the HTTP API shows it."""
        return EvaluationView(
            id=self.id,
            status=self.status,
            request=self.request,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            attempts=self.attempts,
            outcome=self.outcome,
        )


def _row(record: EvaluationRecord) -> tuple[Any, ...]:
    """Return the values of ``record`` in the order of _COLUMNS."""
    return (
        record.id,
        record.idempotency_key,
        record.request.model_dump_json(),
        record.status.value,
        record.outcome.model_dump_json() if record.outcome else None,
        record.created_at,
        record.started_at,
        record.finished_at,
        record.attempts,
    )


def _record_from_row(row: sqlite3.Row | tuple[Any, ...]) -> EvaluationRecord:
    """Return the record of a row selected with ``_COLUMNS``."""
    (id_, key, request, status, outcome, created, started, finished, attempts) = row
    return EvaluationRecord(
        id=id_,
        idempotency_key=key,
        request=EvaluationRequest.model_validate_json(request),
        status=Status(status),
        outcome=Outcome.model_validate_json(outcome) if outcome else None,
        created_at=created,
        started_at=started,
        finished_at=finished,
        attempts=attempts,
    )


class _FinishedCache:
    """Recently finished evaluations by id, the oldest dropped past a budget."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._used = 0
        self._records: collections.OrderedDict[str, tuple[EvaluationRecord, int]]
        self._records = collections.OrderedDict()

    def get(self, evaluation_id: str) -> EvaluationRecord | None:
        """Return the finished evaluation, or None when it is not kept here."""
        kept = self._records.get(evaluation_id)
        return None if kept is None else kept[0]

    def put(self, record: EvaluationRecord) -> None:
        """Keep a finished evaluation, dropping the oldest ones past the budget."""
        if not record.status.finished or record.id in self._records:
            return
        size = _RECORD_CHARS + _outcome_chars(record.outcome)
        self._records[record.id] = (record, size)
        self._used += size
        while self._used > self._budget and self._records:
            _, (_, dropped) = self._records.popitem(last=False)
            self._used -= dropped


def _outcome_chars(outcome: Outcome | None) -> int:
    """Return the length of an outcome's free text, the bulk of its memory."""
    if outcome is None:
        return 0
    texts = (outcome.stdout, outcome.stderr, outcome.build_output)
    return sum(len(text or "") for text in texts) + len(outcome.error_detail or "")


@dataclasses.dataclass(eq=False)
class _Write:
    """One queued write and the future its caller waits on."""

    op: _Op
    future: asyncio.Future[Any]


class _Connection:
    """A SQLite connection and the one thread that runs every call on it."""

    def __init__(self, db: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = db
        self._executor = executor

    @classmethod
    async def open(cls, path: Path, name: str, *pragmas: str) -> _Connection:
        """Connect on a new thread and apply ``pragmas`` there."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

        def connect() -> sqlite3.Connection:
            # NOTE: isolation_level=None: transactions are begun explicitly.
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                for pragma in pragmas:
                    db.execute(pragma).fetchall()
            except BaseException:
                db.close()
                raise
            return db

        try:
            db = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(db, executor)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Return ``fn(connection, *args)``, run on the connection's thread."""
        call = functools.partial(fn, self._db, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        """Close the connection and let its thread end."""
        try:
            await self.run(sqlite3.Connection.close)
        finally:
            self._executor.shutdown(wait=False)


class EvaluationStore:
    """Durable state of the server; open it once, close it once."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._writer: _Connection | None = None
        self._reader: _Connection | None = None
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._finished = _FinishedCache(FINISHED_CACHE_CHARS)
        # Baselines are few and read by every benchmark-mode evaluation.
        self._baselines: dict[str, dict[str, float]] = {}

    @property
    def path(self) -> Path:
        """Return the SQLite file."""
        return self._path

    async def open(self) -> None:
        """Open both connections, create the schema and start the writer task."""
        try:
            await asyncio.to_thread(
                self._path.parent.mkdir, parents=True, exist_ok=True
            )
            self._writer = await _Connection.open(
                self._path,
                "store-writer",
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",
                "PRAGMA busy_timeout=10000",
            )
            await self._writer.run(sqlite3.Connection.executescript, _SCHEMA)
            self._reader = await _Connection.open(
                self._path, "store-reader", "PRAGMA query_only=ON"
            )
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StoreError(
                f"cannot open the store {str(self._path)!r}: {exc}"
            ) from exc
        self._writer_task = asyncio.create_task(self._write_loop(), name="store-writer")

    async def close(self) -> None:
        """Commit what is pending, stop the writer and close both connections."""
        if self._writer_task is not None:
            self._queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        for connection in (self._reader, self._writer):
            if connection is not None:
                await connection.close()
        self._reader = self._writer = None

    # -- evaluations -------------------------------------------------------

    async def add(self, record: EvaluationRecord) -> tuple[EvaluationRecord, bool]:
        """Insert a new evaluation; return ``(record, created)``.

        When another evaluation already has the record's idempotency key, that
        one is returned with ``created=False`` and nothing is inserted.
        """
        [added] = await self.add_many([record])
        return added

    async def add_many(
        self, records: Sequence[EvaluationRecord]
    ) -> list[tuple[EvaluationRecord, bool]]:
        """Insert new evaluations in one commit; return what :meth:`add` would
        have returned for each, in order.

        A key that an earlier record of the same call takes counts as taken.
        """
        if not records:
            return []
        rows = [_row(record) for record in records]

        def op(db: sqlite3.Connection) -> list[tuple[EvaluationRecord, bool]]:
            added = []
            for record, row in zip(records, rows, strict=True):
                cursor = db.execute(
                    f"INSERT INTO evaluations ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (idempotency_key) DO NOTHING",
                    row,
                )
                if cursor.rowcount == 1:
                    added.append((record, True))
                    continue
                key = record.idempotency_key
                existing = _select(db, "idempotency_key = ?", (key,))
                if not existing:  # pragma: no cover - the conflict proves it exists
                    raise StoreError(f"evaluation {record.id!r} could not be stored")
                added.append((existing[0], False))
            return added

        result: list[tuple[EvaluationRecord, bool]] = await self._write(op)
        return result

    async def get(self, evaluation_id: str) -> EvaluationRecord | None:
        """Return one evaluation, or None when there is no such id."""
        records = await self.get_many((evaluation_id,))
        return records.get(evaluation_id)

    async def find_by_key(self, idempotency_key: str) -> EvaluationRecord | None:
        """Return the evaluation submitted with this idempotency key, if any."""
        records = await self._read(_select, "idempotency_key = ?", (idempotency_key,))
        return records[0] if records else None

    async def find_by_keys(self, keys: Iterable[str]) -> dict[str, EvaluationRecord]:
        """Return the evaluations submitted with any of these keys, by key."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        records = await self._read(_select, f"idempotency_key IN ({marks})", wanted)
        return {record.idempotency_key or "": record for record in records}

    async def get_many(self, ids: Iterable[str]) -> dict[str, EvaluationRecord]:
        """Return the evaluations among ``ids`` that exist, by id."""
        found: dict[str, EvaluationRecord] = {}
        wanted: list[str] = []
        for evaluation_id in dict.fromkeys(ids):
            record = self._finished.get(evaluation_id)
            if record is not None:
                found[evaluation_id] = record
            else:
                wanted.append(evaluation_id)
        if not wanted:
            return found

        marks = ",".join("?" * len(wanted))
        for record in await self._read(_select, f"id IN ({marks})", wanted):
            found[record.id] = record
            self._finished.put(record)
        return found

    def mark_running(
        self, record: EvaluationRecord, started_at: float
    ) -> EvaluationRecord:
        """Queue the note that grading started (one more attempt); return the
        record as that note makes it.

        Nothing need wait for the commit: writes commit in the order they were
        queued, so the evaluation's outcome can never be committed before this.
        A failure is logged.
        """

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE evaluations SET status = 'running', started_at = ?, "
                "attempts = attempts + 1 WHERE id = ?",
                (started_at, record.id),
            )

        self._queue_write(op).add_done_callback(_log_failed_note)
        return dataclasses.replace(
            record,
            status=Status.RUNNING,
            started_at=started_at,
            attempts=record.attempts + 1,
        )

    async def finish(
        self,
        record: EvaluationRecord,
        *,
        status: Status,
        outcome: Outcome,
        finished_at: float,
    ) -> EvaluationRecord:
        """Record an evaluation's final status and outcome; return it finished.

        ``record`` is the evaluation as it stands: what :meth:`mark_running`
        returned when grading started, so its start and attempts are current.
        """
        values = (status.value, outcome.model_dump_json(), finished_at, record.id)

        def op(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "UPDATE evaluations SET status = ?, outcome = ?, finished_at = ? "
                "WHERE id = ?",
                values,
            )
            return cursor.rowcount

        if await self._write(op) != 1:
            raise StoreError(f"evaluation {record.id!r} is not in the store")
        finished = dataclasses.replace(
            record, status=status, outcome=outcome, finished_at=finished_at
        )
        self._finished.put(finished)
        return finished

    async def requeue_unfinished(self) -> list[EvaluationRecord]:
        """Requeue interrupted evaluations; return all unfinished ones, oldest first."""

        def op(db: sqlite3.Connection) -> list[EvaluationRecord]:
            db.execute(
                "UPDATE evaluations SET status = 'queued' WHERE status = 'running'"
            )
            return _select(db, "status IN ('queued', 'running') ORDER BY seq", ())

        records: list[EvaluationRecord] = await self._write(op)
        return records

    async def count_by_status(self) -> dict[Status, int]:
        """Return how many evaluations the store holds per status."""
        rows = await self._read(
            _fetch_all, "SELECT status, COUNT(*) FROM evaluations GROUP BY status", ()
        )
        return {Status(status): count for status, count in rows}

    # -- baselines ---------------------------------------------------------

    async def get_baseline(self, key: str) -> dict[str, float] | None:
        """Return the cached baseline benchmark times under ``key``, if any."""
        times = self._baselines.get(key)
        if times is None:
            rows = await self._read(
                _fetch_all, "SELECT times FROM baselines WHERE key = ?", (key,)
            )
            if not rows:
                return None
            times = self._baselines.setdefault(key, json.loads(rows[0][0]))
        return dict(times)

    async def put_baseline(self, key: str, times: dict[str, float]) -> None:
        """Cache baseline benchmark times under ``key`` (replacing older ones)."""
        values = (key, json.dumps(times), time.time())

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO baselines (key, times, created_at) "
                "VALUES (?, ?, ?)",
                values,
            )

        await self._write(op)
        self._baselines[key] = dict(times)

    # -- exec results ------------------------------------------------------

    async def get_exec_result(
        self, container_id: str, idempotency_key: str
    ) -> dict[str, Any] | None:
        """Return the stored result of an exec with this key, if any."""
        rows = await self._read(
            _fetch_all,
            "SELECT result FROM exec_results "
            "WHERE container_id = ? AND idempotency_key = ?",
            (container_id, idempotency_key),
        )
        if not rows:
            return None
        result: dict[str, Any] = json.loads(rows[0][0])
        return result

    async def put_exec_result(
        self, container_id: str, idempotency_key: str, result: dict[str, Any]
    ) -> None:
        """Store the first result of an exec with this key."""
        values = (container_id, idempotency_key, json.dumps(result), time.time())

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR IGNORE INTO exec_results "
                "(container_id, idempotency_key, result, created_at) "
                "VALUES (?, ?, ?, ?)",
                values,
            )

        await self._write(op)

    async def get_created_container(
        self, idempotency_key: str
    ) -> dict[str, Any] | None:
        """Return the container created under this key, if any."""
        rows = await self._read(
            _fetch_all,
            "SELECT container FROM created_containers WHERE idempotency_key = ?",
            (idempotency_key,),
        )
        if not rows:
            return None
        container: dict[str, Any] = json.loads(rows[0][0])
        return container

    async def put_created_container(
        self, idempotency_key: str, container_id: str, container: dict[str, Any]
    ) -> None:
        """Store the container created under this key."""
        values = (idempotency_key, container_id, json.dumps(container), time.time())

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR IGNORE INTO created_containers "
                "(idempotency_key, container_id, container, created_at) "
                "VALUES (?, ?, ?, ?)",
                values,
            )

        await self._write(op)

    async def forget_container(self, container_id: str) -> None:
        """Forget a removed container's exec results and creation key."""

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM exec_results WHERE container_id = ?", (container_id,)
            )
            db.execute(
                "DELETE FROM created_containers WHERE container_id = ?",
                (container_id,),
            )

        await self._write(op)

    # -- plumbing ----------------------------------------------------------

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read on the read connection, or raise when the store is closed."""
        if self._reader is None:
            raise StoreError(f"the store {str(self._path)!r} is not open")
        try:
            return await self._reader.run(fn, *args)
        except sqlite3.Error as exc:
            raise _store_error(
                f"cannot read the store {str(self._path)!r}: {exc}", exc
            ) from exc

    async def _write(self, op: _Op) -> Any:
        """Queue a write and return its result once it is committed."""
        # NOTE: shielded so that a caller cancelled mid-write does not leave
        # the writer with an orphaned future; the write still commits.
        return await asyncio.shield(self._queue_write(op))

    def _queue_write(self, op: _Op) -> asyncio.Future[Any]:
        """Queue a write; return the future of its commit."""
        if self._writer_task is None or self._writer_task.done():
            raise StoreError(f"the store {str(self._path)!r} is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Write(op, future))
        return future

    async def _write_loop(self) -> None:
        """Commit queued writes in batches until close() sends None."""
        stopping = False
        while not stopping:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            writes = [write for write in batch if write is not None]
            stopping = len(writes) != len(batch)
            if writes:
                await self._commit(writes)

    async def _commit(self, writes: list[_Write]) -> None:
        """Run writes in one transaction; when it fails, run each on its own."""
        db = self._writer
        try:
            if db is None:
                raise StoreError("the store is closed")
            results = await db.run(_transaction, [write.op for write in writes])
        except Exception as exc:
            if len(writes) > 1:
                # One bad write must not fail the others batched with it.
                for write in writes:
                    await self._commit([write])
                return
            error = exc
            if not isinstance(exc, StoreError):
                error = _store_error(
                    f"cannot write to the store {str(self._path)!r}: {exc}", exc
                )
                error.__cause__ = exc
            _settle(writes[0].future, exception=error)
            return

        for write, result in zip(writes, results, strict=True):
            _settle(write.future, result=result)


_PASSING_FAILURES = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED")
"""SQLite result codes (and their extended forms) of failures that may pass."""


def _store_error(message: str, exc: BaseException) -> StoreError:
    """Return the StoreError for a driver failure: StoreUnavailable if it may pass."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_PASSING_FAILURES):
        return StoreUnavailable(message)
    return StoreError(message)


def _transaction(db: sqlite3.Connection, ops: list[_Op]) -> list[Any]:
    """Run ops inside BEGIN ... COMMIT; roll back and re-raise on error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        results = [op(db) for op in ops]
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return results


def _log_failed_note(future: asyncio.Future[None]) -> None:
    """Log a write nobody awaits, if it failed."""
    if not future.cancelled() and future.exception() is not None:
        logger.error("cannot note a start in the store: %s", future.exception())


def _settle(
    future: asyncio.Future[Any],
    *,
    result: Any = None,
    exception: BaseException | None = None,
) -> None:
    """Complete a write's future unless its caller already gave up."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


def _fetch_all(
    db: sqlite3.Connection, sql: str, params: Iterable[Any]
) -> list[tuple[Any, ...]]:
    """Return every row of a query."""
    return db.execute(sql, tuple(params)).fetchall()


def _select(
    db: sqlite3.Connection, where: str, params: Iterable[Any]
) -> list[EvaluationRecord]:
    """Return the evaluations matching a WHERE clause."""
    rows = _fetch_all(db, f"SELECT {_COLUMNS} FROM evaluations WHERE {where}", params)
    return [_record_from_row(row) for row in rows]
