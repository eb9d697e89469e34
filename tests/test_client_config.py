"""Tests of the client's config objects, retry rules and public names."""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest

import agent_v2.client
from agent_v2.client import (
    ClientConfig,
    EvalClient,
    Limits,
    RetryPolicy,
    Timeouts,
    validate_base_url,
)
from agent_v2.client._retry import (
    is_retryable_error,
    is_retryable_status,
    parse_retry_after,
)
from agent_v2.errors import ConfigError


def test_public_names_are_pinned() -> None:
    """The client package exports exactly these names."""
    assert sorted(agent_v2.client.__all__) == sorted(
        [
            "DEFAULT_CONNECT_TIMEOUT",
            "DEFAULT_LONG_POLL",
            "DEFAULT_MAX_ATTEMPTS",
            "DEFAULT_MAX_CONNECTIONS",
            "DEFAULT_MAX_PER_HOST",
            "DEFAULT_MAX_WAIT_REQUESTS",
            "DEFAULT_READ_TIMEOUT",
            "DEFAULT_TOTAL_TIMEOUT",
            "ENV_VARS",
            "ClientConfig",
            "ClientStats",
            "EvalClient",
            "Evaluated",
            "EvaluationResult",
            "Limits",
            "RetryPolicy",
            "SessionPool",
            "Timeouts",
            "validate_base_url",
        ]
    )
    for name in agent_v2.client.__all__:
        assert hasattr(agent_v2.client, name)


def test_defaults_match_the_original_client() -> None:
    """3600 s total, 100 connections, 50 per host: the original's defaults."""
    config = ClientConfig()
    assert config.timeouts.total == 3600.0
    assert config.limits.max_connections == 100
    assert config.limits.max_per_host == 50
    assert config.limits.max_in_flight is None
    assert config.api == "auto"


def test_config_objects_are_frozen_and_keyword_only() -> None:
    """Config objects cannot be changed after construction nor built positionally."""
    limits = Limits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_connections = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Limits(10, 5)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: Limits(max_connections=0), "Limits.max_connections"),
        (lambda: Limits(max_connections=10, max_per_host=20), "must not exceed"),
        (lambda: Limits(max_in_flight=0), "Limits.max_in_flight"),
        (lambda: Timeouts(total=-1), "Timeouts.total"),
        (lambda: Timeouts(connect=float("nan")), "Timeouts.connect"),
        (lambda: Timeouts(long_poll=301), "Timeouts.long_poll"),
        (lambda: RetryPolicy(max_attempts=0), "RetryPolicy.max_attempts"),
        (lambda: RetryPolicy(backoff_multiplier=0.5), "backoff_multiplier"),
        (lambda: RetryPolicy(outage_grace=0), "RetryPolicy.outage_grace"),
        (lambda: ClientConfig(token=" "), "token"),
        (lambda: ClientConfig(api="v2"), "ClientConfig.api"),  # type: ignore[arg-type]
    ],
)
def test_invalid_settings_are_refused_with_the_field_named(
    build: object, fragment: str
) -> None:
    """A bad setting raises ConfigError (a ValueError) naming the field."""
    with pytest.raises(ConfigError, match=fragment) as caught:
        build()  # type: ignore[operator]
    assert isinstance(caught.value, ValueError)


def test_repr_masks_the_token() -> None:
    """The token never appears in a config's repr, nor in a client's."""
    config = ClientConfig(token="s3cret-token")
    assert "s3cret" not in repr(config)
    assert "'***'" in repr(config)
    assert "s3cret" not in repr(EvalClient("http://127.0.0.1:1", config=config))


def test_from_env_reads_every_documented_variable() -> None:
    """from_env maps each AGENT_V2_* variable onto its field."""
    config = ClientConfig.from_env(
        {
            "AGENT_V2_EVAL_TIMEOUT": "120",
            "AGENT_V2_CONNECT_TIMEOUT": "5",
            "AGENT_V2_READ_TIMEOUT": "7.5",
            "AGENT_V2_MAX_CONNECTIONS": "20",
            "AGENT_V2_MAX_PER_HOST": "10",
            "AGENT_V2_MAX_IN_FLIGHT": "300",
            "AGENT_V2_MAX_ATTEMPTS": "2",
            "AGENT_V2_TOKEN": "abc",
            "AGENT_V2_API": "legacy",
        }
    )
    assert config.timeouts == Timeouts(total=120, connect=5, read=7.5)
    assert config.limits == Limits(
        max_connections=20, max_per_host=10, max_in_flight=300
    )
    assert config.retry.max_attempts == 2
    assert config.token == "abc"
    assert config.api == "legacy"
    assert set(agent_v2.client.ENV_VARS) == {
        "AGENT_V2_EVAL_TIMEOUT",
        "AGENT_V2_CONNECT_TIMEOUT",
        "AGENT_V2_READ_TIMEOUT",
        "AGENT_V2_MAX_CONNECTIONS",
        "AGENT_V2_MAX_PER_HOST",
        "AGENT_V2_MAX_IN_FLIGHT",
        "AGENT_V2_MAX_ATTEMPTS",
        "AGENT_V2_TOKEN",
        "AGENT_V2_API",
    }


