"""``agent-v2 evaluate``: flags, embedded and remote servers, resume after a kill."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_v2.cli import main
from agent_v2.client import EvalClient

FAST_KERNEL = """\
#include "kernel.h"
long long sum_squares(const int *values, int n) {
    long long total = 0;
    for (int i = 0; i < n; i++) total += (long long)values[i] * values[i];
    return total;
}
"""
WRONG_KERNEL = FAST_KERNEL.replace("return total;", "return total + 1;")


def submission(container_id: str, instance_id: str = "a", **fields: Any) -> str:
    """Return one submissions-file line for dataset ``toy``."""
    line = {
        "exit_status": "Submitted",
        "result": "done",
        "container_id": container_id,
        "instance_id": instance_id,
        "dataset_name": "toy",
        "split": "test",
    }
    line.update(fields)
    return json.dumps(line)


def write_lines(path: Path, lines: list[str]) -> Path:
    """Write lines to a file, one per line."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def toy_dataset(tmp_path: Path) -> Path:
    """Write dataset ``toy`` (instances ``a`` and ``b``, trivial commands)."""
    commands = {"build_command": "true", "test_command": "true"}
    commands["benchmark_command"] = "true"
    records = [{"instance_id": name, **commands} for name in ("a", "b")]
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(records))
    return path


def embedded_dummy(tmp_path: Path) -> list[str]:
    """Return the flags of a fast embedded server on the dummy backend."""
    return [
        "--backend",
        "dummy",
        "--dummy-latency",
        "0.01",
        "--devices",
        "cpu:4",
        f"--dataset=toy={toy_dataset(tmp_path)}",
    ]


def keys(output: Path) -> list[tuple[Any, ...]]:
    """Return the (container_id, instance_id, mode) of every record."""
    records = [json.loads(line) for line in output.read_text().splitlines()]
    return [(r["container_id"], r["instance_id"], r["mode"]) for r in records]


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """``evaluate --help`` shows every documented flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--output",
        "--server",
        "--concurrency",
        "--token",
        "--summary-json",
        "--dataset",
        "--devices",
        "--workdir",
        "--backend",
    ):
        assert flag in text


def test_embedded_run_writes_results_and_a_json_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --server, an embedded server grades; the summary also goes to JSON."""
    lines = [submission(f"c{i}", "ab"[i % 2]) for i in range(10)]
    subs = write_lines(tmp_path / "subs.jsonl", lines)
    output = tmp_path / "results.jsonl"
    summary_path = tmp_path / "summary.json"

    code = main(
        [
            "evaluate",
            str(subs),
            "-o",
            str(output),
            f"--summary-json={summary_path}",
            *embedded_dummy(tmp_path),
        ]
    )

    assert code == 0
    assert len(set(keys(output))) == 10
    summary = json.loads(summary_path.read_text())
    assert summary["exit_code"] == 0
    assert summary["run"]["graded"] == 10 and summary["run"]["lines"] == 10
    assert summary["results"]["by_outcome"] == {"success": 10}
    assert summary["results"]["geomean_speedup"] == pytest.approx(1.0)
    shown = capsys.readouterr().out
    assert "mean reward" in shown and "success" in shown


def test_malformed_lines_exit_1_and_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad lines are reported with their numbers; the others are graded; exit 1."""
    lines = [submission("c1"), "not json", submission("c2"), '{"exit_status": 5}']
    subs = write_lines(tmp_path / "subs.jsonl", lines)
    output = tmp_path / "results.jsonl"

    code = main(["evaluate", str(subs), "-o", str(output), *embedded_dummy(tmp_path)])

    captured = capsys.readouterr()
    assert code == 1
    assert "line 2: malformed" in captured.err
    assert "line 4: malformed" in captured.err
    assert "2 malformed lines (first: 2, 4)" in captured.out
    assert sorted(keys(output)) == [("c1", "a", "benchmark"), ("c2", "a", "benchmark")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--server", "http://127.0.0.1:1", "--dataset", "x=y"], "--dataset only"),
        (["--concurrency", "0"], "concurrency must be at least 1"),
        (["--summary-json", "no/such/folder/s.json"], "'no/such/folder' does not"),
    ],
)
def test_bad_flags_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    """Flags that cannot work together stop the command with exit code 2."""
    subs = write_lines(tmp_path / "subs.jsonl", [submission("c1")])
    code = main(["evaluate", str(subs), "-o", str(tmp_path / "o.jsonl"), *extra])

    assert code == 2
    assert message in capsys.readouterr().err


def test_output_paths_that_cannot_be_written_exit_2_and_keep_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A results path that is a folder is refused before grading; a summary
    path that is a folder is named after it, and the results stay written."""
    subs = write_lines(tmp_path / "subs.jsonl", [submission("c1")])
    folder = tmp_path / "folder"
    folder.mkdir()
    flags = embedded_dummy(tmp_path)

    assert main(["evaluate", str(subs), "-o", str(folder), *flags]) == 2
    assert "cannot open the results file" in capsys.readouterr().err

    output = tmp_path / "results.jsonl"
    run = ["evaluate", str(subs), "-o", str(output), f"--summary-json={folder}"]
    assert main([*run, *flags]) == 2
    assert f"cannot write the summary to {folder}" in capsys.readouterr().err
    assert keys(output) == [("c1", "a", "benchmark")]


