"""``agent-v2 demo``: grade known changes to the demo dataset on an embedded server."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from rich.console import Console

from agent_v2._cli.evaluate import routed_logs
from agent_v2._demo import BUNDLED_VARIANTS, DemoOptions, run_demo
from agent_v2._demo._display import DemoProgress, print_report
from agent_v2.server._devices import default_devices_spec

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Add ``demo`` and its flags."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="grade known changes to the bundled demo kernels",
        description="Start an embedded server on the demo dataset, then run one "
        "scripted agent per instance and variant in parallel: each starts a "
        "container, applies its change and submits it with evaluate_info. "
        "Exit code 1 when an outcome is not what its variant must get.",
    )
    parser.add_argument(
        "--instances",
        type=_names,
        metavar="A,B,...",
        help="instances to grade (default: all)",
    )
    parser.add_argument(
        "--variants",
        type=_names,
        metavar="A,B,...",
        help="variants to grade: baseline, reference, build_broken, test_broken, "
        "slower (default: all)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="agents at work at once (default: all of them)",
    )
    parser.add_argument(
        "--devices",
        metavar="SPEC",
        help=f"device slots of the server (default: {default_devices_spec()}, "
        "each evaluation pinned to its own cores)",
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the server's folder and the agents' containers, and say where",
    )
    parser.add_argument(
        "--variants-file",
        type=Path,
        default=BUNDLED_VARIANTS,
        metavar="FILE",
        help="variants and their expected outcomes (default: the bundled file)",
    )
    parser.set_defaults(run=run)


def _names(text: str) -> list[str]:
    """Split a comma-separated list of names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected names separated by commas: {text!r}"
        )
    return names


def run(args: argparse.Namespace) -> int:
    """Run the demo with a live display; print the table and summary."""
    options = DemoOptions(
        instances=args.instances,
        variants=args.variants,
        concurrency=args.concurrency,
        devices=args.devices,
        keep_workdir=args.keep_workdir,
        variants_file=args.variants_file,
    )
    console = Console()
    with routed_logs(console, args.log_level), DemoProgress(console) as progress:
        report = asyncio.run(run_demo(options, progress))
    print_report(console, report)
    return report.exit_code
