"""Grading a submissions file: parsing, results file, resume, problems, summary."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from agent_v2._runs import (
    OutcomeSummary,
    ResultsFile,
    RunOptions,
    RunSummary,
    Submission,
    grade_run,
    parse_line,
    record_key,
)
from agent_v2._runs._submissions import Malformed
from agent_v2.client import ClientConfig, EvalClient, RetryPolicy
from agent_v2.errors import ConfigError
from agent_v2.protocol import Mode
from legacy_server import DEFAULT_OUTCOME, Answer, LegacyServer

# One attempt, and almost no patience with a server that is away.
ONE_ATTEMPT = ClientConfig(retry=RetryPolicy(max_attempts=1, outage_grace=0.1))


def submission(container_id: str, instance_id: str = "a", **fields: Any) -> str:
    """Return one submissions-file line for dataset ``toy``."""
    line = {
        "exit_status": "Submitted",
        "result": "the agent's final message",
        "container_id": container_id,
        "instance_id": instance_id,
        "dataset_name": "toy",
        "split": "test",
    }
    line.update(fields)
    return json.dumps(line)


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    """Write lines to a file, one per line."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """Return the JSON records of a results file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


async def grade(
    url: str,
    submissions: Path,
    output: Path,
    *,
    concurrency: int = 8,
    config: ClientConfig | None = None,
) -> RunSummary:
    """Grade a submissions file against the server at ``url``."""
    options = RunOptions(
        submissions=submissions,
        output=output,
        concurrency=concurrency,
        server_url=url,
    )
    async with EvalClient(url, config=config) as client:
        return await grade_run(options, client)


# -- parsing ------------------------------------------------------------------


def test_a_full_line_parses_into_a_submission() -> None:
    """Every field is read; the result is dropped; mode defaults to benchmark."""
    parsed = parse_line(3, submission("c1").encode())

    assert parsed == Submission(
        line=3,
        exit_status="Submitted",
        container_id="c1",
        instance_id="a",
        dataset_name="toy",
        split="test",
        mode=Mode.BENCHMARK,
    )
    assert parsed.submitted
    assert parsed.key == ("c1", "a", "toy", "test", "benchmark")


def test_a_byte_order_mark_before_the_first_line_is_dropped() -> None:
    """A submissions file saved with a UTF-8 BOM has a good first line."""
    parsed = parse_line(1, b"\xef\xbb\xbf" + submission("c1").encode())

    assert isinstance(parsed, Submission) and parsed.container_id == "c1"


def test_optional_fields_may_be_absent_or_null() -> None:
    """dataset_name, split, result and mode are optional; exit_status may be null."""
    text = (
        '{"exit_status": null, "container_id": "c", "instance_id": "i", "mode": "test"}'
    )
    parsed = parse_line(1, text)

    assert isinstance(parsed, Submission)
    assert parsed.dataset_name is None and parsed.split is None
    assert parsed.mode is Mode.TEST
    assert not parsed.submitted


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "invalid JSON at column 2"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ('{"container_id": "c", "instance_id": "i"}', "'exit_status' is missing"),
        (
            '{"exit_status": "Submitted", "instance_id": "i"}',
            "'container_id' is missing",
        ),
        (
            '{"exit_status": "Submitted", "container_id": 7, "instance_id": "i"}',
            "'container_id' must be a non-empty string, got a number (7)",
        ),
        (
            '{"exit_status": 1, "container_id": "c", "instance_id": "i"}',
            "'exit_status' must be a string or null",
        ),
        (
            '{"exit_status": "Submitted", "container_id": "c", "instance_id": " "}',
            "'instance_id' must be a non-empty string",
        ),
        (
            '{"exit_status": "S", "container_id": "c", "instance_id": "i", "split": 3}',
            "'split' must be a string or null",
        ),
        (
            '{"exit_status": "S", "container_id": "c", "instance_id": "i", '
            '"mode": "x"}',
            "'mode' must be one of build, test, benchmark",
        ),
    ],
)
def test_malformed_lines_name_the_problem(text: str, problem: str) -> None:
    """A bad line comes back as Malformed, with its number and the field at fault."""
    parsed = parse_line(9, text)

    assert isinstance(parsed, Malformed)
    assert parsed.line == 9
    assert problem in parsed.problem


def test_invalid_utf8_is_malformed() -> None:
    """Bytes that are not UTF-8 make a malformed line, not a crash."""
    parsed = parse_line(2, b'{"exit_status": "\xff"}\n')

    assert isinstance(parsed, Malformed)
    assert "UTF-8" in parsed.problem


