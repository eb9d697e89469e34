"""Grading: the pipeline per mode, benchmark parsing and the reward policy."""

from __future__ import annotations

from agent_v2.evaluation._benchmark import (
    BenchmarkOutputError,
    BenchmarkStatistic,
    parse_benchmark_output,
    speedup,
)
from agent_v2.evaluation._digest import instance_digest
from agent_v2.evaluation._pipeline import (
    BaselineCache,
    MemoryBaselineCache,
    baseline_key,
    grade,
)
from agent_v2.evaluation.reward import RewardPolicy

__all__ = [
    "BaselineCache",
    "BenchmarkOutputError",
    "BenchmarkStatistic",
    "MemoryBaselineCache",
    "RewardPolicy",
    "baseline_key",
    "grade",
    "instance_digest",
    "parse_benchmark_output",
    "speedup",
]
