"""Frozen settings of the client: connection limits, timeouts, retries, auth."""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable, Mapping
from typing import Any, Literal

from agent_v2.errors import ConfigError
from agent_v2.protocol import MAX_BATCH_SUBMISSIONS, MAX_WAIT_IDS, MAX_WAIT_SECONDS

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LONG_POLL",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PER_HOST",
    "DEFAULT_MAX_WAIT_REQUESTS",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "ENV_VARS",
    "ApiChoice",
    "ClientConfig",
    "Limits",
    "RetryPolicy",
    "Timeouts",
]

DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_MAX_PER_HOST = 50
DEFAULT_MAX_WAIT_REQUESTS = 4
DEFAULT_TOTAL_TIMEOUT = 3600.0
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_LONG_POLL = 30.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_OUTAGE_GRACE = 120.0
DEFAULT_SUBMIT_CHUNK = 500

ApiChoice = Literal["auto", "v1", "legacy"]
_API_CHOICES: tuple[ApiChoice, ...] = ("auto", "v1", "legacy")

#: Environment variables read by :meth:`ClientConfig.from_env`.
ENV_VARS = {
    "AGENT_V2_EVAL_TIMEOUT": "seconds one evaluation may take, end to end",
    "AGENT_V2_CONNECT_TIMEOUT": "seconds to open a TCP connection",
    "AGENT_V2_READ_TIMEOUT": "seconds of silence allowed on a short request",
    "AGENT_V2_MAX_CONNECTIONS": "connections per event loop, all servers together",
    "AGENT_V2_MAX_PER_HOST": "connections per event loop to one server",
    "AGENT_V2_MAX_IN_FLIGHT": "evaluations in flight per event loop (unset: no limit)",
    "AGENT_V2_MAX_ATTEMPTS": "attempts per request, the first one included",
    "AGENT_V2_TOKEN": "bearer token sent to the server",
    "AGENT_V2_API": "auto, v1 or legacy: which server API to use",
}


