"""Summaries of a run: what this run did, and figures over the results file."""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from agent_v2._runs._results import iter_records

__all__ = [
    "MAX_PROBLEMS",
    "SUCCESS",
    "OutcomeSummary",
    "Problem",
    "RunCounts",
    "RunSummary",
    "summarize_results",
]

SUCCESS = "success"
MAX_PROBLEMS = 100  # problems kept with their details; all are counted

ProblemKind = Literal["malformed", "infra_failure"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A line that was not graded: malformed, or failed for a reason not its own."""

    line: int
    kind: ProblemKind
    error: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        """Return the problem as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunCounts:
    """What one run did with the lines of its submissions file.

    ``graded`` lines got an outcome (or a lasting refusal) written now;
    ``not_submitted`` were written without a request; ``skipped`` were in
    the results already; ``duplicates`` repeat an earlier line's key;
    ``malformed`` and ``infra_failures`` were not written (see ``problems``,
    which keeps the first MAX_PROBLEMS).
    """

    lines: int = 0
    graded: int = 0
    not_submitted: int = 0
    skipped: int = 0
    duplicates: int = 0
    malformed: int = 0
    infra_failures: int = 0
    in_flight: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> int:
        """Return how many lines are dealt with, one way or another."""
        return (
            self.graded
            + self.not_submitted
            + self.skipped
            + self.duplicates
            + self.malformed
            + self.infra_failures
        )

    def add_problem(self, problem: Problem) -> None:
        """Count a problem, keeping its details while there is room."""
        if problem.kind == "malformed":
            self.malformed += 1
        else:
            self.infra_failures += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def to_json(self) -> dict[str, Any]:
        """Return the counts and kept problems as a JSON-ready dict."""
        data = dataclasses.asdict(self)
        del data["in_flight"]
        data["problems"] = [problem.to_json() for problem in self.problems]
        return data


@dataclasses.dataclass
class OutcomeSummary:
    """Figures over result records: counts by outcome, reward, speedup.

    ``by_outcome`` counts ``success`` and each error code. The mean reward
    is over every record (a failure or a run not submitted counts as 0); the
    speedup is the geometric mean over successes with a positive speedup.
    """

    results: int = 0
    by_outcome: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    reward_sum: float = 0.0
    speedups: int = 0
    log_speedup_sum: float = 0.0

    @property
    def successes(self) -> int:
        """Return how many records are successes."""
        return self.by_outcome[SUCCESS]

    @property
    def mean_reward(self) -> float | None:
        """Return the mean reward over every record, or None without records."""
        return self.reward_sum / self.results if self.results else None

    @property
    def geomean_speedup(self) -> float | None:
        """Return the geometric-mean speedup of successes, or None without any."""
        if not self.speedups:
            return None
        return math.exp(self.log_speedup_sum / self.speedups)

    def add(self, record: dict[str, Any]) -> None:
        """Count one result record."""
        self.results += 1
        success = record.get("success") is True
        self.by_outcome[SUCCESS if success else str(record.get("error"))] += 1
        reward = _number(record.get("reward"))
        self.reward_sum += reward if reward is not None and success else 0.0
        speedup = _number(record.get("speedup"))
        if success and speedup is not None and speedup > 0:
            self.speedups += 1
            self.log_speedup_sum += math.log(speedup)

    def to_json(self) -> dict[str, Any]:
        """Return the figures as a JSON-ready dict."""
        return {
            "results": self.results,
            "by_outcome": dict(self.by_outcome.most_common()),
            "successes": self.successes,
            "mean_reward": self.mean_reward,
            "geomean_speedup": self.geomean_speedup,
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary:
    """The end of a run: its counts, and figures over its whole results file."""

    submissions: Path
    output: Path
    run: RunCounts
    results: OutcomeSummary
    wall_seconds: float
    dropped_partial: bool = False

    @property
    def exit_code(self) -> int:
        """Return 1 when a line was malformed or not graded for infra reasons."""
        return 1 if self.run.malformed or self.run.infra_failures else 0

    def to_json(self) -> dict[str, Any]:
        """Return the whole summary as a JSON-ready dict."""
        return {
            "submissions": str(self.submissions),
            "output": str(self.output),
            "wall_seconds": round(self.wall_seconds, 3),
            "dropped_partial_line": self.dropped_partial,
            "exit_code": self.exit_code,
            "run": self.run.to_json(),
            "results": self.results.to_json(),
        }


def summarize_results(path: Path) -> OutcomeSummary:
    """Read a results file and sum up its records (blocking; use a thread)."""
    summary = OutcomeSummary()
    for record in iter_records(path):
        summary.add(record)
    return summary


def _number(value: Any) -> float | None:
    """Return a finite JSON number as a float, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
