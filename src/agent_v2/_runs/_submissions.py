"""Submissions files: one JSON submission per line, parsed and keyed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import IO, Any

import pydantic

from agent_v2.protocol import EvaluationRequest, Mode

__all__ = [
    "SUBMITTED",
    "LineReader",
    "Malformed",
    "Submission",
    "SubmissionKey",
    "count_lines",
    "key_digest",
    "parse_line",
    "request_key",
]

SUBMITTED = "Submitted"
MAX_ID_LENGTH = 256  # what the wire protocol accepts for ids
READ_BATCH = 512  # lines read per trip to the file thread

SubmissionKey = tuple[str, str, str | None, str | None, str]
"""``(container_id, instance_id, dataset_name, split, mode)``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Submission:
    """One line of a submissions file: an agent's finished run.

    ``result`` is not kept: grading never reads it, and it can be large.
    """

    line: int
    exit_status: str | None
    container_id: str
    instance_id: str
    dataset_name: str | None = None
    split: str | None = None
    mode: Mode = Mode.BENCHMARK

    @property
    def submitted(self) -> bool:
        """Return whether the agent submitted (only then is it graded)."""
        return self.exit_status == SUBMITTED

    @property
    def key(self) -> SubmissionKey:
        """Return what identifies this submission across reruns."""
        return (
            self.container_id,
            self.instance_id,
            self.dataset_name,
            self.split,
            self.mode.value,
        )

    def request(self) -> EvaluationRequest:
        """Return the evaluation request that grades this submission."""
        return EvaluationRequest(
            instance_id=self.instance_id,
            container_id=self.container_id,
            dataset_name=self.dataset_name,
            split=self.split,
            mode=self.mode,
        )


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A line that is not a valid submission, and why."""

    line: int
    problem: str


def key_digest(key: SubmissionKey) -> bytes:
    """Return a 16-byte digest of a key; reruns keep these, not whole keys."""
    text = json.dumps(key, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def request_key(request: EvaluationRequest) -> SubmissionKey:
    """Return the key of the submission an evaluation request was made for."""
    return (
        request.container_id,
        request.instance_id,
        request.dataset_name,
        request.split,
        request.mode.value,
    )


def parse_line(number: int, raw: bytes | str) -> Submission | Malformed:
    """Parse one line; a problem comes back as Malformed, naming the field."""
    try:
        # utf-8-sig: a BOM that an editor put before the first line is dropped
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        return Malformed(number, f"not valid UTF-8 at byte {exc.start}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Malformed(number, f"invalid JSON at column {exc.colno}: {exc.msg}")
    except RecursionError:
        return Malformed(number, "invalid JSON: nested too deeply")
    if not isinstance(data, dict):
        return Malformed(number, f"expected a JSON object, got {_describe(data)}")

    try:
        submission = Submission(
            line=number,
            exit_status=_exit_status(data),
            container_id=_id(data, "container_id"),
            instance_id=_id(data, "instance_id"),
            dataset_name=_optional_name(data, "dataset_name"),
            split=_optional_name(data, "split"),
            mode=_mode(data),
        )
        submission.request()  # the same checks the server will make
    except _FieldError as exc:
        return Malformed(number, str(exc))
    except pydantic.ValidationError as exc:
        return Malformed(number, f"not a valid evaluation request: {exc}")
    return submission


class _FieldError(ValueError):
    """A field of a submission line is missing or has the wrong type."""


def _id(data: dict[str, Any], field: str) -> str:
    """Return a required, non-blank id field."""
    if field not in data:
        raise _FieldError(f"field {field!r} is missing")
    value = data[field]
    if not isinstance(value, str) or not value.strip():
        raise _FieldError(
            f"field {field!r} must be a non-empty string, got {_describe(value)}"
        )
    if len(value) > MAX_ID_LENGTH:
        raise _FieldError(
            f"field {field!r} must be at most {MAX_ID_LENGTH} characters, "
            f"got {len(value)}"
        )
    return value


def _exit_status(data: dict[str, Any]) -> str | None:
    """Return the required ``exit_status`` field: a string, or null."""
    if "exit_status" not in data:
        raise _FieldError("field 'exit_status' is missing (null is allowed)")
    value = data["exit_status"]
    if value is not None and not isinstance(value, str):
        raise _FieldError(
            f"field 'exit_status' must be a string or null, got {_describe(value)}"
        )
    return value


def _optional_name(data: dict[str, Any], field: str) -> str | None:
    """Return ``dataset_name`` or ``split``: absent, null, or a non-blank string."""
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _FieldError(
            f"field {field!r} must be a string or null, got {_describe(value)}"
        )
    if not value.strip() or len(value) > MAX_ID_LENGTH:
        raise _FieldError(
            f"field {field!r} must be 1 to {MAX_ID_LENGTH} characters and "
            f"not blank, got {value[:60]!r}"
        )
    return value


def _mode(data: dict[str, Any]) -> Mode:
    """Return the optional ``mode`` field; ``benchmark`` when absent or null."""
    value = data.get("mode")
    if value is None:
        return Mode.BENCHMARK
    try:
        return Mode(value)
    except ValueError:
        choices = ", ".join(mode.value for mode in Mode)
        raise _FieldError(
            f"field 'mode' must be one of {choices}, got {_describe(value)}"
        ) from None


def _describe(value: Any) -> str:
    """Return a short description of a JSON value for a problem message."""
    kinds = {type(None): "null", bool: "a boolean", str: "a string"}
    kinds.update({int: "a number", float: "a number", list: "an array"})
    kind = kinds.get(type(value), "an object")
    if kind in ("an array", "an object"):
        return kind
    shown = repr(value)
    return f"{kind} ({shown[:57] + '...' if len(shown) > 60 else shown})"


class LineReader:
    """Reads a submissions file in batches of numbered, non-blank lines."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._number = 0

    def read_batch(self, size: int = READ_BATCH) -> list[tuple[int, bytes]]:
        """Return up to ``size`` ``(line number, raw line)`` pairs; [] at the end.

        Blank lines are skipped but counted, so numbers match an editor's.
        """
        batch: list[tuple[int, bytes]] = []
        while len(batch) < size:
            raw = self._file.readline()
            if not raw:
                break
            self._number += 1
            if raw.strip():
                batch.append((self._number, raw))
        return batch


def count_lines(path: Path) -> int:
    """Return how many non-blank lines a file has, one line in memory at a time."""
    with path.open("rb") as file:
        return sum(1 for raw in file if raw.strip())
