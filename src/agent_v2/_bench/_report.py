"""Turn benchmark figures into Markdown tables, a goals verdict, JSON and a PNG plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["GOALS", "LABELS", "evaluate_goals", "render_markdown", "write_results"]

LABELS = {
    "a": "(a) requests in async def, gathered",
    "b": "(b) requests, 8 threads, asyncio.run per call",
    "c": "(c) aiohttp, new session per call",
    "d": "(d) evaluate_info, gathered",
    "e": "(e) evaluate_info, 8 threads, one asyncio.run each",
    "f": "(f) evaluate_info, 8 threads, asyncio.run per call",
    "raw": "raw aiohttp, one shared session",
}

GOALS = {
    "d_100": "(d) N=100 on dummy: wall under 1.1 L",
    "d_1000": "(d) N=1000 on dummy: wall under 1.3 L",
    "overhead_raw": "client overhead: (d) at least 0.8x raw shared session",
    "overhead_c": "client overhead: (d) at least 3x (c)",
    "local_1000": "local N=1000: (d) no slower than (c), with at most 1/10 "
    "of its connections",
}

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
PNG_NAME = "results.png"

_NA = "—"


def write_results(
    results: dict[str, Any], folder: Path, *, plot: bool = True
) -> list[Path]:
    """Write the JSON, the Markdown and (with ``plot``) the PNG; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {**results, "goals": evaluate_goals(results)}
    written = [folder / JSON_NAME, folder / MARKDOWN_NAME]
    written[0].write_text(json.dumps(results, indent=1) + "\n")
    written[1].write_text(render_markdown(results))
    if plot:
        from agent_v2._bench._plot import plot_results

        plot_results(results, folder / PNG_NAME)
        written.append(folder / PNG_NAME)
    return written


# -- goals --------------------------------------------------------------------


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Return each goal with the figure it was judged on and whether it was met.

    ``met`` is None when the run did not measure what the goal needs.
    """
    goals = [
        _latency_goal(results, "d_100", 100, 1.1),
        _latency_goal(results, "d_1000", 1000, 1.3),
        *_overhead_goals(results),
        _local_goal(results),
    ]
    return goals


def _latency_goal(
    results: dict[str, Any], key: str, count: int, factor: float
) -> dict[str, Any]:
    """Judge (d)'s wall time at ``count`` on the dummy backend against ``factor`` L."""
    table = _table(results, "dummy")
    row = _row(table, "d", count) if table else None
    if table is None or row is None or row.get("skipped"):
        return _goal(key, None, "not measured")
    ratio = row["wall_s"] / table["latency_s"]
    return _goal(key, ratio < factor, f"{row['wall_s']:.3f} s = {ratio:.2f} L")


def _overhead_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Judge (d)'s evaluations per second against the raw session and (c)."""
    overhead = results.get("overhead")
    rows = {
        row["variant"]: row
        for row in (overhead["rows"] if overhead else [])
        if not row.get("skipped")
    }
    if not {"d", "raw", "c"} <= rows.keys():
        return [
            _goal("overhead_raw", None, "not measured"),
            _goal("overhead_c", None, "not measured"),
        ]
    ours = rows["d"]["evaluations_per_s"]
    raw = ours / rows["raw"]["evaluations_per_s"]
    old = ours / rows["c"]["evaluations_per_s"]
    return [
        _goal("overhead_raw", raw >= 0.8, f"{ours:.0f}/s = {raw:.2f}x raw"),
        _goal("overhead_c", old >= 3.0, f"{ours:.0f}/s = {old:.2f}x (c)"),
    ]


