"""Tests of ``agent-v2 bench``: the tiny run end to end, and its parts.

No timing is asserted: the figures depend on the machine. These tests pin
that the benchmark runs, that every evaluation in it succeeds, and that it
writes the files and the structure the README and the lead rely on.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_v2._bench import BenchConfig, render_markdown
from agent_v2._bench._cells import predicted_seconds
from agent_v2._bench._report import evaluate_goals
from agent_v2._bench._worker import ConnectCounter
from agent_v2.cli import main
from agent_v2.errors import ConfigError

QUICK_TIMEOUT = 600


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run ``agent-v2 bench --quick`` once; return its output folder and stdout."""
    output = tmp_path_factory.mktemp("bench") / "results"
    command = [sys.executable, "-m", "agent_v2.cli", "bench", "--quick"]
    completed = subprocess.run(
        [*command, f"--output={output}"],
        cwd=output.parent,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output, completed.stdout


@pytest.mark.slow
@pytest.mark.timeout(QUICK_TIMEOUT + 60)
def test_quick_run_writes_markdown_json_and_png(quick_run: tuple[Path, str]) -> None:
    """The quick run writes results.md, results.json and a PNG, and prints tables."""
    output, stdout = quick_run
    assert (output / "results.png").read_bytes().startswith(b"\x89PNG")
    markdown = (output / "results.md").read_text()
    for heading in (
        "## Machine",
        "## 1. Concurrency, dummy backend",
        "## 1. Concurrency, local backend",
        "## 2. Client overhead",
        "## 3. Server under load",
        "## Goals",
    ):
        assert heading in markdown
        assert heading in stdout
    assert "wrote " in stdout


@pytest.mark.slow
@pytest.mark.timeout(QUICK_TIMEOUT + 60)
def test_quick_run_grades_every_evaluation(quick_run: tuple[Path, str]) -> None:
    """Every cell of every table ran all its evaluations, and all succeeded."""
    results = json.loads((quick_run[0] / "results.json").read_text())
    assert results["errors"] == []
    config = results["config"]
    tables = results["concurrency"]
    assert [table["backend"] for table in tables] == ["dummy", "local"]
    for table in tables:
        cells = {(row["variant"], row["n"]) for row in table["rows"]}
        assert cells == {
            (variant, count)
            for variant in config["variants"]
            for count in config["counts"]
        }
        for row in table["rows"]:
            _assert_complete(row, row["n"])

    for row in results["overhead"]["rows"]:
        _assert_complete(row, config["overhead_evaluations"])
    for run in ("waiting", "rate"):
        load = results["load"][run]
        _assert_complete(load["client"], config["load_evaluations"])
        assert load["server_peak_rss_mib"] > 0
        assert load["healthz_ms"]["samples"] > 0


@pytest.mark.slow
@pytest.mark.timeout(QUICK_TIMEOUT + 60)
def test_quick_run_records_machine_and_goals(quick_run: tuple[Path, str]) -> None:
    """The JSON names the machine, its load, and a verdict slot for every goal."""
    results = json.loads((quick_run[0] / "results.json").read_text())
    assert {"cpu_model", "cpus", "python", "os"} <= results["machine"].keys()
    assert len(results["load_average_before"]) == 3
    assert len(results["load_average_after"]) == 3
    goals = {goal["goal"]: goal for goal in results["goals"]}
    assert goals.keys() == {
        "d_100",
        "d_1000",
        "overhead_raw",
        "overhead_c",
        "local_1000",
    }
    # The quick run has no N=100 or N=1000 row, so those goals are not judged.
    assert goals["d_100"]["met"] is None
    assert goals["overhead_raw"]["met"] in (True, False)


def _assert_complete(row: dict[str, Any], count: int) -> None:
    """Assert a cell or run graded ``count`` evaluations per repeat, all fine."""
    assert not row.get("skipped"), row
    repeats = row.get("repeats", 1)
    assert row["ok"] == count * repeats, row.get("errors")
    assert row["failed"] == 0
    assert row["connections"] >= 1
    assert row["wall_s"] > 0
    assert row["peak_rss_mib"] > 0


def test_connect_counter_counts_connects_to_its_port_only() -> None:
    """The audit hook counts socket.connect calls to the server's port, no others."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        counter = ConnectCounter(port)
        counter("socket.connect", (None, ("127.0.0.1", port)))
        counter("socket.connect", (None, ("127.0.0.1", port + 1)))
        counter("socket.connect", (None, "/tmp/a-unix-socket"))
        counter("open", ("/etc/hosts", "r", 0))
    assert counter.count == 1


def test_predicted_seconds_follow_each_variant_shape() -> None:
    """Serial (a) takes N x L, the 8-thread variants N/8 x L, the rest L."""
    assert predicted_seconds("a", 100, 1.0) == 100
    assert predicted_seconds("b", 100, 1.0) == 13
    assert predicted_seconds("f", 8, 0.5) == 0.5
    assert predicted_seconds("d", 1000, 1.0) == 1.0


def test_config_refuses_unknown_variants_and_backends() -> None:
    """BenchConfig names the unknown variant or backend it was given."""
    with pytest.raises(ConfigError, match="'z'"):
        BenchConfig(variants=("a", "z"))
    with pytest.raises(ConfigError, match="docker"):
        BenchConfig(backends=("docker",))
    with pytest.raises(ConfigError, match="counts"):
        BenchConfig(counts=(0,))


def test_an_output_folder_that_cannot_be_made_stops_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--output naming a file exits 2 at once, before any cell runs."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    assert main(["bench", "--quick", f"--output={taken}"]) == 2
    assert f"cannot create the --output folder {taken}" in capsys.readouterr().err


def test_goals_judge_the_dummy_table_against_nominal_latency() -> None:
    """(d) at N=100 in 1.05 L meets the 1.1 L goal; at N=1000 in 1.5 L misses 1.3 L."""
    rows = [
        {"variant": "d", "n": 100, "wall_s": 1.05, "skipped": None},
        {"variant": "d", "n": 1000, "wall_s": 1.5, "skipped": None},
    ]
    results = {"concurrency": [{"backend": "dummy", "latency_s": 1.0, "rows": rows}]}
    goals = {goal["goal"]: goal["met"] for goal in evaluate_goals(results)}
    assert goals["d_100"] is True
    assert goals["d_1000"] is False
    assert goals["overhead_raw"] is None


def test_markdown_marks_skipped_cells() -> None:
    """A skipped cell appears in its table with the reason, not as a figure."""
    skipped = {"variant": "a", "n": 1000, "repeats": 0, "skipped": "skipped: slow"}
    results = {
        "config": {"quick": False, "repeats": 3, "cheap_seconds": 30.0},
        "started_at": "2024-01-01T00:00:00+00:00",
        "finished_at": "2024-01-01T00:01:00+00:00",
        "machine": {
            "cpu_model": "x",
            "cpus": 2,
            "cpus_usable": 2,
            "memory_gib": 1.0,
            "implementation": "CPython",
            "python": "3.11",
            "os": "Linux",
        },
        "load_average_before": [0.0, 0.0, 0.0],
        "load_average_after": [0.0, 0.0, 0.0],
        "concurrency": [
            {
                "backend": "dummy",
                "latency_s": 1.0,
                "lone_latency_s": 1.0,
                "lone_runs_s": [1.0],
                "containers": 1000,
                "rows": [skipped],
            }
        ],
    }
    assert "| 1000 | skipped: slow |" in render_markdown(results)