def test_from_env_without_variables_gives_the_defaults() -> None:
    """An empty environment (or empty values) gives the default config."""
    assert ClientConfig.from_env({}) == ClientConfig()
    assert ClientConfig.from_env({"AGENT_V2_MAX_PER_HOST": " "}) == ClientConfig()


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"AGENT_V2_MAX_CONNECTIONS": "many"}, "AGENT_V2_MAX_CONNECTIONS='many'"),
        ({"AGENT_V2_EVAL_TIMEOUT": "1h"}, "AGENT_V2_EVAL_TIMEOUT"),
        ({"AGENT_V2_MAX_CONNECTIONS": "0"}, "environment variables"),
        ({"AGENT_V2_API": "v3"}, "AGENT_V2_API"),
    ],
)
def test_from_env_names_the_bad_variable(
    environ: dict[str, str], fragment: str
) -> None:
    """A variable that cannot be used raises ConfigError naming it."""
    with pytest.raises(ConfigError, match=fragment):
        ClientConfig.from_env(environ)


def test_backoff_is_capped_and_jittered() -> None:
    """Delays grow exponentially within [b/2, b] and never exceed backoff_max."""
    policy = RetryPolicy(backoff_initial=0.5, backoff_multiplier=2, backoff_max=3)
    lowest = [policy.delay(n, rng=lambda low, high: low) for n in (1, 2, 3, 4, 50)]
    highest = [policy.delay(n, rng=lambda low, high: high) for n in (1, 2, 3, 4, 50)]
    assert lowest == [0.25, 0.5, 1.0, 1.5, 1.5]
    assert highest == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert all(0.25 <= policy.delay(1) <= 0.5 for _ in range(100))


def test_retry_after_replaces_backoff_and_is_capped() -> None:
    """A Retry-After is honoured (plus at most 10% jitter) up to retry_after_max."""
    policy = RetryPolicy(retry_after_max=5)
    assert policy.delay(1, retry_after=2, rng=lambda low, high: low) == 2
    assert policy.delay(1, retry_after=2, rng=lambda low, high: high) == 2.2
    assert policy.delay(1, retry_after=600, rng=lambda low, high: low) == 5


def test_refused_again_and_again_backs_off_past_a_short_retry_after() -> None:
    """After many refusals the delay is the longer of Retry-After and a backoff
    drawn from [0, b], so a crowd of refused clients spreads out."""
    policy = RetryPolicy(backoff_initial=1, backoff_max=10)
    assert policy.delay(8, retry_after=1, rng=lambda low, high: high) == 10
    assert policy.delay(8, retry_after=1, rng=lambda low, high: low) == 1


def test_parse_retry_after_accepts_seconds_and_dates() -> None:
    """Retry-After may be seconds or an HTTP date; garbage gives None."""
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now=now) == 10.0


def test_only_safe_statuses_are_retried() -> None:
    """429/503 always; 502/504 only when idempotent; never 500 or 4xx."""
    assert is_retryable_status(429, idempotent=False)
    assert is_retryable_status(503, idempotent=False)
    assert not is_retryable_status(502, idempotent=False)
    assert is_retryable_status(502, idempotent=True)
    assert is_retryable_status(504, idempotent=True)
    for status in (400, 404, 409, 422, 500, 501):
        assert not is_retryable_status(status, idempotent=True)


def test_only_safe_errors_are_retried() -> None:
    """A refused connection always; a dropped one only when idempotent."""
    disconnected = aiohttp.ServerDisconnectedError()
    assert is_retryable_error(disconnected, idempotent=True)
    assert not is_retryable_error(disconnected, idempotent=False)
    assert is_retryable_error(aiohttp.ConnectionTimeoutError(), idempotent=False)
    assert not is_retryable_error(aiohttp.SocketTimeoutError(), idempotent=True)
    assert not is_retryable_error(ValueError("bug"), idempotent=True)


@pytest.mark.parametrize(
    "url",
    ["localhost:8000", "ftp://host", "http://", "http://h:99999", "http://h/?q=1"],
)
def test_invalid_urls_raise_value_error(url: str) -> None:
    """An unusable server URL raises ValueError up front, naming it."""
    with pytest.raises(ValueError, match="base_url"):
        validate_base_url(url)
    with pytest.raises(ValueError):
        EvalClient(url)


def test_url_of_the_wrong_type_raises_type_error() -> None:
    """A URL that is not a str raises TypeError."""
    with pytest.raises(TypeError, match="base_url must be a str"):
        EvalClient(b"http://127.0.0.1:1")  # type: ignore[arg-type]


def test_url_is_normalised() -> None:
    """Trailing slashes go, a path prefix (reverse proxy) stays."""
    assert validate_base_url("http://127.0.0.1:9528/") == "http://127.0.0.1:9528"
    assert validate_base_url("https://h/eval/") == "https://h/eval"