def test_record_key_matches_the_submission_key() -> None:
    """A written record is recognised as the submission it was written for."""
    parsed = parse_line(1, submission("c1", mode="build"))
    assert isinstance(parsed, Submission)
    record = {**json.loads(submission("c1")), "mode": "build", "reward": 0.0}

    assert record_key(record) == parsed.key
    assert record_key({"container_id": "c1"}) is None
    assert record_key([1]) is None


# -- the summary figures --------------------------------------------------------


def test_summary_figures_over_records() -> None:
    """Counts by outcome, mean reward over all, geometric-mean speedup of successes."""
    summary = OutcomeSummary()
    records: list[dict[str, Any]] = [
        {"success": True, "reward": 0.5, "speedup": 2.0, "error": None},
        {"success": True, "reward": 1.0, "speedup": 8.0, "error": None},
        {"success": False, "reward": 0.0, "speedup": -1.0, "error": "build_failed"},
        {"success": False, "reward": 0.0, "speedup": -1.0, "error": "not_submitted"},
    ]
    for record in records:
        summary.add(record)

    assert summary.results == 4
    assert dict(summary.by_outcome) == {
        "success": 2,
        "build_failed": 1,
        "not_submitted": 1,
    }
    assert summary.mean_reward == pytest.approx(1.5 / 4)
    assert summary.geomean_speedup == pytest.approx(4.0)
    assert summary.to_json()["successes"] == 2


def test_empty_summary_has_no_figures() -> None:
    """Without records there is no mean reward and no speedup."""
    summary = OutcomeSummary()
    assert summary.mean_reward is None
    assert summary.geomean_speedup is None


# -- the results file -----------------------------------------------------------


async def test_a_results_file_is_locked_while_open(tmp_path: Path) -> None:
    """A second writer of the same results file is refused with a clear message."""
    path = tmp_path / "results.jsonl"
    async with ResultsFile(path) as first:
        await first.open()
        second = ResultsFile(path)
        with pytest.raises(ConfigError, match="another 'agent-v2 evaluate'"):
            await second.open()


async def test_a_partial_last_line_is_cut(tmp_path: Path) -> None:
    """A line cut by a crash is removed; complete records before it count."""
    path = tmp_path / "results.jsonl"
    record = json.loads(submission("c1")) | {"mode": "benchmark"}
    path.write_text(json.dumps(record) + "\n" + '{"container_id": "c2", "ins')

    async with ResultsFile(path) as results:
        existing = await results.open()
        await results.append(record | {"container_id": "c3"})

    assert existing.records == 1 and existing.dropped_partial
    assert [r["container_id"] for r in read_records(path)] == ["c1", "c3"]


# -- grading against servers ----------------------------------------------------


async def test_every_submission_gets_one_record(
    start_server: Any, memory_dataset: Any, tmp_path: Path
) -> None:
    """Each line is graded once and written with its key fields and outcome."""
    lines = [submission(f"c{i}", "ab"[i % 2]) for i in range(12)]
    submissions = write_lines(tmp_path / "subs.jsonl", lines)
    output = tmp_path / "out" / "results.jsonl"

    async with start_server(datasets=[memory_dataset()]) as url:
        summary = await grade(url, submissions, output)

    records = read_records(output)
    assert sorted(r["line"] for r in records) == list(range(1, 13))
    assert {r["container_id"] for r in records} == {f"c{i}" for i in range(12)}
    assert all(r["success"] and r["api"] == "v1" for r in records)
    assert all(r["evaluation_id"] and r["timings"]["total"] > 0 for r in records)
    assert summary.run.graded == 12 and summary.exit_code == 0
    assert summary.results.results == 12
    assert summary.results.mean_reward == pytest.approx(
        sum(r["reward"] for r in records) / 12
    )


async def test_a_rerun_skips_what_is_done(
    start_server: Any, memory_dataset: Any, tmp_path: Path
) -> None:
    """Lines already in the output are counted as skipped, not graded again."""
    submissions = write_lines(
        tmp_path / "subs.jsonl", [submission(f"c{i}") for i in range(6)]
    )
    output = tmp_path / "results.jsonl"

    async with start_server(datasets=[memory_dataset()]) as url:
        await grade(
            url, write_lines(tmp_path / "first.jsonl", [submission("c0")]), output
        )
        summary = await grade(url, submissions, output)
        again = await grade(url, submissions, output)

    assert (summary.run.skipped, summary.run.graded) == (1, 5)
    assert (again.run.skipped, again.run.graded) == (6, 0)
    keys = [record_key(r) for r in read_records(output)]
    assert len(keys) == len(set(keys)) == 6
    assert again.results.results == 6


