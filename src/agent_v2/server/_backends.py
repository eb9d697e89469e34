"""The one place that builds a sandbox backend from the server's settings."""

from __future__ import annotations

from pathlib import Path

from agent_v2.sandbox import DummyBackend, Isolation, LocalBackend, SandboxBackend
from agent_v2.server._settings import ServerSettings

__all__ = ["make_backend"]


def make_backend(settings: ServerSettings) -> SandboxBackend:
    """Return the backend ``settings.backend`` names, not yet opened."""
    if settings.backend == "dummy":
        return DummyBackend(settings.dummy_latency)
    # The store holds every agent's outputs: commands must not read it either.
    store_folder = settings.store_path.resolve().parent
    hidden = () if store_folder == Path("/") else (store_folder,)
    return LocalBackend(settings.workdir, isolation=Isolation(hidden=hidden))
