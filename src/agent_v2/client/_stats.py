"""Counters of what the client is doing, readable from any thread."""

from __future__ import annotations

import dataclasses
import threading

__all__ = ["ClientStats", "Counters"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientStats:
    """A snapshot of one client's activity, across all its event loops.

    ``open_connections`` and ``connections_opened`` count the connection pools
    the client uses; clients that share a session pool share those numbers.
    """

    evaluations_in_flight: int
    evaluations_started: int
    evaluations_finished: int
    requests_in_flight: int
    requests: int
    retries: int
    wait_requests: int
    batch_requests: int
    open_connections: int
    connections_opened: int
    sessions: int


class Counters:
    """Thread-safe integer counters behind :class:`ClientStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` (may be negative) to the counter ``name``."""
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def get(self, name: str) -> int:
        """Return the counter ``name``, 0 when never touched."""
        with self._lock:
            return self._values.get(name, 0)
