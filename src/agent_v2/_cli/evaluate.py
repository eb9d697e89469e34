"""``agent-v2 evaluate``: grade a whole run of submissions from a JSONL file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

from agent_v2._runs import (
    DEFAULT_CONCURRENCY,
    EmbeddedOptions,
    RunOptions,
    evaluate_file,
)
from agent_v2._runs._display import RunProgress, print_summary
from agent_v2.datasets import bundled_dataset_path
from agent_v2.errors import ConfigError
from agent_v2.server._devices import default_devices_spec
from agent_v2.server._settings import (
    DEFAULT_DUMMY_LATENCY,
    DEFAULT_STATE_DIR,
)

__all__ = ["add_parser", "routed_logs"]

TOKEN_ENV = "AGENT_V2_TOKEN"
DEFAULT_DATASET = "demo"
_EMBEDDED_ONLY = ("dataset", "devices", "workdir", "backend", "dummy_latency")


def add_parser(subparsers: Any) -> None:
    """Add ``evaluate`` and its flags."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "evaluate",
        help="grade a run of submissions from a JSONL file",
        description="Grade every submission of a JSONL file and append one result "
        "line per submission to the output as it finishes. A rerun skips the "
        "submissions already in the output. Exit code 1 when a line was "
        "malformed or could not be graded for reasons not its own. "
        "See docs/evaluate.md.",
    )
    parser.add_argument("submissions", type=Path, metavar="SUBMISSIONS.jsonl")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="RESULTS.jsonl",
        help="results file, appended to (and read back by a rerun)",
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        help="the evaluation server (default: start an embedded one)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="evaluations in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token for the server (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--summary-json",
        type=Path,
        metavar="FILE",
        help="also write the summary as JSON to FILE",
    )
    _add_embedded(parser)
    parser.set_defaults(run=run)


def _add_embedded(parser: argparse.ArgumentParser) -> None:
    """Add the flags of the embedded server (used without --server)."""
    group = parser.add_argument_group("embedded server (without --server)")
    group.add_argument(
        "--dataset",
        action="append",
        metavar="NAME=PATH",
        help="a dataset to serve (repeatable; default: the bundled "
        f"{DEFAULT_DATASET!r})",
    )
    group.add_argument(
        "--devices",
        metavar="SPEC",
        help=f"'gpu:0,1,...' or 'cpu:N' (default: {default_devices_spec()})",
    )
    group.add_argument(
        "--workdir",
        type=Path,
        help="where the containers live, as for 'agent-v2 serve' "
        f"(default: {DEFAULT_STATE_DIR})",
    )
    group.add_argument("--backend", choices=("local", "dummy"), help="default: local")
    group.add_argument(
        "--dummy-latency",
        type=float,
        metavar="SECONDS",
        help="seconds each dummy-backend command takes "
        f"(default: {DEFAULT_DUMMY_LATENCY})",
    )


def run(args: argparse.Namespace) -> int:
    """Grade the file, show progress, print (and maybe write) the summary."""
    options = _options(args)
    progress_console = Console(stderr=True)
    with (
        routed_logs(progress_console, args.log_level),
        RunProgress(progress_console) as progress,
    ):
        summary = asyncio.run(evaluate_file(options, progress))

    print_summary(Console(), summary)
    if args.summary_json is not None:
        text = json.dumps(summary.to_json(), indent=2) + "\n"
        try:
            args.summary_json.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot write the summary to {args.summary_json}: "
                f"{exc.strerror or exc}; the results are in {args.output}"
            ) from exc
    return summary.exit_code


def _options(args: argparse.Namespace) -> RunOptions:
    """Turn the flags into RunOptions; refuse embedded flags with --server."""
    if not args.submissions.is_file():
        raise ConfigError(
            f"submissions file {str(args.submissions)!r} does not exist "
            "or is not a file"
        )
    summary = args.summary_json
    if summary is not None and not summary.parent.is_dir():
        # Found out before grading, not after.
        raise ConfigError(
            f"--summary-json: the folder {str(summary.parent)!r} does not exist"
        )
    embedded = None
    if args.server is not None:
        given = [name for name in _EMBEDDED_ONLY if getattr(args, name) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ConfigError(
                f"{flags} only apply to the embedded server; drop them, or drop "
                f"--server {args.server}"
            )
    else:
        embedded = EmbeddedOptions(
            datasets=args.dataset
            or [f"{DEFAULT_DATASET}={bundled_dataset_path(DEFAULT_DATASET)}"],
            devices=args.devices,
            backend=args.backend or "local",
            dummy_latency=(
                DEFAULT_DUMMY_LATENCY
                if args.dummy_latency is None
                else args.dummy_latency
            ),
            workdir=args.workdir or DEFAULT_STATE_DIR,
        )
    return RunOptions(
        submissions=args.submissions,
        output=args.output,
        concurrency=args.concurrency,
        server_url=args.server,
        token=args.token or None,
        embedded=embedded,
    )


@contextlib.contextmanager
def routed_logs(console: Console, log_level: str) -> Iterator[None]:
    """Send log records through ``console`` so they do not tear live displays.

    Below DEBUG the level is raised to WARNING: the one INFO line per
    evaluation would bury the progress display. The root handlers and level
    are restored afterwards.
    """
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    level = logging.getLevelName(log_level)
    if level != logging.DEBUG:
        level = max(level, logging.WARNING)

    handler = RichHandler(console=console, show_path=False, level=level)
    root.handlers[:] = [handler]
    root.setLevel(level)
    try:
        yield
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
