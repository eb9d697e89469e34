"""Showing a run with rich: a progress bar while it goes, a summary at the end."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from agent_v2._runs._summary import Problem, RunCounts, RunSummary

__all__ = ["RunProgress", "print_summary"]

MAX_PROBLEMS_SHOWN = 20  # problems printed as they happen; the rest are counted


class RunProgress:
    """A progress bar of the lines dealt with, and the problems as they happen."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress = Progress(
            TextColumn("grading"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=True,
        )
        self._task: TaskID | None = None
        self._shown = 0

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def updated(self, counts: RunCounts) -> None:
        """Move the bar and refresh the counts beside it."""
        if self._task is None:
            self._task = self._progress.add_task(
                "grading", total=counts.lines, status=""
            )
        status = (
            f"{counts.in_flight} in flight · {counts.graded} graded · "
            f"{counts.skipped} skipped · "
            f"{counts.malformed + counts.infra_failures} problems"
        )
        self._progress.update(self._task, completed=counts.done, status=status)

    def problem(self, problem: Problem) -> None:
        """Print a problem above the bar (only the first few of them)."""
        self._shown += 1
        if self._shown <= MAX_PROBLEMS_SHOWN:
            self._console.print(
                f"line {problem.line}: {_describe(problem)}",
                style="yellow",
                highlight=False,
            )
        elif self._shown == MAX_PROBLEMS_SHOWN + 1:
            self._console.print(
                "more problems: see the summary", style="yellow", highlight=False
            )


def _describe(problem: Problem) -> str:
    """Return a problem as one line of text, markup escaped."""
    if problem.kind == "malformed":
        return f"malformed: {escape(problem.detail)}"
    return f"not graded ({escape(problem.error)}): {escape(problem.detail)}"


def print_summary(console: Console, summary: RunSummary) -> None:
    """Print what the run did and the figures of its results file."""
    run, figures = summary.run, summary.results
    console.print(
        f"{summary.submissions}: {run.lines} submissions; this run graded "
        f"{run.graded}, recorded {run.not_submitted} not submitted, skipped "
        f"{run.skipped} already in {summary.output}, and {run.duplicates} "
        f"repeated lines, in {summary.wall_seconds:.1f} s",
        highlight=False,
    )

    table = Table(title=f"results in {summary.output}", title_justify="left")
    table.add_column("outcome")
    table.add_column("count", justify="right")
    for outcome, count in figures.by_outcome.most_common():
        table.add_row(escape(outcome), str(count))
    table.add_row("total", str(figures.results), style="bold")
    console.print(table)

    reward = "-" if figures.mean_reward is None else f"{figures.mean_reward:.3f}"
    speedup = (
        "-" if figures.geomean_speedup is None else f"{figures.geomean_speedup:.2f}x"
    )
    console.print(
        f"mean reward {reward}; geometric-mean speedup of "
        f"{figures.successes} successes {speedup}",
        highlight=False,
    )
    _print_problems(console, summary)


def _print_problems(console: Console, summary: RunSummary) -> None:
    """Print the lines that were not graded, and what to do about them."""
    run = summary.run
    if run.malformed:
        lines = [str(p.line) for p in run.problems if p.kind == "malformed"]
        console.print(
            f"{run.malformed} malformed lines (first: {', '.join(lines[:10])}); "
            "fix them and run again to grade them",
            style="red",
            highlight=False,
        )
    if run.infra_failures:
        lines = [str(p.line) for p in run.problems if p.kind == "infra_failure"]
        console.print(
            f"{run.infra_failures} submissions could not be graded for reasons "
            f"not their own (first: {', '.join(lines[:10])}); they are not in the "
            "output: run the same command again to retry them",
            style="red",
            highlight=False,
        )