def test_a_missing_submissions_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A submissions path that does not exist is named in the error."""
    missing = tmp_path / "nope.jsonl"
    code = main(["evaluate", str(missing), "-o", str(tmp_path / "o.jsonl")])

    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_an_unreachable_server_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """A --server nobody listens on is a clear error before any line is read."""
    monkeypatch.setenv("AGENT_V2_MAX_ATTEMPTS", "1")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    subs = write_lines(tmp_path / "subs.jsonl", [submission("c1")])
    output = tmp_path / "o.jsonl"

    code = main(
        ["evaluate", str(subs), "-o", str(output), f"--server=http://127.0.0.1:{port}"]
    )

    assert code == 2
    assert "cannot reach the evaluation server" in capsys.readouterr().err
    assert not output.exists()


async def _run_cli(*args: str) -> int:
    """Run ``agent-v2`` in a subprocess, quietly; return its exit code."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_v2.cli",
        *args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    async with asyncio.timeout(120):
        return await process.wait()


def _complete_lines(path: Path) -> int:
    """Return how many newline-terminated lines a file has (0 when absent)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def _wait_for_lines(path: Path, count: int) -> None:
    """Wait until a file another process writes has ``count`` complete lines."""
    async with asyncio.timeout(60):
        while await asyncio.to_thread(_complete_lines, path) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
async def test_a_killed_run_resumes_without_losses_or_duplicates(
    start_server: Any, memory_dataset: Any, tmp_path: Path
) -> None:
    """SIGKILL mid-run, plus a torn last line: the rerun completes every line once."""
    lines = [submission(f"c{i}", "ab"[i % 2]) for i in range(40)]
    subs = write_lines(tmp_path / "subs.jsonl", lines)
    output = tmp_path / "results.jsonl"
    summary_path = tmp_path / "summary.json"
    common = [str(subs), "-o", str(output), "--concurrency", "4"]

    async with start_server(datasets=[memory_dataset()], dummy_latency=0.1) as url:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent_v2.cli",
            "evaluate",
            *common,
            f"--server={url}",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await _wait_for_lines(output, 3)
        process.kill()
        await process.wait()
        written = _complete_lines(output)
        with output.open("a") as file:
            file.write('{"line": 7, "container_id": "c6", "inst')  # a torn write

        code = await _run_cli(
            "evaluate", *common, f"--server={url}", f"--summary-json={summary_path}"
        )

    assert 3 <= written < 40
    assert code == 0
    found = keys(output)
    assert len(found) == len(set(found)) == 40
    assert {key[0] for key in found} == {f"c{i}" for i in range(40)}
    summary = json.loads(summary_path.read_text())
    assert summary["dropped_partial_line"] is True
    assert summary["run"]["skipped"] == written
    assert summary["run"]["graded"] == 40 - written
    assert summary["results"]["results"] == 40


@pytest.mark.timeout(300)
def test_the_embedded_local_backend_grades_real_containers(
    tmp_path: Path, c_dataset: Path, start_server: Any
) -> None:
    """Containers left by a server in --workdir are graded by the embedded one."""
    workdir = tmp_path / "state"
    dataset = f"csum={c_dataset}"

    async def prepare() -> dict[str, str]:
        """Make one container with a faster kernel and one with a wrong one."""
        kernels = {"fast": FAST_KERNEL, "wrong": WRONG_KERNEL}
        containers = {}
        async with (
            start_server(datasets=[dataset], backend="local", workdir=workdir) as url,
            EvalClient(url) as client,
        ):
            for name, kernel in kernels.items():
                created = await client.create_container("sum_squares")
                result = await client.exec(
                    created.container_id, "cat > kernel.c", stdin=kernel
                )
                assert result.exit_code == 0
                containers[name] = created.container_id
        return containers

    containers = asyncio.run(prepare())
    lines = [
        submission(cid, "sum_squares", dataset_name="csum")
        for cid in containers.values()
    ]
    subs = write_lines(tmp_path / "subs.jsonl", lines)
    output = tmp_path / "results.jsonl"

    code = main(
        [
            "evaluate",
            str(subs),
            "-o",
            str(output),
            f"--workdir={workdir}",
            f"--dataset={dataset}",
            "--devices=cpu:1",
        ]
    )

    records = {
        r["container_id"]: r for r in map(json.loads, output.read_text().splitlines())
    }
    assert code == 0
    fast, wrong = records[containers["fast"]], records[containers["wrong"]]
    assert fast["success"] and fast["speedup"] > 0 and fast["reward"] > 0
    assert wrong["error"] == "tests_failed" and wrong["reward"] == 0.0
