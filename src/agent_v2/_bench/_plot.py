"""The benchmark's PNG: wall time against N, client overhead, /healthz under load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_results"]


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Draw the figures of one run into a PNG file at ``path``.

    Uses a bare ``Figure`` with the Agg canvas, so no display and no pyplot
    state are involved.
    """
    from matplotlib.figure import Figure

    from agent_v2._bench._report import LABELS

    figure = Figure(figsize=(13, 9), layout="constrained")
    (table_a, table_b), (overhead_axes, load_axes) = figure.subplots(2, 2)
    tables = results.get("concurrency", [])
    for axes, table in zip((table_a, table_b), tables, strict=False):
        _draw_table(axes, table, LABELS)
    if results.get("overhead"):
        _draw_overhead(overhead_axes, results["overhead"], LABELS)
    if results.get("load"):
        _draw_load(load_axes, results["load"])
    figure.suptitle(_title(results))
    figure.savefig(path, dpi=100)


def _draw_table(axes: Any, table: dict[str, Any], labels: dict[str, str]) -> None:
    """Plot wall time against N, one line per client variant."""
    by_variant: dict[str, list[tuple[int, float]]] = {}
    for row in table["rows"]:
        if not row.get("skipped"):
            by_variant.setdefault(row["variant"], []).append((row["n"], row["wall_s"]))
    for variant, points in by_variant.items():
        counts, walls = zip(*sorted(points), strict=True)
        axes.plot(counts, walls, marker="o", label=labels[variant])
    axes.axhline(table["latency_s"], color="grey", linestyle=":", label="L")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("N concurrent evaluations")
    axes.set_ylabel("wall time, s")
    axes.set_title(f"{table['backend']} backend, L = {table['latency_s']:g} s")
    axes.legend(fontsize="small")


def _draw_overhead(axes: Any, overhead: dict[str, Any], labels: dict[str, str]) -> None:
    """Bar chart of evaluations per second at zero latency."""
    measured = [row for row in overhead["rows"] if not row.get("skipped")]
    names = [labels[row["variant"]] for row in measured]
    rates = [row["evaluations_per_s"] for row in measured]
    axes.barh(names, rates)
    axes.invert_yaxis()
    axes.set_xlabel("evaluations per second")
    axes.set_title(
        f"client overhead: {overhead['evaluations']} evaluations, "
        f"{overhead['concurrency']} at once, L = 0"
    )


def _draw_load(axes: Any, load: dict[str, Any]) -> None:
    """Plot /healthz latency and evaluations in flight over the waiting run."""
    samples = [s for s in load["waiting"]["samples"] if s[1] is not None]
    if not samples:
        return
    seconds = [sample[0] for sample in samples]
    axes.plot(seconds, [sample[1] for sample in samples], ".", markersize=3)
    axes.set_yscale("log")
    axes.set_xlabel("seconds since the client started")
    axes.set_ylabel("/healthz latency, ms")
    axes.set_title(
        f"server under load: {load['evaluations']} evaluations, "
        f"L = {load['latency_s']:g} s"
    )
    flight = axes.twinx()
    flight.plot(seconds, [sample[2] for sample in samples], color="tab:orange")
    flight.set_ylabel("evaluations in flight", color="tab:orange")


def _title(results: dict[str, Any]) -> str:
    """Return the figure title naming the machine and its load."""
    machine = results["machine"]
    load = ", ".join(f"{value:.1f}" for value in results["load_average_before"])
    return (
        f"agent-v2 bench, {results['started_at']}: {machine['cpu_model']}, "
        f"{machine['cpus_usable']} cores, Python {machine['python']}, "
        f"load average {load}"
    )
