"""Container lifecycle for agents: create, exec (idempotent by key), remove."""

from __future__ import annotations

import asyncio

from agent_v2.protocol import (
    ContainerCreated,
    ContainerRequest,
    ExecRequest,
    ExecResult,
)
from agent_v2.sandbox import SandboxBackend
from agent_v2.server._catalog import Catalog
from agent_v2.server._store import EvaluationStore

__all__ = ["Containers"]


class Containers:
    """What the ``/v1/containers`` routes do, between the wire and the backend."""

    def __init__(
        self,
        *,
        backend: SandboxBackend,
        catalog: Catalog,
        store: EvaluationStore,
        exec_timeout: float,
    ) -> None:
        self._backend = backend
        self._catalog = catalog
        self._store = store
        self._exec_timeout = exec_timeout
        self._in_flight: dict[tuple[str, str], asyncio.Future[ExecResult]] = {}

    async def create(self, request: ContainerRequest) -> ContainerCreated:
        """Create a container holding the instance's unmodified files."""
        instance = self._catalog.resolve(
            request.instance_id, request.dataset_name, request.split
        )
        container_id = await self._backend.create(instance)
        return ContainerCreated(
            container_id=container_id,
            dataset_name=instance.dataset_name,
            split=instance.split,
            instance_id=instance.instance_id,
        )

    async def exec(
        self,
        container_id: str,
        request: ExecRequest,
        idempotency_key: str | None = None,
    ) -> ExecResult:
        """Run a command; with a key seen before, return its first result instead.

        Concurrent requests with the same key share one run of the command.
        """
        if idempotency_key is None:
            return await self._run(container_id, request)

        key = (container_id, idempotency_key)
        running = self._in_flight.get(key)
        if running is not None:
            return await asyncio.shield(running)

        # Registered before any await, so a duplicate arriving meanwhile waits
        # for this run instead of starting its own.
        future: asyncio.Future[ExecResult] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await self._run_once(container_id, request, idempotency_key)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marks it retrieved when no duplicate waits
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._in_flight[key]

    async def remove(self, container_id: str) -> None:
        """Delete a container and forget its exec results."""
        await self._backend.remove(container_id)
        await self._store.delete_exec_results(container_id)

    async def _run_once(
        self, container_id: str, request: ExecRequest, idempotency_key: str
    ) -> ExecResult:
        """Return the stored result for this key, or run and store it."""
        stored = await self._store.get_exec_result(container_id, idempotency_key)
        if stored is not None:
            return ExecResult.model_validate(stored)
        result = await self._run(container_id, request)
        await self._store.put_exec_result(
            container_id, idempotency_key, result.model_dump(mode="json")
        )
        return result

    async def _run(self, container_id: str, request: ExecRequest) -> ExecResult:
        """Run the command in the container."""
        stdin = request.stdin.encode() if request.stdin is not None else None
        result = await self._backend.exec(
            container_id,
            request.command,
            timeout=request.timeout or self._exec_timeout,
            stdin=stdin,
        )
        return ExecResult(
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            timed_out=result.timed_out,
            duration=result.duration,
            truncated=result.truncated,
        )
