"""``agent-v2 serve``: run the evaluation server until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from agent_v2.datasets import bundled_dataset_path
from agent_v2.errors import ConfigError
from agent_v2.protocol import DEFAULT_EVALUATION_TIMEOUT, DEFAULT_GPU_ACQUIRE_TIMEOUT
from agent_v2.server import ServerSettings, run_server
from agent_v2.server._devices import default_devices_spec
from agent_v2.server._settings import (
    BACKEND_KINDS,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_CONTAINER_MEMORY,
    DEFAULT_CONTAINER_PIDS,
    DEFAULT_DUMMY_LATENCY,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_STATE_DIR,
    GPU_VENDORS,
)

__all__ = ["add_parser"]

TOKEN_ENV = "AGENT_V2_TOKEN"
DEFAULT_DATASET = "demo"


def add_parser(subparsers: Any) -> None:
    """Add ``serve`` and its flags."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the evaluation server",
        description="Run the evaluation server until SIGINT or SIGTERM. "
        "Accepted evaluations are kept in the store and run again after a restart.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="0: any free port"
    )
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="NAME=PATH",
        help="a dataset to serve (repeatable); default: the bundled "
        f"{DEFAULT_DATASET!r} dataset",
    )
    parser.add_argument(
        "--devices",
        default=None,
        metavar="SPEC",
        help="'gpu:0,1,...' or 'cpu:N' (default: "
        f"{default_devices_spec()}, one pinned slot per core)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where containers live (default: %(default)s)",
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=DEFAULT_STATE_DIR / "store.sqlite3",
        help="the SQLite store file (default: %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}); "
        "needed for a non-loopback --host",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="queued evaluations before submits get 429 (default: %(default)s)",
    )
    parser.add_argument("--backend", choices=BACKEND_KINDS, default="local")
    parser.add_argument(
        "--dummy-latency",
        type=float,
        default=DEFAULT_DUMMY_LATENCY,
        metavar="SECONDS",
        help="seconds each dummy-backend command takes (default: %(default)s)",
    )
    _add_limits(parser)
    _add_connection_limits(parser)
    _add_docker(parser)
    parser.set_defaults(run=run)


def _add_docker(parser: argparse.ArgumentParser) -> None:
    """Add the flags of the docker backend (see docs/docker.md)."""
    group = parser.add_argument_group("docker backend")
    group.add_argument(
        "--docker-url",
        default=None,
        metavar="URL",
        help="engine address (default: as the docker CLI finds it)",
    )
    group.add_argument(
        "--gpu-vendor",
        choices=GPU_VENDORS,
        default="none",
        help="how containers get the leased GPUs (default: %(default)s)",
    )
    group.add_argument(
        "--container-memory",
        default=DEFAULT_CONTAINER_MEMORY,
        metavar="SIZE",
        help="memory per container, e.g. 8g (default: %(default)s)",
    )
    group.add_argument(
        "--container-pids",
        type=int,
        default=DEFAULT_CONTAINER_PIDS,
        metavar="N",
        help="processes per container (default: %(default)s)",
    )
    group.add_argument(
        "--container-cpus",
        type=float,
        default=None,
        metavar="CORES",
        help="CPU time per container in cores (default: no limit)",
    )
    group.add_argument(
        "--container-network",
        action="store_true",
        help="give containers the engine's default network (default: none)",
    )


def _add_limits(parser: argparse.ArgumentParser) -> None:
    """Add the timeout and size flags."""
    parser.add_argument(
        "--evaluation-timeout",
        type=float,
        default=DEFAULT_EVALUATION_TIMEOUT,
        metavar="SECONDS",
        help="default time an evaluation may run (default: %(default)s)",
    )
    parser.add_argument(
        "--gpu-acquire-timeout",
        type=float,
        default=DEFAULT_GPU_ACQUIRE_TIMEOUT,
        metavar="SECONDS",
        help="default time an evaluation may wait for a device (default: %(default)s)",
    )
    parser.add_argument(
        "--max-body-size",
        type=int,
        default=DEFAULT_MAX_BODY_SIZE,
        metavar="BYTES",
        help="largest request body accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="time running evaluations get to finish on shutdown before they are "
        "left for the next start (default: %(default)s)",
    )


def _add_connection_limits(parser: argparse.ArgumentParser) -> None:
    """Add the flags that bound what slow or silent clients can hold."""
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections at most; at the cap the longest-idle one is "
        "closed for a newcomer (default: %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that sends no complete request head for this "
        "long, new or kept alive (default: %(default)s)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT,
        metavar="SECONDS",
        help="time a request body may take to arrive (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Build the settings from the flags and serve."""
    datasets = args.dataset or [
        f"{DEFAULT_DATASET}={bundled_dataset_path(DEFAULT_DATASET)}"
    ]
    settings = ServerSettings(
        datasets=datasets,
        host=args.host,
        port=args.port,
        devices=args.devices or default_devices_spec(),
        workdir=args.workdir,
        store_path=args.store,
        token=args.token,
        max_queue=args.max_queue,
        backend=args.backend,
        dummy_latency=args.dummy_latency,
        evaluation_timeout=args.evaluation_timeout,
        gpu_acquire_timeout=args.gpu_acquire_timeout,
        max_body_size=args.max_body_size,
        shutdown_grace=args.shutdown_grace,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        body_timeout=args.body_timeout,
        docker_url=args.docker_url,
        gpu_vendor=args.gpu_vendor,
        container_memory=args.container_memory,
        container_pids=args.container_pids,
        container_cpus=args.container_cpus,
        container_network=args.container_network,
    )
    try:
        run_server(settings, on_ready=_announce)
    except OSError as exc:
        # Listening and the workdir say what failed themselves; this names
        # the file of anything else the operating system refused.
        where = f" ({exc.filename})" if exc.filename else ""
        raise ConfigError(f"stopped: {exc.strerror or exc}{where}") from exc
    return 0


def _announce(url: str) -> None:
    """Tell the user (and scripts waiting for it) where the server listens."""
    print(f"agent-v2 serve: listening on {url}", flush=True)
    print(f"agent-v2 serve: {url}/openapi.json describes the API", file=sys.stderr)
