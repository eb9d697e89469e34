"""Benchmark output: Google Benchmark JSON parsed into times, and the speedup."""

from __future__ import annotations

import enum
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from agent_v2.errors import AgentV2Error

__all__ = [
    "BenchmarkOutputError",
    "BenchmarkStatistic",
    "parse_benchmark_output",
    "speedup",
]

_SECONDS_PER_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_AGGREGATE_SUFFIXES = ("_mean", "_median", "_stddev", "_cv", "_BigO", "_RMS")

# Where a JSON object with keys may start: ``{`` then a quoted key.
_OBJECT_START = re.compile(r'\{\s*"')
_DECODER = json.JSONDecoder()  # keeps no state between calls

# NOTE: output with many unclosed objects would make every decode attempt
# scan to the end of the text; the budget, in characters scanned per
# character of output, keeps the search linear on hostile output.
_SCAN_BUDGET_FACTOR = 20


class BenchmarkOutputError(AgentV2Error, ValueError):
    """Benchmark output without usable Google Benchmark JSON, or no common names."""


class BenchmarkStatistic(enum.StrEnum):
    """Which time of a benchmark's repetitions stands for the benchmark."""

    MEDIAN = "median"  # the median aggregate: robust to a lucky repetition
    MIN = "min"  # the fastest repetition: robust to a noisy, shared machine


def parse_benchmark_output(
    stdout: str, statistic: BenchmarkStatistic = BenchmarkStatistic.MEDIAN
) -> dict[str, float]:
    """Return each benchmark's time in seconds from Google Benchmark JSON.

    The JSON object may have other text around it, and a command that runs
    several benchmark programs may print several objects; their benchmarks
    are merged. Per name, with ``median``: the ``median`` aggregate when the
    run had repetitions, else the mean over its entries. With ``min``: the
    fastest of its entries, else (only aggregates were reported) the
    ``median`` aggregate. Entries that report an error and the other
    aggregates (mean, stddev, cv, BigO, ...) are skipped.
    """
    entries: list[Mapping[str, Any]] = []
    for document in _json_objects(stdout):
        entries.extend(_entries_of(document))
    if not entries:
        raise BenchmarkOutputError(
            "found no Google Benchmark JSON (an object with a 'benchmarks' "
            "list) in the benchmark output; run the benchmark with "
            "--benchmark_format=json"
        )

    medians: dict[str, float] = {}
    iterations: defaultdict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    for entry in entries:
        _collect(entry, medians, iterations, errors)

    if statistic is BenchmarkStatistic.MIN:
        times = dict(medians)
        times.update((name, min(values)) for name, values in iterations.items())
    else:
        times = {name: statistics.fmean(v) for name, v in iterations.items()}
        times.update(medians)
    if not times:
        detail = f": {'; '.join(errors[:5])}" if errors else ""
        raise BenchmarkOutputError(
            f"the benchmark output lists no benchmark that ran without error{detail}"
        )
    return times


def speedup(
    baseline: Mapping[str, float], candidate: Mapping[str, float]
) -> tuple[float, dict[str, float]]:
    """Return the geometric mean of baseline/candidate times, and each ratio.

    Only benchmarks present in both count; it is an error when none is.
    """
    common = sorted(set(baseline) & set(candidate))
    if not common:
        raise BenchmarkOutputError(
            f"no benchmark is in both the baseline ({sorted(baseline)[:10]}) and "
            f"the candidate ({sorted(candidate)[:10]}); the benchmark names "
            "must stay the same"
        )
    ratios = {name: baseline[name] / candidate[name] for name in common}
    mean_log = statistics.fmean(math.log(ratio) for ratio in ratios.values())
    return math.exp(mean_log), ratios


def _json_objects(text: str) -> Iterator[Any]:
    """Yield every top-level JSON object found in ``text``, left to right."""
    budget = _SCAN_BUDGET_FACTOR * len(text) + _SCAN_BUDGET_FACTOR
    match = _OBJECT_START.search(text)
    while match is not None and budget > 0:
        position = match.start()
        try:
            value, end = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            budget -= exc.pos - position + 1
            match = _OBJECT_START.search(text, position + 1)
            continue
        except RecursionError:  # absurdly deep nesting: not benchmark output
            budget -= len(text) - position
            match = _OBJECT_START.search(text, position + 1)
            continue
        yield value
        match = _OBJECT_START.search(text, end)


def _entries_of(document: Any) -> list[Mapping[str, Any]]:
    """Return the benchmark entries of a Google Benchmark JSON document."""
    if not isinstance(document, dict):
        return []
    benchmarks = document.get("benchmarks")
    if not isinstance(benchmarks, list):
        return []
    return [entry for entry in benchmarks if isinstance(entry, dict)]


def _collect(
    entry: Mapping[str, Any],
    medians: dict[str, float],
    iterations: defaultdict[str, list[float]],
    errors: list[str],
) -> None:
    """Sort one entry into the medians, the iterations or the skipped ones."""
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise BenchmarkOutputError(
            f"a benchmark entry has no 'name': {_preview(entry)}"
        )
    if entry.get("error_occurred"):
        errors.append(f"{name}: {entry.get('error_message', 'error')}")
        return

    aggregate = _aggregate_of(entry, name)
    if aggregate is not None:
        run_name, aggregate_name = aggregate
        if aggregate_name == "median":
            medians[run_name] = _seconds(entry, name)
        return
    iterations[name].append(_seconds(entry, name))


def _aggregate_of(entry: Mapping[str, Any], name: str) -> tuple[str, str] | None:
    """Return ``(run name, aggregate name)`` for an aggregate entry, else None.

    Since Google Benchmark 1.5 entries say ``run_type``; older output only
    shows aggregates by a suffix (``_mean``, ``_median``, ``_BigO``, ...).
    """
    run_type = entry.get("run_type")
    if run_type == "aggregate":
        aggregate_name = str(entry.get("aggregate_name", ""))
        run_name = entry.get("run_name")
        if not isinstance(run_name, str) or not run_name:
            suffix = f"_{aggregate_name}"
            run_name = name.removesuffix(suffix) if aggregate_name else name
        return run_name, aggregate_name
    if run_type is None:
        for suffix in _AGGREGATE_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name.removesuffix(suffix), suffix[1:]
    return None


def _seconds(entry: Mapping[str, Any], name: str) -> float:
    """Return an entry's ``real_time`` in seconds."""
    value = entry.get("real_time")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BenchmarkOutputError(
            f"benchmark {name!r} has no numeric 'real_time': {_preview(entry)}"
        )
    unit = entry.get("time_unit", "ns")
    if unit not in _SECONDS_PER_UNIT:
        raise BenchmarkOutputError(
            f"benchmark {name!r} has unknown time_unit {unit!r}; "
            f"expected one of {sorted(_SECONDS_PER_UNIT)}"
        )
    seconds = float(value) * _SECONDS_PER_UNIT[unit]
    if not math.isfinite(seconds) or seconds <= 0:
        raise BenchmarkOutputError(
            f"benchmark {name!r} has real_time {value!r}; it must be a positive number"
        )
    return seconds


def _preview(entry: Mapping[str, Any]) -> str:
    """Return the start of an entry as JSON, for error messages."""
    text = json.dumps(entry, default=str)
    return text if len(text) <= 200 else text[:197] + "..."
