"""The ``agent-v2`` command line: ``serve``, ``demo``, ``evaluate``, ``bench``.

This module only parses arguments and hands them to the library; each
subcommand lives in its own module under ``agent_v2._cli``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from agent_v2 import __version__
from agent_v2.errors import AgentV2Error

__all__ = ["main"]

_SUBCOMMANDS = {
    "serve": "agent_v2._cli.serve",
    "demo": "agent_v2._cli.demo",
    "evaluate": "agent_v2._cli.evaluate",
    "bench": "agent_v2._cli.bench",
}


def _build_parser() -> argparse.ArgumentParser:
    """Return the parser with every subcommand that is installed."""
    parser = argparse.ArgumentParser(
        prog="agent-v2",
        description="Grade the work of many coding agents at once.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2

    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.run(args)
    except AgentV2Error as exc:
        print(f"agent-v2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"agent-v2 {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