def _local_goal(results: dict[str, Any]) -> dict[str, Any]:
    """Judge (d) against (c) at N=1000 on the local backend (issue 3's goal)."""
    table = _table(results, "local")
    ours = _row(table, "d", 1000) if table else None
    old = _row(table, "c", 1000) if table else None
    if ours is None or old is None or ours.get("skipped") or old.get("skipped"):
        return _goal("local_1000", None, "not measured")
    met = (
        ours["wall_s"] <= old["wall_s"]
        and ours["connections"] * 10 <= old["connections"]
    )
    figure = (
        f"{ours['wall_s']:.2f} s vs {old['wall_s']:.2f} s; "
        f"{ours['connections']:.0f} vs {old['connections']:.0f} connections"
    )
    return _goal("local_1000", met, figure)


def _goal(key: str, met: bool | None, figure: str) -> dict[str, Any]:
    """Return one goal's verdict as JSON data."""
    return {"goal": key, "text": GOALS[key], "met": met, "figure": figure}


# -- Markdown -----------------------------------------------------------------


def render_markdown(results: dict[str, Any]) -> str:
    """Return the whole report as Markdown."""
    goals = results.get("goals") or evaluate_goals(results)
    parts = [
        "# agent-v2 bench results\n",
        _run_section(results),
        _errors_section(results.get("errors") or []),
        _machine_section(results),
    ]
    parts.extend(_concurrency_section(table) for table in results["concurrency"])
    if results.get("overhead"):
        parts.append(_overhead_section(results["overhead"]))
    if results.get("load"):
        parts.append(_load_section(results["load"]))
    parts.append(_goals_section(goals))
    parts.append(_method_section())
    return "\n".join(parts)


def _run_section(results: dict[str, Any]) -> str:
    """Say when and how the run was made."""
    config = results["config"]
    kind = "quick (tiny, for the test suite)" if config["quick"] else "full"
    commit = results.get("commit") or "unknown"
    return (
        f"Run: {kind}, {results['started_at']} to {results['finished_at']} "
        f"(UTC), commit `{commit}`, repeats up to {config['repeats']} "
        f"(cells taking {config['cheap_seconds']:g} s or more run once).\n"
    )


def _errors_section(errors: list[str]) -> str:
    """List the measurements that failed, if any."""
    if not errors:
        return ""
    lines = "".join(f"- {error.splitlines()[0]}\n" for error in errors)
    return f"**Failed measurements** (see the JSON for details):\n\n{lines}"


def _machine_section(results: dict[str, Any]) -> str:
    """Describe the machine and its load."""
    machine = results["machine"]
    before = ", ".join(f"{value:.2f}" for value in results["load_average_before"])
    after = ", ".join(f"{value:.2f}" for value in results["load_average_after"])
    during = [one for one, _, _ in results.get("load_average_during") or []]
    spread = (
        f"{min(during):.2f} / {statistics.median(during):.2f} / {max(during):.2f} "
        f"({len(during)} readings)"
        if during
        else _NA
    )
    rows = [
        ("CPU", machine["cpu_model"]),
        ("cores", f"{machine['cpus']} ({machine['cpus_usable']} usable)"),
        ("memory", f"{machine['memory_gib']} GiB"),
        ("Python", f"{machine['implementation']} {machine['python']}"),
        ("OS", machine["os"]),
        ("load average before (1, 5, 15 min)", before),
        ("1-min load average during, min / median / max", spread),
        ("load average after", after),
    ]
    return "## Machine\n\n" + _table_md(("", "value"), rows) + "\n"


