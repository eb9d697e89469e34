"""Tests for parsing Google Benchmark JSON and computing the speedup."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import agent_v2.evaluation
from agent_v2.errors import AgentV2Error
from agent_v2.evaluation import (
    BenchmarkOutputError,
    BenchmarkStatistic,
    parse_benchmark_output,
    speedup,
)


def _entry(
    name: str, real_time: float, unit: str = "ns", **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "run_name": name,
        "run_type": "iteration",
        "iterations": 100,
        "real_time": real_time,
        "cpu_time": real_time,
        "time_unit": unit,
        **extra,
    }


def _aggregate(run_name: str, aggregate: str, real_time: float) -> dict[str, Any]:
    return {
        "name": f"{run_name}_{aggregate}",
        "run_name": run_name,
        "run_type": "aggregate",
        "aggregate_name": aggregate,
        "real_time": real_time,
        "cpu_time": real_time,
        "time_unit": "ns",
    }


def _document(*entries: dict[str, Any]) -> str:
    context = {"date": "2024-01-01T00:00:00", "num_cpus": 2, "caches": [{"level": 1}]}
    return json.dumps({"context": context, "benchmarks": list(entries)}, indent=2)


def test_public_names_are_pinned() -> None:
    """The evaluation package exports exactly the documented names."""
    assert sorted(agent_v2.evaluation.__all__) == [
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


def test_units_are_normalised_to_seconds() -> None:
    """real_time in ns, us, ms and s all come out in seconds."""
    output = _document(
        _entry("BM_ns", 2_000_000, "ns"),
        _entry("BM_us", 2_000, "us"),
        _entry("BM_ms", 2, "ms"),
        _entry("BM_s", 0.002, "s"),
        {"name": "BM_default", "run_type": "iteration", "real_time": 2e6},
    )

    times = parse_benchmark_output(output)

    assert set(times) == {"BM_ns", "BM_us", "BM_ms", "BM_s", "BM_default"}
    for value in times.values():
        assert value == pytest.approx(0.002)


def test_json_is_found_among_other_text() -> None:
    """Log lines (with braces) before and after the JSON are ignored."""
    output = (
        'Running ./bench {with braces}\n{"not": "benchmarks"}\n'
        + _document(_entry("BM_a", 1e6))
        + "\nDone. }{ trailing\n"
    )

    assert parse_benchmark_output(output) == {"BM_a": pytest.approx(1e-3)}


def test_several_documents_are_merged() -> None:
    """Two benchmark programs run by one command report all their benchmarks."""
    output = _document(_entry("BM_a", 1e6)) + "\n" + _document(_entry("BM_b", 3e6))

    assert parse_benchmark_output(output) == {
        "BM_a": pytest.approx(1e-3),
        "BM_b": pytest.approx(3e-3),
    }


# Three repetitions of BM_x (10, 50 and 12 ns) and their aggregates.
REPETITIONS = (
    _entry("BM_x", 10.0, repetition_index=0),
    _entry("BM_x", 50.0, repetition_index=1),
    _entry("BM_x", 12.0, repetition_index=2),
    _aggregate("BM_x", "mean", 24.0),
    _aggregate("BM_x", "median", 12.0),
    _aggregate("BM_x", "stddev", 22.0),
    _aggregate("BM_x", "cv", 0.9),
)


def test_repetitions_prefer_the_median_aggregate() -> None:
    """With repetitions the median wins; mean, stddev and cv are skipped."""
    output = _document(*REPETITIONS)

    assert parse_benchmark_output(output) == {"BM_x": pytest.approx(12e-9)}


def test_iterations_without_median_are_averaged() -> None:
    """Repeated entries of one name without a median give their mean."""
    output = _document(
        _entry("BM_x", 10.0), _entry("BM_x", 30.0), _aggregate("BM_x", "mean", 20.0)
    )

    assert parse_benchmark_output(output) == {"BM_x": pytest.approx(20e-9)}


def test_min_takes_the_fastest_repetition() -> None:
    """With ``min`` each benchmark's time is its fastest repetition."""
    output = _document(*REPETITIONS, _entry("BM_y", 5.0))

    times = parse_benchmark_output(output, BenchmarkStatistic.MIN)

    assert times == {"BM_x": pytest.approx(10e-9), "BM_y": pytest.approx(5e-9)}
    assert parse_benchmark_output(output)["BM_x"] == pytest.approx(12e-9)


