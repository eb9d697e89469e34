"""The results file: one JSON line per graded submission, appended durably."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from agent_v2._runs._submissions import Submission, SubmissionKey, key_digest
from agent_v2.client import EvaluationResult
from agent_v2.errors import ConfigError
from agent_v2.protocol import Outcome

__all__ = [
    "DETAIL_CHARS",
    "ExistingResults",
    "ResultsFile",
    "iter_records",
    "not_submitted_record",
    "outcome_record",
    "record_key",
    "refused_record",
]

logger = logging.getLogger(__name__)

DETAIL_CHARS = 4000  # of error_detail kept in a record
PREVIEW_CHARS = 200  # of stdout kept, as evaluation_info's stdout_preview


@dataclasses.dataclass(frozen=True)
class ExistingResults:
    """What a results file held before this run.

    ``digests`` are the key digests of its records (see ``key_digest``);
    ``dropped_partial`` says a truncated last line, left by a crash, was cut.
    """

    digests: frozenset[bytes]
    records: int
    unreadable: int
    dropped_partial: bool


class ResultsFile:
    """Appends result records to a JSONL file, each flushed and fsynced.

    Held with an exclusive lock while open, so two runs cannot interleave
    their lines in one file. Appends that arrive while one is being written
    go out together in the next write (one fsync for all of them).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self._lock = asyncio.Lock()
        self._pending: list[bytes] = []

    async def __aenter__(self) -> ResultsFile:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> ExistingResults:
        """Lock the file, read what it holds, cut a partial last line."""
        if self._file is not None:
            raise RuntimeError(f"{self.path} is already open")
        existing, self._file = await asyncio.to_thread(self._open)
        if existing.dropped_partial:
            logger.warning(
                "%s ended with a partial line (a run was cut short); removed it, "
                "its submission will be graded again",
                self.path,
            )
        return existing

    async def append(self, record: Mapping[str, Any]) -> None:
        """Write one record; return once it is on disk."""
        if self._file is None:
            raise RuntimeError(f"{self.path} is not open")
        self._pending.append(json.dumps(record, separators=(",", ":")).encode())
        async with self._lock:
            if not self._pending:
                return  # the write before ours took our line along
            lines, self._pending = self._pending, []
            await asyncio.to_thread(_write_lines, self._file, lines)

    async def close(self) -> None:
        """Release the lock and close the file."""
        file, self._file = self._file, None
        if file is not None:
            await asyncio.to_thread(file.close)

    def _open(self) -> tuple[ExistingResults, IO[bytes]]:
        """Open for appending under a lock; scan and repair the existing lines."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = self.path.open("a+b")
        except OSError as exc:
            raise ConfigError(
                f"cannot open the results file {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            _lock(file, self.path)
            existing = _scan(file)
        except BaseException:
            file.close()
            raise
        return existing, file


def _lock(file: IO[bytes], path: Path) -> None:
    """Take the exclusive lock of a results file, or say who holds it."""
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"{path} is being written by another 'agent-v2 evaluate'; wait for "
            "it to finish or pass another --output"
        ) from None


def _scan(file: IO[bytes]) -> ExistingResults:
    """Collect the keys of complete records; truncate a partial last line."""
    digests: set[bytes] = set()
    records = unreadable = end = 0
    file.seek(0)
    for raw in file:
        if not raw.endswith(b"\n"):
            break
        end += len(raw)
        key = _key_of_line(raw)
        if key is None:
            unreadable += raw.strip() != b""
            continue
        digests.add(key_digest(key))
        records += 1

    size = file.seek(0, os.SEEK_END)
    if size > end:
        file.truncate(end)
        os.fsync(file.fileno())
    return ExistingResults(frozenset(digests), records, unreadable, size > end)


def _key_of_line(raw: bytes) -> SubmissionKey | None:
    """Return the key of a record line, or None when it is not a record."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return record_key(record)


def _write_lines(file: IO[bytes], lines: list[bytes]) -> None:
    """Append lines and force them to disk."""
    file.write(b"".join(line + b"\n" for line in lines))
    file.flush()
    os.fsync(file.fileno())


def record_key(record: Any) -> SubmissionKey | None:
    """Return the submission key a result record was written for, or None."""
    if not isinstance(record, dict):
        return None
    container_id, instance_id, mode = (
        record.get("container_id"),
        record.get("instance_id"),
        record.get("mode"),
    )
    dataset_name, split = record.get("dataset_name"), record.get("split")
    if not (
        isinstance(container_id, str)
        and isinstance(instance_id, str)
        and isinstance(mode, str)
        and (dataset_name is None or isinstance(dataset_name, str))
        and (split is None or isinstance(split, str))
    ):
        return None
    return (container_id, instance_id, dataset_name, split, mode)


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the result records of a file, one line in memory at a time."""
    with contextlib.suppress(FileNotFoundError), path.open("rb") as file:
        for raw in file:
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if record_key(record) is not None:
                yield record


# -- records ------------------------------------------------------------------


def _base(submission: Submission) -> dict[str, Any]:
    """Return the fields every record has: where the submission came from."""
    return {
        "line": submission.line,
        "exit_status": submission.exit_status,
        "container_id": submission.container_id,
        "instance_id": submission.instance_id,
        "dataset_name": submission.dataset_name,
        "split": submission.split,
        "mode": submission.mode.value,
    }


def outcome_record(submission: Submission, result: EvaluationResult) -> dict[str, Any]:
    """Return the record of a submission the server graded."""
    outcome: Outcome = result.outcome
    reward, speedup = (
        (outcome.reward, outcome.speedup) if outcome.success else (0.0, -1.0)
    )
    return {
        **_base(submission),
        "success": outcome.success,
        "reward": reward,
        "speedup": speedup,
        "error": outcome.error,
        "error_detail": _clip(outcome.error_detail),
        "infra_failure": outcome.infra_failure,
        "exit_code": outcome.exit_code,
        "timed_out": outcome.timed_out,
        "gpu_id": outcome.gpu_id,
        "device": outcome.device,
        "evaluation_id": result.evaluation_id,
        "api": result.api,
        "duration_sec": round(result.duration, 3),
        "timings": {step: round(s, 3) for step, s in outcome.timings.items()},
        "stdout_preview": outcome.stdout[:PREVIEW_CHARS],
        "graded_at": round(time.time(), 3),
    }


def refused_record(submission: Submission, error: str, detail: str) -> dict[str, Any]:
    """Return the record of a submission the server refused for good (a 4xx)."""
    return {
        **_base(submission),
        "success": False,
        "reward": 0.0,
        "speedup": -1.0,
        "error": error,
        "error_detail": _clip(detail),
        "infra_failure": False,
        "graded_at": round(time.time(), 3),
    }


def not_submitted_record(submission: Submission) -> dict[str, Any]:
    """Return the record of a run that was not submitted, so not graded."""
    detail = (
        f"exit_status is {submission.exit_status!r}, not 'Submitted'; "
        "no evaluation was requested"
    )
    return refused_record(submission, "not_submitted", detail)


def _clip(text: str | None) -> str | None:
    """Return at most DETAIL_CHARS of a detail text."""
    if text is None or len(text) <= DETAIL_CHARS:
        return text
    return text[:DETAIL_CHARS] + "..."
