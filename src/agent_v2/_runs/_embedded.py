"""The embedded server: an evaluation server inside the command that needs it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from agent_v2.datasets import Dataset
from agent_v2.server import ServerSettings, serve
from agent_v2.server._devices import default_devices_spec
from agent_v2.server._settings import DEFAULT_DUMMY_LATENCY

__all__ = ["EmbeddedOptions", "EmbeddedServer", "embedded_server"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddedOptions:
    """How to start an embedded server.

    ``datasets`` are loaded datasets or ``NAME=PATH`` specs. ``workdir`` is
    where the containers live; None puts them in the temporary folder, which
    also holds the store and is deleted afterwards unless ``keep`` is set.
    ``devices`` None gives one pinned slot per core.
    """

    datasets: Sequence[Dataset | str]
    devices: str | None = None
    backend: str = "local"
    dummy_latency: float = DEFAULT_DUMMY_LATENCY
    workdir: Path | None = None
    keep: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddedServer:
    """A running embedded server: its URL, settings and temporary folder."""

    url: str
    settings: ServerSettings
    folder: Path


@contextlib.asynccontextmanager
async def embedded_server(options: EmbeddedOptions) -> AsyncIterator[EmbeddedServer]:
    """Serve on a free loopback port with a temporary store; yield the server.

    Leaving the block stops the server (running evaluations are left
    unfinished) and deletes the temporary folder unless ``options.keep``.
    """
    folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="agent-v2-"))
    try:
        # NOTE: built in a thread: ServerSettings loads the dataset files.
        settings = await asyncio.to_thread(_settings, options, folder)
        async with serve(settings) as url:
            logger.debug("embedded server at %s, files in %s", url, folder)
            yield EmbeddedServer(url=url, settings=settings, folder=folder)
    finally:
        if not options.keep:
            await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)


def _settings(options: EmbeddedOptions, folder: Path) -> ServerSettings:
    """Return the settings of an embedded server keeping its files in ``folder``."""
    return ServerSettings(
        datasets=options.datasets,
        host=LOOPBACK,
        port=0,
        devices=options.devices or default_devices_spec(),
        workdir=options.workdir or folder / "work",
        store_path=folder / "store.sqlite3",
        backend=options.backend,
        dummy_latency=options.dummy_latency,
        shutdown_grace=0.0,
    )