def _check_positive(owner: str, name: str, value: float | None) -> None:
    """Raise ConfigError unless value is a finite number above zero (or None)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{owner}.{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{owner}.{name} must be above 0, got {value!r}")


def _check_count(owner: str, name: str, value: int | None) -> None:
    """Raise ConfigError unless value is an int of at least 1 (or None)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """How many connections, requests and evaluations one event loop may use.

    ``max_connections`` and ``max_per_host`` size the connection pool.
    ``max_in_flight`` bounds the evaluations one event loop runs at once
    (``None``: no bound; the server answers 429 when its queue is full).
    ``max_wait_requests`` bounds the long-polls one waiter keeps open.
    """

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_host: int = DEFAULT_MAX_PER_HOST
    max_in_flight: int | None = None
    max_wait_requests: int = DEFAULT_MAX_WAIT_REQUESTS

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_count("Limits", field.name, getattr(self, field.name))
        if self.max_per_host > self.max_connections:
            raise ConfigError(
                f"Limits.max_per_host ({self.max_per_host}) must not exceed "
                f"Limits.max_connections ({self.max_connections})"
            )

    @property
    def requests_per_host(self) -> int:
        """Return how many requests may run at once against one server."""
        return min(self.max_per_host, self.max_connections)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timeouts:
    """Time bounds, in seconds.

    ``total`` bounds one evaluation from its first request to its outcome
    (``None``: unbounded). ``connect`` bounds opening a TCP connection.
    ``read`` bounds the silence on a short request; a long-poll adds its own
    wait to it, so a healthy long-poll is never cut. ``long_poll`` is how
    long the server may hold one wait request.
    """

    total: float | None = DEFAULT_TOTAL_TIMEOUT
    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT
    long_poll: float = DEFAULT_LONG_POLL

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_positive("Timeouts", field.name, getattr(self, field.name))
        if self.long_poll > MAX_WAIT_SECONDS:
            raise ConfigError(
                f"Timeouts.long_poll must be at most {MAX_WAIT_SECONDS:g} s "
                f"(the server's limit), got {self.long_poll!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When and how long to wait before trying a request again.

    Only connection errors, 502/503/504 and 429 are retried (see
    ``agent_v2.client._retry``). The delay before attempt ``n + 1`` is drawn
    from ``[b / 2, b]`` with ``b = min(backoff_max, backoff_initial *
    backoff_multiplier ** (n - 1))``; a ``Retry-After`` header on 429/503
    (capped at ``retry_after_max``) is the least it waits; the longer of it
    and a backoff drawn from ``[0, b]`` is used.

    ``outage_grace`` is how long a server that is away (restarting, say:
    unreachable, or answering 503) is asked again past ``max_attempts``, by
    every request and by a waiter before it fails the evaluations it waits
    for. A 429 is retried past ``max_attempts`` for as long as the call's
    time budget (``Timeouts.total`` for an evaluation) lasts.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_initial: float = 0.25
    backoff_multiplier: float = 2.0
    backoff_max: float = 10.0
    retry_after_max: float = 60.0
    outage_grace: float = DEFAULT_OUTAGE_GRACE

    def __post_init__(self) -> None:
        _check_count("RetryPolicy", "max_attempts", self.max_attempts)
        names = ("backoff_initial", "backoff_max", "retry_after_max", "outage_grace")
        for name in names:
            _check_positive("RetryPolicy", name, getattr(self, name))
        if self.backoff_multiplier < 1:
            raise ConfigError(
                "RetryPolicy.backoff_multiplier must be >= 1, "
                f"got {self.backoff_multiplier!r}"
            )

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> float:
        """Return the seconds to sleep after failed attempt number ``attempt``."""
        exponent = min(attempt - 1, 64)  # 2.0 ** 1000 would overflow
        ceiling = min(
            self.backoff_max,
            self.backoff_initial * self.backoff_multiplier**exponent,
        )
        if retry_after is None:
            return rng(ceiling / 2, ceiling)

        # A little jitter on top, so clients told the same Retry-After do not
        # all come back in the same millisecond. NOTE: a backoff drawn from
        # [0, b] still applies when it is longer: thousands of clients refused
        # again and again (a full queue) must spread out, not return every
        # second, yet some must come back soon to keep the queue fed.
        wait = min(max(retry_after, 0.0), self.retry_after_max)
        return max(wait + rng(0.0, wait / 10), rng(0.0, ceiling))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Everything an :class:`~agent_v2.client.EvalClient` needs besides its URL.

    ``api`` picks the server API: ``"auto"`` tries the versioned API and falls
    back to the legacy ``POST /evaluate_v3`` when the server lacks it. The
    token is sent as ``Authorization: Bearer ...`` and never shown by ``repr``.
    With ``batch_submit``, submissions started together on one loop go out in
    ``POST /v1/evaluations/batch`` requests of up to ``submit_chunk`` each
    (one by one where the server lacks that endpoint).
    """

    limits: Limits = dataclasses.field(default_factory=Limits)
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    token: str | None = None
    api: ApiChoice = "auto"
    wait_chunk: int = MAX_WAIT_IDS
    batch_submit: bool = True
    submit_chunk: int = DEFAULT_SUBMIT_CHUNK

    def __post_init__(self) -> None:
        if self.token is not None and (
            not isinstance(self.token, str) or not self.token.strip()
        ):
            raise ConfigError("ClientConfig.token must be a non-empty string or None")
        if self.api not in _API_CHOICES:
            raise ConfigError(
                f"ClientConfig.api must be one of {', '.join(_API_CHOICES)}, "
                f"got {self.api!r}"
            )
        _check_count("ClientConfig", "wait_chunk", self.wait_chunk)
        if self.wait_chunk > MAX_WAIT_IDS:
            raise ConfigError(
                f"ClientConfig.wait_chunk must be at most {MAX_WAIT_IDS}, "
                f"got {self.wait_chunk!r}"
            )
        if not isinstance(self.batch_submit, bool):
            raise ConfigError(
                f"ClientConfig.batch_submit must be True or False, "
                f"got {self.batch_submit!r}"
            )
        _check_count("ClientConfig", "submit_chunk", self.submit_chunk)
        if self.submit_chunk > MAX_BATCH_SUBMISSIONS:
            raise ConfigError(
                f"ClientConfig.submit_chunk must be at most {MAX_BATCH_SUBMISSIONS}, "
                f"got {self.submit_chunk!r}"
            )

    def __repr__(self) -> str:
        token = None if self.token is None else "***"
        return (
            f"ClientConfig(limits={self.limits!r}, timeouts={self.timeouts!r}, "
            f"retry={self.retry!r}, token={token!r}, api={self.api!r}, "
            f"wait_chunk={self.wait_chunk!r}, batch_submit={self.batch_submit!r}, "
            f"submit_chunk={self.submit_chunk!r})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientConfig:
        """Build a config from the ``AGENT_V2_*`` variables in ``ENV_VARS``."""
        env = os.environ if environ is None else environ
        try:
            return cls._from_env(env)
        except ConfigError as exc:
            if "environment variable" in str(exc):
                raise
            raise ConfigError(
                f"{exc} (read from the AGENT_V2_* environment variables)"
            ) from None

    @classmethod
    def _from_env(cls, env: Mapping[str, str]) -> ClientConfig:
        """Build a config from ``env``; errors name the field, not the variable."""
        limits = Limits(
            **_env_fields(
                env,
                max_connections=("AGENT_V2_MAX_CONNECTIONS", int),
                max_per_host=("AGENT_V2_MAX_PER_HOST", int),
                max_in_flight=("AGENT_V2_MAX_IN_FLIGHT", int),
            )
        )
        timeouts = Timeouts(
            **_env_fields(
                env,
                total=("AGENT_V2_EVAL_TIMEOUT", float),
                connect=("AGENT_V2_CONNECT_TIMEOUT", float),
                read=("AGENT_V2_READ_TIMEOUT", float),
            )
        )
        retry = RetryPolicy(
            **_env_fields(env, max_attempts=("AGENT_V2_MAX_ATTEMPTS", int))
        )

        api = env.get("AGENT_V2_API", "").strip() or "auto"
        if api not in _API_CHOICES:
            raise ConfigError(
                f"AGENT_V2_API must be one of {', '.join(_API_CHOICES)}, got {api!r}"
            )
        return cls(
            limits=limits,
            timeouts=timeouts,
            retry=retry,
            token=env.get("AGENT_V2_TOKEN", "").strip() or None,
            api=api,
        )


def _env_fields(
    env: Mapping[str, str], **fields: tuple[str, Callable[[str], float]]
) -> dict[str, Any]:
    """Return the fields whose variable is set, parsed; name the variable on error."""
    values: dict[str, Any] = {}
    for field, (name, kind) in fields.items():
        text = env.get(name, "").strip()
        if not text:
            continue
        try:
            values[field] = kind(text)
        except ValueError:
            raise ConfigError(
                f"environment variable {name}={text!r} is not a valid "
                f"{getattr(kind, '__name__', 'number')}; fix or unset it"
            ) from None
    return values
