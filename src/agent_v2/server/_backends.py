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
    if settings.backend == "docker":
        return _docker_backend(settings)
    # The store holds every agent's outputs: commands must not read it either.
    store_folder = settings.store_path.resolve().parent
    hidden = () if store_folder == Path("/") else (store_folder,)
    return LocalBackend(settings.workdir, isolation=Isolation(hidden=hidden))


def _docker_backend(settings: ServerSettings) -> SandboxBackend:
    """Return the docker backend; aiodocker is imported only here."""
    from agent_v2.sandbox._docker import DockerBackend, GpuVendor

    vendor: GpuVendor
    if settings.gpu_vendor == "amd":
        vendor = "amd"
    elif settings.gpu_vendor == "nvidia":
        vendor = "nvidia"
    else:
        vendor = "none"
    return DockerBackend(
        docker_url=settings.docker_url,
        gpu_vendor=vendor,
        memory=settings.container_memory,
        pids_limit=settings.container_pids,
        cpus=settings.container_cpus,
        network=settings.container_network,
    )
