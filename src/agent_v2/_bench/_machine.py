"""What machine a benchmark ran on: CPU, cores, memory, Python, OS, load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

from agent_v2 import __version__

__all__ = ["git_commit", "load_average", "machine_info"]


def machine_info() -> dict[str, Any]:
    """Return the machine's description; reads /proc, so call it off the loop."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "os": platform.platform(),
        "agent_v2": __version__,
    }


def load_average() -> tuple[float, float, float]:
    """Return the 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


async def git_commit(folder: Path) -> str | None:
    """Return the commit checked out in ``folder``, or None outside a checkout."""
    with contextlib.suppress(OSError):
        process = await asyncio.create_subprocess_exec(
            "git",
            "-C",
            str(folder),
            "rev-parse",
            "--short",
            "HEAD",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        stdout, _ = await process.communicate()
        if process.returncode == 0:
            return stdout.decode().strip() or None
    return None


def _cpu_model() -> str:
    """Return the CPU's model name (Linux), or what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    """Return the machine's memory in GiB (Linux), else None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None
