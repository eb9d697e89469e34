"""ServerSettings: the evaluation server's configuration, validated once."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from agent_v2.datasets import Dataset, load_dataset, parse_dataset_spec
from agent_v2.errors import ConfigError
from agent_v2.protocol import (
    DEFAULT_EVALUATION_TIMEOUT,
    DEFAULT_EXEC_TIMEOUT,
    DEFAULT_GPU_ACQUIRE_TIMEOUT,
)
from agent_v2.server._devices import default_devices_spec, parse_devices

__all__ = [
    "BACKEND_KINDS",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_CONTAINER_MEMORY",
    "DEFAULT_CONTAINER_PIDS",
    "DEFAULT_DUMMY_LATENCY",
    "DEFAULT_HOST",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_PORT",
    "DEFAULT_SHUTDOWN_GRACE",
    "DEFAULT_STATE_DIR",
    "GPU_VENDORS",
    "ServerSettings",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9528
DEFAULT_STATE_DIR = Path(".agent-v2")
DEFAULT_MAX_QUEUE = 10_000
DEFAULT_MAX_BODY_SIZE = 2 * 1024 * 1024
DEFAULT_DUMMY_LATENCY = 1.0
DEFAULT_SHUTDOWN_GRACE = 5.0
DEFAULT_MAX_CONNECTIONS = 16_384
DEFAULT_IDLE_TIMEOUT = 75.0
DEFAULT_BODY_TIMEOUT = 60.0
BACKEND_KINDS = ("local", "dummy", "docker")
GPU_VENDORS = ("none", "amd", "nvidia")
DEFAULT_CONTAINER_MEMORY = "8g"
DEFAULT_CONTAINER_PIDS = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Everything the evaluation server needs to start.

    ``datasets`` takes loaded :class:`~agent_v2.datasets.Dataset` objects or
    ``NAME=PATH`` specs (loaded here, so a bad file fails before the server
    binds). ``devices`` is a spec such as ``cpu:2`` or ``gpu:0,1``. The token
    never appears in ``repr``.

    Connection limits: at most ``max_connections`` open at once (at the cap,
    the longest-idle one is closed for a newcomer); a connection that sends
    no complete request head for ``idle_timeout`` seconds, new or kept
    alive, is closed; a request body must arrive within ``body_timeout``.
    """

    datasets: Sequence[Dataset | str]
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    devices: str = dataclasses.field(default_factory=default_devices_spec)
    workdir: Path = DEFAULT_STATE_DIR
    store_path: Path = DEFAULT_STATE_DIR / "store.sqlite3"
    token: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    backend: str = "local"
    dummy_latency: float = DEFAULT_DUMMY_LATENCY
    evaluation_timeout: float = DEFAULT_EVALUATION_TIMEOUT
    gpu_acquire_timeout: float = DEFAULT_GPU_ACQUIRE_TIMEOUT
    exec_timeout: float = DEFAULT_EXEC_TIMEOUT
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    # Settings of the docker backend; see docs/docker.md.
    docker_url: str | None = None
    gpu_vendor: str = "none"
    container_memory: str = DEFAULT_CONTAINER_MEMORY
    container_pids: int = DEFAULT_CONTAINER_PIDS
    container_cpus: float | None = None
    container_network: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", _load_datasets(self.datasets))
        object.__setattr__(self, "workdir", Path(self.workdir))
        object.__setattr__(self, "store_path", Path(self.store_path))
        parse_devices(self.devices)  # raises ConfigError naming the spec

        self._check_network()
        self._check_numbers()
        if self.backend not in BACKEND_KINDS:
            raise ConfigError(
                f"backend must be one of {', '.join(BACKEND_KINDS)}, "
                f"got {self.backend!r}"
            )
        if self.gpu_vendor not in GPU_VENDORS:
            raise ConfigError(
                f"gpu_vendor must be one of {', '.join(GPU_VENDORS)}, "
                f"got {self.gpu_vendor!r}"
            )

    def __repr__(self) -> str:
        fields = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "token" and value is not None:
                value = "***"
            elif field.name == "datasets":
                value = [dataset.name for dataset in self.dataset_list]
            fields.append(f"{field.name}={value!r}")
        return f"ServerSettings({', '.join(fields)})"

    @property
    def dataset_list(self) -> tuple[Dataset, ...]:
        """Return the datasets, loaded."""
        return tuple(d for d in self.datasets if isinstance(d, Dataset))

    @property
    def is_loopback(self) -> bool:
        """Return whether the server binds only loopback addresses."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def _check_network(self) -> None:
        """Refuse settings that would expose an open server to the network."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("token must not be empty; omit it to disable auth")
        if not self.is_loopback and self.token is None:
            raise ConfigError(
                f"refusing to listen on non-loopback host {self.host!r} without a "
                "token: pass --token, or bind 127.0.0.1"
            )

    def _check_numbers(self) -> None:
        """Check that limits and timeouts are positive."""
        positive = {
            "max_queue": self.max_queue,
            "evaluation_timeout": self.evaluation_timeout,
            "exec_timeout": self.exec_timeout,
            "max_body_size": self.max_body_size,
            "max_connections": self.max_connections,
            "idle_timeout": self.idle_timeout,
            "body_timeout": self.body_timeout,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name} must be greater than 0, got {value}")
        non_negative = {
            "gpu_acquire_timeout": self.gpu_acquire_timeout,
            "dummy_latency": self.dummy_latency,
            "shutdown_grace": self.shutdown_grace,
        }
        for name, value in non_negative.items():
            if not value >= 0:
                raise ConfigError(f"{name} must be 0 or more, got {value}")


def _load_datasets(values: Sequence[Dataset | str]) -> tuple[Dataset, ...]:
    """Load ``NAME=PATH`` specs; check that there is one dataset per name."""
    if isinstance(values, str | Dataset):
        values = [values]
    datasets = []
    for value in values:
        if isinstance(value, str):
            name, path = parse_dataset_spec(value)
            value = load_dataset(name, path)
        datasets.append(value)

    if not datasets:
        raise ConfigError("at least one dataset is needed: pass --dataset NAME=PATH")
    names = [dataset.name for dataset in datasets]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"dataset names must be unique, repeated: {duplicates}")
    return tuple(datasets)
