"""Which failures may be retried, and how long a server asked us to wait.

A request is retried only when doing it twice cannot do harm:

- it never reached the server (the connection could not be opened), or
- the server refused it before doing any work (429, 503), or
- it is idempotent (a GET, a DELETE, a wait, or a POST that carries an
  ``Idempotency-Key``) and the connection broke or a gateway answered
  502/503/504.

The legacy ``POST /evaluate_v3`` has no idempotency key, so a dropped
connection after it was sent is never retried: that could grade twice.

Most retries stop after ``RetryPolicy.max_attempts``. Two kinds go on: a
server that is away (cannot be reached, or answers 503) is asked again for
up to ``RetryPolicy.outage_grace`` seconds, so calls ride through a restart;
a 429 is retried for as long as the call's time budget lasts, since the
server is up and asked us to come back.
"""

from __future__ import annotations

import email.utils
import math
import time

import aiohttp

__all__ = [
    "RETRY_STATUSES",
    "is_retryable_error",
    "is_retryable_status",
    "is_unreachable",
    "parse_retry_after",
]

RETRY_STATUSES = frozenset({429, 502, 503, 504})

# Statuses that say the server did nothing with the request.
_REFUSED_STATUSES = frozenset({429, 503})


def is_retryable_status(status: int, *, idempotent: bool) -> bool:
    """Return whether an answer with this status may be retried."""
    if status in _REFUSED_STATUSES:
        return True
    return idempotent and status in RETRY_STATUSES


def is_unreachable(exc: BaseException) -> bool:
    """Return whether ``exc`` says the server could not be reached at all."""
    unreachable = aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
    return isinstance(exc, unreachable)


def is_retryable_error(exc: BaseException, *, idempotent: bool) -> bool:
    """Return whether a request that raised ``exc`` may be retried."""
    # NOTE: ClientConnectorError and ConnectionTimeoutError mean no byte of
    # the request left this process, so even a non-idempotent call is safe.
    if is_unreachable(exc):
        return True
    if not idempotent:
        return False
    return isinstance(
        exc,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | aiohttp.ClientPayloadError,
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Return the seconds a ``Retry-After`` header asks for, or None.

    Both forms are accepted: delay seconds (``"3"``, ``"0.5"``) and an HTTP
    date. Garbage gives None, so the normal backoff applies instead.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()

    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None

    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)
