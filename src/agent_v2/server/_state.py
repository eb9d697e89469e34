"""ServerState: everything one running server owns, opened and closed together."""

from __future__ import annotations

import time

from agent_v2.evaluation import grade as pipeline_grade
from agent_v2.sandbox import SandboxBackend
from agent_v2.server._backends import make_backend
from agent_v2.server._catalog import Catalog
from agent_v2.server._connections import ConnectionGuard
from agent_v2.server._containers import Containers
from agent_v2.server._devices import DevicePool
from agent_v2.server._errors import ShuttingDown
from agent_v2.server._metrics import Metrics
from agent_v2.server._scheduler import GradeFunction, Scheduler
from agent_v2.server._settings import ServerSettings
from agent_v2.server._store import EvaluationStore

__all__ = ["ServerState"]


class ServerState:
    """What one app owns: store, backend, devices, scheduler, connections, metrics.

    Built when the app is created; :meth:`open` and :meth:`close` run in the
    app's lifespan, so nothing touches disk or processes before the server
    starts.
    """

    def __init__(
        self, settings: ServerSettings, *, grade: GradeFunction | None = None
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.connections = ConnectionGuard(
            settings.max_connections, on_shed=self.metrics.observe_shed
        )
        self.catalog = Catalog(settings.dataset_list)
        self.pool = DevicePool.from_spec(settings.devices)
        self.store = EvaluationStore(settings.store_path)
        self.backend: SandboxBackend = make_backend(settings)
        self.containers = Containers(
            backend=self.backend,
            catalog=self.catalog,
            store=self.store,
            exec_timeout=settings.exec_timeout,
        )
        self.scheduler = Scheduler(
            store=self.store,
            pool=self.pool,
            backend=self.backend,
            catalog=self.catalog,
            grade=grade or pipeline_grade,
            metrics=self.metrics,
            max_queue=settings.max_queue,
            evaluation_timeout=settings.evaluation_timeout,
            gpu_acquire_timeout=settings.gpu_acquire_timeout,
        )
        self.metrics.watch(
            queued=lambda: self.scheduler.queued,
            running=lambda: self.scheduler.running,
            devices_total=lambda: self.pool.total,
            devices_in_use=lambda: self.pool.in_use,
            connections=lambda: self.connections.open,
        )
        self.started_at = time.monotonic()
        self._open = False

    @property
    def is_open(self) -> bool:
        """Return whether the server is between open() and close()."""
        return self._open

    def check_open(self) -> None:
        """Raise ShuttingDown unless the server is taking requests."""
        if not self._open or self.scheduler.closing:
            raise ShuttingDown("the server is not running; try again later")

    async def open(self) -> None:
        """Open the store and backend, then requeue unfinished evaluations."""
        await self.store.open()
        try:
            await self.backend.open()
            try:
                await self.scheduler.start()
            except BaseException:
                await self.backend.close()
                raise
        except BaseException:
            await self.store.close()
            raise
        self.started_at = time.monotonic()
        self._open = True

    async def close(self) -> None:
        """Stop the scheduler (with its grace period), then the backend and store."""
        self._open = False
        try:
            await self.scheduler.close(self.settings.shutdown_grace)
        finally:
            try:
                await self.backend.close()
            finally:
                await self.store.close()