async def test_malformed_lines_are_reported_and_the_rest_graded(
    start_server: Any, memory_dataset: Any, tmp_path: Path
) -> None:
    """Bad lines are listed by number; good lines around them are graded."""
    lines = [
        submission("c1"),
        "{oops",
        "",
        submission("c2"),
        '{"exit_status": "Submitted", "instance_id": "a"}',
        submission("c3"),
    ]
    submissions = write_lines(tmp_path / "subs.jsonl", lines)
    output = tmp_path / "results.jsonl"

    async with start_server(datasets=[memory_dataset()]) as url:
        summary = await grade(url, submissions, output)

    problems = [(p.line, p.kind) for p in summary.run.problems]
    assert problems == [(2, "malformed"), (5, "malformed")]
    assert "container_id" in summary.run.problems[1].detail
    assert summary.run.lines == 5 and summary.run.malformed == 2
    assert {r["container_id"] for r in read_records(output)} == {"c1", "c2", "c3"}
    assert summary.exit_code == 1


async def test_duplicates_refusals_and_runs_not_submitted(
    start_server: Any, memory_dataset: Any, tmp_path: Path
) -> None:
    """A repeated key is graded once; refusals and runs not submitted are results."""
    lines = [
        submission("c1"),
        submission("c1"),
        submission("c1", mode="build"),
        submission("c2", exit_status="TimeLimitExceeded"),
        submission("c3", instance_id="nope"),
    ]
    submissions = write_lines(tmp_path / "subs.jsonl", lines)
    output = tmp_path / "results.jsonl"

    async with start_server(datasets=[memory_dataset()]) as url:
        summary = await grade(url, submissions, output)

    by_container = {(r["container_id"], r["mode"]): r for r in read_records(output)}
    assert len(by_container) == 4
    assert by_container["c2", "benchmark"]["error"] == "not_submitted"
    assert "TimeLimitExceeded" in by_container["c2", "benchmark"]["error_detail"]
    assert by_container["c3", "benchmark"]["error"] == "instance_not_found"
    assert by_container["c1", "build"]["success"]
    assert summary.run.duplicates == 1 and summary.run.not_submitted == 1
    assert summary.exit_code == 0
    assert summary.results.by_outcome["instance_not_found"] == 1


async def test_figures_and_infra_failures_against_a_legacy_server(
    tmp_path: Path,
) -> None:
    """Against a legacy-only server: outcomes recorded, a 500 left out and reported."""
    outcomes = [
        DEFAULT_OUTCOME | {"reward": 0.5, "speedup": 2.0},
        DEFAULT_OUTCOME | {"reward": 1.0, "speedup": 8.0},
        DEFAULT_OUTCOME
        | {"success": False, "error": "tests_failed", "reward": 0.0, "speedup": -1.0},
    ]
    submissions = write_lines(
        tmp_path / "subs.jsonl", [submission(f"c{i}") for i in range(4)]
    )
    output = tmp_path / "results.jsonl"

    async with LegacyServer() as server:
        server.script = [Answer(body=body) for body in outcomes]
        failure = {"success": False, "error": "internal_error", "error_detail": "x"}
        server.script.append(Answer(status=500, body=failure))
        summary = await grade(
            server.url, submissions, output, concurrency=1, config=ONE_ATTEMPT
        )

    records = read_records(output)
    assert [r["container_id"] for r in records] == ["c0", "c1", "c2"]
    assert all(r["api"] == "legacy" for r in records)
    assert summary.results.geomean_speedup == pytest.approx(4.0)
    assert summary.results.mean_reward == pytest.approx(1.5 / 3)
    assert dict(summary.results.by_outcome) == {"success": 2, "tests_failed": 1}
    problems = [(p.line, p.kind, p.error) for p in summary.run.problems]
    assert problems == [(4, "infra_failure", "internal_error")]
    assert summary.run.infra_failures == 1 and summary.exit_code == 1


async def test_an_unreachable_server_writes_nothing(tmp_path: Path) -> None:
    """Submissions that cannot reach a server are infra failures, left for a rerun."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    submissions = write_lines(
        tmp_path / "subs.jsonl", [submission("c1"), submission("c2")]
    )
    output = tmp_path / "results.jsonl"

    summary = await grade(
        f"http://127.0.0.1:{port}", submissions, output, config=ONE_ATTEMPT
    )

    assert output.read_text() == ""
    assert summary.run.infra_failures == 2
    assert {p.error for p in summary.run.problems} == {"transport_error"}
    assert summary.exit_code == 1
    assert math.isnan(summary.results.mean_reward or math.nan)


def test_options_refuse_grading_into_the_submissions_file(tmp_path: Path) -> None:
    """The output must not be the input, and concurrency must be positive."""
    path = tmp_path / "subs.jsonl"
    with pytest.raises(ConfigError, match="submissions file itself"):
        RunOptions(submissions=path, output=path, server_url="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="concurrency"):
        RunOptions(
            submissions=path,
            output=tmp_path / "o",
            concurrency=0,
            server_url="http://127.0.0.1:1",
        )
