"""BenchConfig: what ``agent-v2 bench`` measures, and the tiny ``--quick`` version."""

from __future__ import annotations

import dataclasses

from agent_v2._bench._clients import VARIANTS
from agent_v2.errors import ConfigError

__all__ = [
    "BACKENDS",
    "DEFAULT_COUNTS",
    "DEFAULT_LATENCY",
    "DEFAULT_REPEATS",
    "TABLE_VARIANTS",
    "BenchConfig",
]

DEFAULT_COUNTS = (10, 100, 1000)
DEFAULT_LATENCY = 1.0
DEFAULT_REPEATS = 3
BACKENDS = ("dummy", "local")
TABLE_VARIANTS = ("a", "b", "c", "d", "e", "f")
OVERHEAD_VARIANTS = ("d", "raw", "c")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """The figures to measure and the bounds of every run.

    Concurrency table: every variant at every count, on every backend, each
    evaluation taking ``latency`` seconds on the server. A cell is skipped
    when its predicted wall time (``N x L`` for the serial variant ``a``,
    ``N/8 x L`` for the 8-thread ``b`` and ``f``) exceeds
    ``max_cell_seconds``; it is repeated up to ``repeats`` times while one
    run takes under ``cheap_seconds``. ``local_containers`` containers are
    created on the local backend and shared round-robin by the evaluations.

    Client overhead: ``overhead_evaluations`` zero-latency evaluations at
    ``overhead_concurrency``. Server under load: ``load_evaluations``
    evaluations of ``load_latency`` seconds in flight at once, ``/healthz``
    timed every ``healthz_interval`` seconds meanwhile; then as many
    zero-latency ones to measure the finish rate.
    """

    counts: tuple[int, ...] = DEFAULT_COUNTS
    latency: float = DEFAULT_LATENCY
    variants: tuple[str, ...] = TABLE_VARIANTS
    backends: tuple[str, ...] = BACKENDS
    repeats: int = DEFAULT_REPEATS
    cheap_seconds: float = 30.0
    max_cell_seconds: float = 120.0
    local_containers: int = 20
    overhead: bool = True
    overhead_evaluations: int = 5000
    overhead_concurrency: int = 100
    load: bool = True
    load_evaluations: int = 10_000
    load_latency: float = 60.0
    healthz_interval: float = 0.05
    plot: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.counts or any(count < 1 for count in self.counts):
            raise ConfigError(f"counts must be positive integers, got {self.counts}")
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown:
            raise ConfigError(
                f"unknown client variants {unknown}; choose from {sorted(VARIANTS)}"
            )
        unknown = [name for name in self.backends if name not in BACKENDS]
        if unknown:
            raise ConfigError(f"unknown backends {unknown}; choose from {BACKENDS}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Check that every bound is positive."""
        positive = {
            "latency": self.latency,
            "repeats": self.repeats,
            "cheap_seconds": self.cheap_seconds,
            "max_cell_seconds": self.max_cell_seconds,
            "local_containers": self.local_containers,
            "overhead_evaluations": self.overhead_evaluations,
            "overhead_concurrency": self.overhead_concurrency,
            "load_evaluations": self.load_evaluations,
            "load_latency": self.load_latency,
            "healthz_interval": self.healthz_interval,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name} must be greater than 0, got {value!r}")

    @classmethod
    def quick_config(cls, **overrides: object) -> BenchConfig:
        """Return the tiny version the test suite runs: seconds, not minutes."""
        fields: dict[str, object] = {
            "counts": (2, 5),
            "latency": 0.05,
            "repeats": 1,
            "local_containers": 2,
            "overhead_evaluations": 40,
            "overhead_concurrency": 10,
            "load_evaluations": 40,
            "load_latency": 0.5,
            "healthz_interval": 0.02,
            "quick": True,
        }
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]