def test_min_falls_back_to_the_median_when_only_aggregates_are_reported() -> None:
    """Output of --benchmark_report_aggregates_only has no repetitions to pick."""
    output = _document(
        _aggregate("BM_x", "mean", 25.0), _aggregate("BM_x", "median", 20.0)
    )

    times = parse_benchmark_output(output, BenchmarkStatistic.MIN)

    assert times == {"BM_x": pytest.approx(20e-9)}


def test_old_format_aggregates_are_recognised_by_suffix() -> None:
    """Without run_type, ``_median`` is the median and other suffixes are skipped."""
    entries = [
        {"name": "BM_old", "real_time": 10.0, "time_unit": "ns"},
        {"name": "BM_old", "real_time": 30.0, "time_unit": "ns"},
        {"name": "BM_old_mean", "real_time": 20.0, "time_unit": "ns"},
        {"name": "BM_old_median", "real_time": 25.0, "time_unit": "ns"},
        {"name": "BM_old_stddev", "real_time": 10.0, "time_unit": "ns"},
        {"name": "BM_old_BigO", "cpu_coefficient": 1.0, "big_o": "N"},
        {"name": "BM_old_RMS", "rms": 0.1},
    ]

    assert parse_benchmark_output(_document(*entries)) == {
        "BM_old": pytest.approx(25e-9)
    }


def test_error_entries_are_skipped() -> None:
    """Entries with error_occurred do not count."""
    output = _document(
        _entry("BM_ok", 5.0),
        _entry("BM_bad", 1.0, error_occurred=True, error_message="boom"),
    )

    assert parse_benchmark_output(output) == {"BM_ok": pytest.approx(5e-9)}


def test_only_errors_is_an_error_naming_them() -> None:
    """When every entry failed, the error carries their messages."""
    output = _document(_entry("BM_bad", 1.0, error_occurred=True, error_message="oom"))

    with pytest.raises(BenchmarkOutputError, match="BM_bad: oom"):
        parse_benchmark_output(output)


@pytest.mark.parametrize(
    "output",
    [
        "",
        "Segmentation fault\n",
        '{"context": {}}',
        '{"benchmarks": []}',
        '{"benchmarks": "none"}',
        "{" * 5000,
        '{"a":' * 3000,
    ],
)
def test_no_benchmarks_is_an_error(output: str) -> None:
    """Output without a usable benchmarks list raises BenchmarkOutputError."""
    with pytest.raises(BenchmarkOutputError, match="benchmark_format=json"):
        parse_benchmark_output(output)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"real_time": 1.0}, "has no 'name'"),
        ({"name": "BM_a", "real_time": "fast"}, "no numeric 'real_time'"),
        ({"name": "BM_a", "real_time": 1.0, "time_unit": "ps"}, "unknown time_unit"),
        ({"name": "BM_a", "real_time": 0}, "must be a positive number"),
    ],
)
def test_malformed_entries_are_errors(entry: dict[str, Any], expected: str) -> None:
    """Malformed entries raise an error that says what is wrong."""
    with pytest.raises(BenchmarkOutputError, match=expected):
        parse_benchmark_output(_document(entry))


def test_error_type_is_in_the_tree() -> None:
    """BenchmarkOutputError is both an AgentV2Error and a ValueError."""
    assert issubclass(BenchmarkOutputError, AgentV2Error)
    assert issubclass(BenchmarkOutputError, ValueError)


def test_speedup_is_the_geometric_mean_over_common_benchmarks() -> None:
    """Speedup is the geometric mean of baseline/candidate over shared names."""
    baseline = {"a": 4.0, "b": 1.0, "only_baseline": 1.0}
    candidate = {"a": 1.0, "b": 1.0, "only_candidate": 9.0}

    value, ratios = speedup(baseline, candidate)

    assert ratios == {"a": 4.0, "b": 1.0}
    assert value == pytest.approx(2.0)


def test_speedup_without_common_benchmarks_is_an_error() -> None:
    """No shared benchmark name raises, naming both sides."""
    with pytest.raises(BenchmarkOutputError, match="names must stay the same"):
        speedup({"a": 1.0}, {"b": 1.0})


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.tuples(
            st.floats(min_value=1e-6, max_value=1e3),
            st.floats(min_value=1e-6, max_value=1e3),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_speedup_lies_between_the_extreme_ratios(
    pairs: dict[str, tuple[float, float]],
) -> None:
    """The geometric mean lies within the smallest and largest ratio."""
    baseline = {name: pair[0] for name, pair in pairs.items()}
    candidate = {name: pair[1] for name, pair in pairs.items()}

    value, ratios = speedup(baseline, candidate)

    assert min(ratios.values()) * (1 - 1e-9) <= value
    assert value <= max(ratios.values()) * (1 + 1e-9)
    assert math.isfinite(value)