def _concurrency_section(table: dict[str, Any]) -> str:
    """Render one backend's concurrency table."""
    latency = table["latency_s"]
    base = {row["n"]: row for row in table["rows"] if row["variant"] == "a"}
    rows = []
    for row in table["rows"]:
        label = LABELS[row["variant"]]
        if row.get("skipped"):
            rows.append((label, row["n"], row["skipped"], *[""] * 8))
            continue
        reference = base.get(row["n"])
        speedup = (
            f"{reference['wall_s'] / row['wall_s']:.1f}x"
            if reference and not reference.get("skipped")
            else _NA
        )
        rows.append(
            (
                label,
                row["n"],
                f"{row['wall_s']:.3f}",
                f"{row['wall_s'] / latency:.2f}",
                speedup,
                f"{row['cpu_s']:.2f}",
                _server_cpu(row),
                f"{row['peak_rss_mib']:.0f}",
                f"{row['connections']:.0f}",
                _ok(row),
                row["repeats"],
            )
        )
    header = (
        "client",
        "N",
        "wall s",
        "wall / L",
        "speedup over (a)",
        "client CPU s",
        "server CPU s (+ its commands)",
        "peak client RSS MiB",
        "TCP connects",
        "ok",
        "repeats",
    )
    lone = ", ".join(f"{value:.3f}" for value in table["lone_runs_s"])
    intro = (
        f"## 1. Concurrency, {table['backend']} backend, L = {latency:g} s\n\n"
        f"One command per evaluation taking L; a lone evaluation through our "
        f"client took {table['lone_latency_s']:.3f} s (median of {lone}). "
        f"{table['containers']} distinct containers, shared round-robin. "
        f"Wall times and CPU are medians over the repeats.\n"
    )
    return intro + "\n" + _table_md(header, rows) + "\n"


def _overhead_section(overhead: dict[str, Any]) -> str:
    """Render the client overhead table."""
    rates = {
        row["variant"]: row["evaluations_per_s"]
        for row in overhead["rows"]
        if not row.get("skipped")
    }
    rows = []
    for row in overhead["rows"]:
        if row.get("skipped"):
            rows.append((LABELS[row["variant"]], row["skipped"], *[""] * 8))
            continue
        rate = row["evaluations_per_s"]
        rows.append(
            (
                LABELS[row["variant"]],
                f"{rate:.0f}",
                _ratio(rate, rates.get("raw")),
                _ratio(rate, rates.get("c")),
                f"{row['wall_s']:.2f}",
                f"{row['cpu_ms_per_evaluation']:.2f}",
                _per_evaluation(row["server_cpu_s"], overhead["evaluations"]),
                f"{row['connections']:.0f}",
                _ok(row),
                row["repeats"],
            )
        )
    header = (
        "client",
        "evaluations/s",
        "vs raw",
        "vs (c)",
        "wall s",
        "client CPU ms per evaluation",
        "server CPU ms per evaluation",
        "TCP connects",
        "ok",
        "repeats",
    )
    intro = (
        f"## 2. Client overhead\n\n{overhead['evaluations']} zero-latency "
        f"evaluations (dummy backend), at most {overhead['concurrency']} at once "
        "per client. The raw session (with a connection for every call in "
        "flight) and (c) post the legacy `/evaluate_v3`, one blocking request "
        "per evaluation; (d), with its default limits (100 connections, 50 per "
        "host), submits through the loop's submitter (`/v1/evaluations/batch`, "
        "calls started together sharing a request) and waits through the waiter. "
        "Medians of runs that alternate between the three clients.\n"
    )
    return intro + "\n" + _table_md(header, rows) + "\n"


def _load_section(load: dict[str, Any]) -> str:
    """Render the server-under-load figures."""
    rows = []
    for name, title in (("waiting", f"L = {load['latency_s']:g} s"), ("rate", "L = 0")):
        run = load[name]
        healthz = run["healthz_ms"]
        rows.append(
            (
                title,
                load["evaluations"],
                f"{run['client']['wall_s']:.2f}",
                run["peak_in_flight"],
                _mib(run["server_rss_idle_mib"]),
                _mib(run["server_peak_rss_mib"]),
                _ms(healthz["p50"]),
                _ms(healthz["p99"]),
                _ms(healthz["max"]),
                healthz["samples"],
                _ok(run["client"]),
            )
        )
    header = (
        "run",
        "N",
        "client wall s",
        "peak in flight",
        "server RSS idle MiB",
        "server peak RSS MiB",
        "/healthz p50 ms",
        "p99 ms",
        "max ms",
        "samples",
        "ok",
    )
    waiting = load["waiting"]["healthz_all_waiting_ms"]
    rate = load["rate"]["evaluations_per_s"]
    stats = load["waiting"]["client"].get("client_stats") or {}
    outro = (
        f"\nWhile at least 90% of the {load['evaluations']} evaluations were in "
        f"flight at once: /healthz p50 {_ms(waiting['p50'])} ms, p99 "
        f"{_ms(waiting['p99'])} ms over {waiting['samples']} samples. "
        f"Evaluations finished per second with the device pool wide open "
        f"(L = 0): **{rate:.0f}/s**. Client connections for the waiting run: "
        f"{load['waiting']['client']['connections']}, wait requests "
        f"{stats.get('wait_requests', _NA)}.\n"
    )
    intro = (
        f"## 3. Server under load\n\nWaiting: {load['waiter']}. /healthz is "
        "timed from a separate process on one kept-alive connection. Peak RSS "
        "is the server process's VmHWM; the same store serves both runs.\n"
    )
    return intro + "\n" + _table_md(header, rows) + outro


