"""``agent-v2 bench``: run the benchmarks, print the tables, write the results."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from agent_v2._bench import BenchConfig, render_markdown, run_bench, write_results
from agent_v2._bench._config import BACKENDS, DEFAULT_LATENCY, DEFAULT_REPEATS
from agent_v2.errors import ConfigError

__all__ = ["add_parser"]

DEFAULT_OUTPUT = Path("benchmarks/results")


def add_parser(subparsers: Any) -> None:
    """Add ``bench`` and its flags."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="benchmark the client and the server on loopback",
        description="Start the server on loopback and measure, side by side: "
        "wall time, CPU, memory and connections of the old and new clients at "
        "N concurrent evaluations; the client's overhead; the server under "
        "thousands of waiting evaluations. Prints the tables and writes "
        "results.md, results.json and results.png. Every run is bounded.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny version (N=2,5, L=0.05 s; under a minute): checks that "
        "everything runs, measures nothing worth quoting",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help="where to write the results (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="K",
        help=f"runs per cheap cell, reported as the median (default: "
        f"{DEFAULT_REPEATS}; 1 with --quick)",
    )
    _add_scope(parser)
    parser.set_defaults(run=run)


def _add_scope(parser: argparse.ArgumentParser) -> None:
    """Add the flags that choose what to measure."""
    parser.add_argument(
        "--counts",
        default=None,
        metavar="N,N,...",
        help="concurrent evaluations per table row (default: 10,100,1000)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        metavar="V,V,...",
        help="client variants of the tables, from a-f (default: all)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"L, the time one evaluation takes (default: {DEFAULT_LATENCY:g})",
    )
    parser.add_argument(
        "--max-cell-seconds",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip a table cell predicted to take longer (default: 120)",
    )
    parser.add_argument(
        "--skip-local",
        action="store_true",
        help="skip the table on the local backend",
    )
    parser.add_argument(
        "--skip-overhead", action="store_true", help="skip the client overhead run"
    )
    parser.add_argument(
        "--skip-load", action="store_true", help="skip the server-under-load run"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")


def run(args: argparse.Namespace) -> int:
    """Build the config from the flags, run, print and write the results."""
    config = _config(args)
    try:  # found out before a run of minutes, not after
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the --output folder {args.output}: {exc.strerror or exc}"
        ) from exc
    # NOTE: SIGTERM becomes KeyboardInterrupt so that the benchmark's cleanup
    # runs and stops the server and client children it started.
    signal.signal(signal.SIGTERM, _interrupt)
    results = asyncio.run(run_bench(config, source=Path.cwd()))
    print(render_markdown(results))
    written = write_results(results, args.output, plot=config.plot)
    for path in written:
        print(f"wrote {path}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """Turn a stop signal into KeyboardInterrupt."""
    raise KeyboardInterrupt


def _config(args: argparse.Namespace) -> BenchConfig:
    """Return the BenchConfig the flags describe."""
    fields: dict[str, Any] = {"plot": not args.no_plot}
    if args.repeats is not None:
        fields["repeats"] = args.repeats
    if args.counts is not None:
        fields["counts"] = _counts(args.counts)
    if args.variants is not None:
        fields["variants"] = tuple(
            name.strip() for name in args.variants.split(",") if name.strip()
        )
    if args.latency is not None:
        fields["latency"] = args.latency
    if args.max_cell_seconds is not None:
        fields["max_cell_seconds"] = args.max_cell_seconds
    if args.skip_local:
        fields["backends"] = tuple(name for name in BACKENDS if name != "local")
    fields["overhead"] = not args.skip_overhead
    fields["load"] = not args.skip_load
    if args.quick:
        return BenchConfig.quick_config(**fields)
    return BenchConfig(**fields)


def _counts(text: str) -> tuple[int, ...]:
    """Parse ``--counts 10,100``."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"--counts must be integers separated by commas, got {text!r}"
        ) from None
