"""The asynchronous client of the evaluation server.

``EvalClient`` submits evaluations, waits for their outcomes and drives
containers; ``ClientConfig`` with ``Limits``, ``Timeouts`` and
``RetryPolicy`` configures it. The drop-in functions ``evaluate_info`` and
``evaluate`` live in :mod:`agent_v2.eval_utils`.
"""

from __future__ import annotations

from agent_v2.client._client import (
    EvalClient,
    Evaluated,
    EvaluationResult,
    validate_base_url,
)
from agent_v2.client._config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LONG_POLL,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_HOST,
    DEFAULT_MAX_WAIT_REQUESTS,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    ENV_VARS,
    ClientConfig,
    Limits,
    RetryPolicy,
    Timeouts,
)
from agent_v2.client._sessions import SessionPool
from agent_v2.client._stats import ClientStats

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