def _goals_section(goals: Iterable[dict[str, Any]]) -> str:
    """Render which goals were met."""
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    rows = [(goal["text"], goal["figure"], verdict[goal["met"]]) for goal in goals]
    return "## Goals\n\n" + _table_md(("goal", "figure", "verdict"), rows) + "\n"


def _method_section() -> str:
    """Say how each column is measured."""
    return (
        "## How it is measured\n\n"
        "- The server is `agent-v2 serve` in its own process on a free loopback "
        "port, with more unpinned CPU slots than evaluations, so no evaluation "
        "waits for a device.\n"
        "- Every client variant runs in its own child process. Wall time and "
        "client CPU seconds (user + system, all threads) cover the calls only, "
        "not the interpreter start or imports; peak RSS is the child's "
        "`VmHWM` (its own high-water mark), imports included.\n"
        "- TCP connects are counted in the client child by an audit hook on "
        "`socket.connect` to the server's port: every connection attempt of any "
        "library, blocking or not.\n"
        "- wall / L divides by the nominal L; (a) is skipped where it would take "
        "N x L, and the 8-thread variants where they would take N/8 x L, beyond "
        "the per-cell bound.\n"
    )


# -- formatting ---------------------------------------------------------------


def _table_md(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> str:
    """Return a Markdown table."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def _table(results: dict[str, Any], backend: str) -> dict[str, Any] | None:
    """Return the concurrency table of ``backend``, if it was measured."""
    for table in results.get("concurrency", []):
        if table["backend"] == backend:
            found: dict[str, Any] = table
            return found
    return None


def _row(table: dict[str, Any], variant: str, count: int) -> dict[str, Any] | None:
    """Return a table's row for ``variant`` at ``count``, if any."""
    for row in table["rows"]:
        if row["variant"] == variant and row["n"] == count:
            found: dict[str, Any] = row
            return found
    return None


def _ok(row: dict[str, Any]) -> str:
    """Return ``ok/total`` of a row or run."""
    return f"{row['ok']}/{row['ok'] + row['failed']}"


def _ratio(value: float, reference: float | None) -> str:
    """Format ``value / reference`` as ``1.23x``."""
    return f"{value / reference:.2f}x" if reference else _NA


def _server_cpu(row: dict[str, Any]) -> str:
    """Format the server's CPU seconds, plus its commands' when they ran any."""
    own, commands = row.get("server_cpu_s"), row.get("commands_cpu_s")
    if own is None:
        return _NA
    if commands is None or commands < 0.005:
        return f"{own:.2f}"
    return f"{own:.2f} + {commands:.2f}"


def _per_evaluation(seconds: float | None, count: int) -> str:
    """Format seconds spent on ``count`` evaluations as ms per evaluation."""
    return _NA if seconds is None else f"{1000 * seconds / count:.2f}"


def _ms(value: float | None) -> str:
    """Format milliseconds to the tenth."""
    return _NA if value is None else f"{value:.1f}"


def _mib(value: float | None) -> str:
    """Format MiB as a whole number."""
    return _NA if value is None else f"{value:.0f}"
