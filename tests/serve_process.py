"""Run ``agent-v2 serve`` as a real subprocess for tests that signal or kill it.

::

    async with ServeProcess.start(["--backend=dummy", ...], log=tmp_path / "a.log")
        as server:
        ...  # server.url, server.port, server.pid, server.rss()
        await server.terminate()  # SIGTERM; returns the exit code

Leaving the block kills the process if it still runs. Its stderr (the log)
goes to ``log``; ``--log-level`` goes before ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import psutil

STARTUP_TIMEOUT = 60.0


@dataclasses.dataclass
class ServeProcess:
    """One running ``agent-v2 serve`` process."""

    process: asyncio.subprocess.Process
    url: str
    log: Path

    @property
    def port(self) -> int:
        """Return the port the server listens on."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.process.pid

    def rss(self) -> int:
        """Return the resident memory of the process, in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def kill(self) -> None:
        """Send SIGKILL."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def terminate(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Send SIGTERM and return the exit code once the process is gone."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)

    def log_text(self) -> str:
        """Return what the process logged so far."""
        return self.log.read_text(errors="replace")

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        serve_args: Sequence[str],
        *,
        log: Path,
        log_level: str = "INFO",
        env: Mapping[str, str] | None = None,
    ) -> AsyncIterator[ServeProcess]:
        """Start the server and wait until it listens; kill it on exit."""
        full_env = {**os.environ, **(env or {})}
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent_v2.cli",
                f"--log-level={log_level}",
                "serve",
                *serve_args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=full_env,
            )
            try:
                assert process.stdout is not None
                line = await asyncio.wait_for(
                    process.stdout.readline(), STARTUP_TIMEOUT
                )
                assert b"listening on" in line, f"no server started; see {log}"
                yield cls(process, line.decode().split()[-1], log)
            finally:
                if process.returncode is None:
                    process.kill()
                await process.wait()
