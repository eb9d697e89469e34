"""One benchmark cell's client, in a child process so its CPU and memory are its own.

Run as ``python -m agent_v2._bench._worker SPEC OUT``: SPEC is a JSON file
with ``variant`` and the fields of :class:`~agent_v2._bench._clients.Job`;
the figures are written to OUT as JSON. Only the calls are timed: the
interpreter's start and the variant's imports happen before the clock starts.

TCP connections are counted with an audit hook on ``socket.connect``, which
every connection attempt passes through whatever library makes it (blocking
``requests`` and asyncio's non-blocking connect alike); only connects to the
server's port count.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent_v2._bench._clients import VARIANTS, Job, import_for

__all__ = ["ConnectCounter", "main", "run_cell"]


class ConnectCounter:
    """An audit hook that counts ``socket.connect`` calls to one port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self._lock = threading.Lock()  # the threaded variants connect at once

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "socket.connect":
            return
        address = args[1]
        if isinstance(address, tuple) and address[1:2] == (self.port,):
            with self._lock:
                self.count += 1


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the variant ``spec`` names; return its figures."""
    variant = spec["variant"]
    job = Job(**{**spec["job"], "containers": tuple(spec["job"]["containers"])})
    counter = ConnectCounter(int(spec["port"]))
    sys.addaudithook(counter)
    import_for(variant)

    rss_ready = _peak_rss_kib()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    tally = VARIANTS[variant](job)
    wall = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before

    return {
        "variant": variant,
        "n": len(job.containers),
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_total_s": _cpu_seconds(),
        "rss_ready_mib": rss_ready / 1024,
        "peak_rss_mib": _peak_rss_kib() / 1024,
        "connections": counter.count,
        "ok": tally.ok,
        "failed": tally.failed,
        "errors": tally.errors,
        "client_stats": tally.client_stats,
    }


def _cpu_seconds() -> float:
    """Return the user and system CPU seconds this process used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_kib() -> int:
    """Return this process's peak resident set size in KiB.

    NOTE: not ``ru_maxrss``: Linux carries the parent's high-water mark over
    fork and exec into it, so every child would report at least the size of
    the benchmark process that started it. ``VmHWM`` belongs to this
    program's own address space.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _raise_open_files_limit() -> None:
    """Allow as many open sockets as the hard limit does (1,000 calls at once)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> int:
    """Read the spec, run the cell, write the figures."""
    if len(argv) != 2:
        raise SystemExit("usage: python -m agent_v2._bench._worker SPEC OUT")
    spec = json.loads(Path(argv[0]).read_text())
    _raise_open_files_limit()
    figures = run_cell(spec)
    Path(argv[1]).write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
