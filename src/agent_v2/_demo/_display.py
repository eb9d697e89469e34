"""Showing the demo with rich: live progress, then a table and a summary."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from types import TracebackType

from rich import box
from rich.console import Console, Group
from rich.live import Live
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
from rich.text import Text

from agent_v2._demo._agent import AgentResult, Phase
from agent_v2._demo._runner import DemoReport
from agent_v2._demo._variants import Variant
from agent_v2.protocol import Health

__all__ = ["DemoProgress", "print_report"]


class DemoProgress:
    """A live bar of agents done, over what the agents and the server are doing.

    Each finished agent also gets a line above the bar.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress = Progress(
            TextColumn("[bold]demo"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("agents done"),
            TimeElapsedColumn(),
            console=console,
        )
        self._live = Live(self, console=console, transient=True)
        self._task: TaskID | None = None
        self._phases: dict[str, Phase] = {}
        self._server: Health | None = None

    def __enter__(self) -> DemoProgress:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._live.stop()

    def __rich__(self) -> Group:
        """Return what the live display shows now: the bar, then two status lines."""
        counts = collections.Counter(self._phases.values())
        agents = (
            f"  agents: {counts[Phase.WAITING]} waiting · "
            f"{counts[Phase.PREPARING]} preparing a container · "
            f"{counts[Phase.SUBMITTED]} submitted"
        )
        health = self._server
        server = (
            "  server: starting"
            if health is None
            else f"  server: {health.queued} queued · {health.running} running · "
            f"{health.devices_free} of {health.devices_total} devices free"
        )
        return Group(self._progress, Text(agents), Text(server))

    def started(self, variants: Sequence[Variant], devices: str) -> None:
        """Show the bar for this many agents."""
        self._console.print(
            f"grading {_plural(len(variants), 'variant')} with one scripted "
            f"agent each, on devices {devices}",
            highlight=False,
        )
        self._task = self._progress.add_task("demo", total=len(variants))

    def phase(self, variant: Variant, phase: Phase) -> None:
        """Count the agents by phase; move the bar when one is done."""
        self._phases[variant.label] = phase
        if self._task is not None:
            done = sum(1 for value in self._phases.values() if value is Phase.DONE)
            self._progress.update(self._task, completed=done)

    def server(self, health: Health) -> None:
        """Keep the server's queue and devices for the next refresh."""
        self._server = health

    def finished(self, result: AgentResult) -> None:
        """Print one line for a finished agent."""
        mark = "[green]ok[/]" if result.as_expected else "[red]UNEXPECTED[/]"
        what = escape(result.error or f"speedup {_speedup(result.speedup)}")
        line = f"{mark} {escape(result.variant.label)}: {what}"
        if result.seconds is not None:
            line += f" ({result.seconds:.1f} s)"
        if result.problem is not None:
            line += f" - {escape(result.problem)}"
        self._console.print(line, highlight=False)


def print_report(console: Console, report: DemoReport) -> None:
    """Print the table of outcomes and the summary."""
    # NOTE: padding collapsed and none at the edges, so the table fits 80
    # columns (the width rich assumes for pipes and CI logs).
    table = Table(
        title="demo outcomes",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("instance", "variant"):
        table.add_column(column, no_wrap=True)
    for column in ("reward", "speedup"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("error", no_wrap=True)
    table.add_column("seconds", justify="right", no_wrap=True)
    table.add_column("ok", no_wrap=True)
    for result in report.results:
        table.add_row(
            escape(result.variant.instance_id),
            escape(result.variant.name),
            f"{result.reward:.3f}",
            _speedup(result.speedup),
            escape(result.error or ""),
            "-" if result.seconds is None else f"{result.seconds:.1f}",
            "[green]yes[/]" if result.as_expected else "[red]NO[/]",
        )
    console.print(table)
    _print_summary(console, report)


def _print_summary(console: Console, report: DemoReport) -> None:
    """Print wall time against evaluation time, the mean reward, and mismatches."""
    count, wall = len(report.results), report.wall_seconds
    busy = report.evaluation_seconds
    console.print(
        f"{_plural(count, 'evaluation')} took {busy:.1f} s of evaluation time in "
        f"{wall:.1f} s of wall time ({busy / max(wall, 1e-9):.1f}x from grading "
        f"in parallel on devices {report.devices}); mean reward "
        f"{report.mean_reward:.3f}",
        highlight=False,
    )
    if report.kept_folder is not None:
        console.print(
            f"kept the server's files in {report.kept_folder} "
            "(containers in work/containers, store in store.sqlite3)",
            highlight=False,
        )

    unexpected = report.unexpected
    if not unexpected:
        console.print(f"[green]all {count} outcomes are as expected[/]")
        return
    console.print(f"[red]{len(unexpected)} of {count} outcomes are not as expected:[/]")
    for result in unexpected:
        console.print(
            f"  {escape(result.variant.label)}: {escape(result.problem or '')}",
            highlight=False,
        )


def _speedup(value: float) -> str:
    """Return a speedup as ``3.21x``, or ``-`` for none."""
    return "-" if value < 0 else f"{value:.2f}x"


def _plural(count: int, noun: str) -> str:
    """Return ``1 variant`` or ``2 variants``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
