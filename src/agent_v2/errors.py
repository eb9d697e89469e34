"""Exceptions raised by agent_v2, all rooted at :class:`AgentV2Error`.

The tree::

    AgentV2Error
    ├── ConfigError(ValueError)            bad settings, flags or arguments
    ├── DatasetError(ValueError)           a dataset file that cannot be served
    ├── InstanceNotFound(LookupError)      no such (dataset, split, instance)
    ├── SandboxError                       a sandbox backend failed
    │   ├── InvalidContainerId(ValueError) an id that could escape the workdir
    │   └── ContainerNotFound(LookupError) no container with that id
    ├── StoreError                         the evaluation store failed
    │   └── StoreUnavailable               for now: a full disk, an I/O error
    └── ClientError                        raised by EvalClient
        ├── TransportError(ConnectionError) the server could not be reached
        ├── RequestTimeout(TimeoutError)   the call ran past its timeout
        ├── HTTPStatusError                the server answered with status >= 400
        │   └── QueueFull                  429 after every retry
        └── ProtocolError(ValueError)      an answer that cannot be parsed

Each subclass also inherits the builtin that matches it, so callers that
only know the standard library can still catch it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgentV2Error",
    "ClientError",
    "ConfigError",
    "ContainerNotFound",
    "DatasetError",
    "HTTPStatusError",
    "InstanceNotFound",
    "InvalidContainerId",
    "ProtocolError",
    "QueueFull",
    "RequestTimeout",
    "SandboxError",
    "StoreError",
    "StoreUnavailable",
    "TransportError",
]


class AgentV2Error(Exception):
    """Root of every exception this package raises on purpose."""


class ConfigError(AgentV2Error, ValueError):
    """Settings, flags or arguments that cannot be used."""


class DatasetError(AgentV2Error, ValueError):
    """A dataset file that cannot be loaded; the message names file and record."""


class InstanceNotFound(AgentV2Error, LookupError):
    """No instance with this dataset, split and id is served."""


class SandboxError(AgentV2Error):
    """A sandbox backend could not do what was asked."""


class InvalidContainerId(SandboxError, ValueError):
    """A container id that is malformed or could resolve outside the workdir."""


class ContainerNotFound(SandboxError, LookupError):
    """No container with this id exists in the backend."""


class StoreError(AgentV2Error):
    """The evaluation store could not read or write."""


class StoreUnavailable(StoreError):
    """The store failed for a reason that may pass: a full disk, an I/O error,
    a lock held too long. The same read or write may work when retried."""


class ClientError(AgentV2Error):
    """Raised by :class:`agent_v2.client.EvalClient`."""


class TransportError(ClientError, ConnectionError):
    """The server could not be reached, or dropped the connection."""


class RequestTimeout(ClientError, TimeoutError):
    """A call ran past its timeout."""


class HTTPStatusError(ClientError):
    """The server answered with an HTTP status of 400 or more."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class QueueFull(HTTPStatusError):
    """The server's queue stayed full (429) through every retry."""


class ProtocolError(ClientError, ValueError):
    """An answer from the server that cannot be parsed."""
