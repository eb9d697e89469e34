"""Tests of ``agent-v2 serve``: flags, refusals and a graceful stop."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from agent_v2.cli import main


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """``serve --help`` shows every documented flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--dataset",
        "--devices",
        "--workdir",
        "--store",
        "--token",
        "--max-queue",
        "--backend",
        "--dummy-latency",
        "--shutdown-grace",
        "--max-connections",
        "--idle-timeout",
        "--body-timeout",
    ):
        assert flag in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "without a token"),
        (["--devices", "gpu:x"], "'gpu:x'"),
        (["--dataset", "no-equals-sign"], "'no-equals-sign'"),
        (["--max-queue", "0"], "max_queue"),
        (["--max-connections", "0"], "max_connections"),
        (["--idle-timeout", "0"], "idle_timeout"),
        (["--body-timeout", "-1"], "body_timeout"),
    ],
)
def test_bad_flags_exit_2_with_a_message(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    """Settings that cannot be served stop the command with exit code 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENT_V2_TOKEN", raising=False)

    assert main(["serve", "--port", "0", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_port_in_use_is_a_clear_error(
    tmp_path: Path,
    c_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Binding a port that is taken exits 2 and names the address."""
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port), f"--dataset=csum={c_dataset}"])

    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_workdir_that_cannot_be_made_is_a_clear_error(
    tmp_path: Path,
    c_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A --workdir that is a file exits 2 naming the folder, not the address."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    code = main(
        ["serve", "--port", "0", f"--dataset=csum={c_dataset}", "--workdir=a-file"]
    )

    assert code == 2
    err = capsys.readouterr().err
    assert "a-file/containers: Not a directory" in err
    assert "listen" not in err


async def test_serve_prints_its_url_and_stops_cleanly_on_sigterm(
    tmp_path: Path, c_dataset: Path
) -> None:
    """The process announces its URL, serves /healthz, and exits 0 on SIGTERM."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_v2.cli",
        "serve",
        "--port=0",
        f"--dataset=csum={c_dataset}",
        f"--store={tmp_path / 'store.sqlite3'}",
        f"--workdir={tmp_path / 'work'}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        url = line.decode().split()[-1]
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as r:
            assert (await r.json())["status"] == "ok"

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert (tmp_path / "store.sqlite3").exists()
