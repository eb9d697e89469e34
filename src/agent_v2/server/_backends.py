"""The one place that builds a sandbox backend from the server's settings."""

from __future__ import annotations

from agent_v2.sandbox import DummyBackend, LocalBackend, SandboxBackend
from agent_v2.server._settings import ServerSettings

__all__ = ["make_backend"]


def make_backend(settings: ServerSettings) -> SandboxBackend:
    """Return the backend ``settings.backend`` names, not yet opened."""
    if settings.backend == "dummy":
        return DummyBackend(settings.dummy_latency)
    return LocalBackend(settings.workdir)
