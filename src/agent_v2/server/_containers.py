"""Container lifecycle for agents: create and exec, each idempotent by key; remove."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from agent_v2.datasets import Instance
from agent_v2.protocol import (
    ContainerCreated,
    ContainerRequest,
    ExecRequest,
    ExecResult,
)
from agent_v2.sandbox import SandboxBackend
from agent_v2.server._catalog import Catalog
from agent_v2.server._errors import IdempotencyConflict
from agent_v2.server._store import EvaluationStore

__all__ = ["Containers"]

T = TypeVar("T")


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
        # Keyed work in progress: ("create", key) or ("exec", container_id, key).
        self._in_flight: dict[tuple[str, ...], asyncio.Future[Any]] = {}

    async def create(
        self, request: ContainerRequest, idempotency_key: str | None = None
    ) -> tuple[ContainerCreated, bool]:
        """Create a container holding the instance's unmodified files.

        Return it and whether it is new: with a key seen before, the key's
        container is returned instead, and no second one is made.
        """
        instance = self._catalog.resolve(
            request.instance_id, request.dataset_name, request.split
        )
        if idempotency_key is None:
            return await self._create(instance), True

        (created, made), ran = await self._once(
            ("create", idempotency_key),
            lambda: self._create_once(instance, idempotency_key),
        )
        made_for = (created.dataset_name, created.split, created.instance_id)
        if made_for != instance.key:
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key!r} was first used for "
                f"container {created.container_id} of instance "
                f"{'/'.join(made_for)}; use a new key for a new container",
                field="Idempotency-Key",
                extra={"container_id": created.container_id},
            )
        return created, made and ran

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
        result, _ = await self._once(
            ("exec", container_id, idempotency_key),
            lambda: self._run_once(container_id, request, idempotency_key),
        )
        return result

    async def remove(self, container_id: str) -> None:
        """Delete a container and forget its exec results and creation key."""
        await self._backend.remove(container_id)
        await self._store.forget_container(container_id)

    async def _once(
        self, key: tuple[str, ...], work: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool]:
        """Do ``work`` for ``key``; a duplicate arriving meanwhile shares its result.

        Return the result and whether this call did the work.
        """
        running = self._in_flight.get(key)
        if running is not None:
            return cast(T, await asyncio.shield(running)), False

        # Registered before any await, so a duplicate arriving meanwhile waits
        # for this work instead of starting its own.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await work()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marks it retrieved when no duplicate waits
            raise
        else:
            future.set_result(result)
            return result, True
        finally:
            del self._in_flight[key]

    async def _create(self, instance: Instance) -> ContainerCreated:
        """Create a container for ``instance``."""
        container_id = await self._backend.create(instance)
        return ContainerCreated(
            container_id=container_id,
            dataset_name=instance.dataset_name,
            split=instance.split,
            instance_id=instance.instance_id,
        )

    async def _create_once(
        self, instance: Instance, idempotency_key: str
    ) -> tuple[ContainerCreated, bool]:
        """Return the container stored for this key, or create and store one."""
        stored = await self._store.get_created_container(idempotency_key)
        if stored is not None:
            return ContainerCreated.model_validate(stored), False
        created = await self._create(instance)
        await self._store.put_created_container(
            idempotency_key, created.container_id, created.model_dump(mode="json")
        )
        return created, True

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
