"""Prometheus metrics of one server, in a registry of its own."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics"]

_DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)


class Metrics:
    """The server's counters, gauges and histograms.

    Each app gets its own registry, so two servers in one process (as in
    tests) never share or clash over metrics.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queued = Gauge(
            "agent_v2_evaluations_queued",
            "Evaluations waiting for a device.",
            registry=self.registry,
        )
        self.running = Gauge(
            "agent_v2_evaluations_running",
            "Evaluations holding a device.",
            registry=self.registry,
        )
        self.finished = Counter(
            "agent_v2_evaluations_finished",
            "Evaluations finished, by status and error.",
            ["status", "error"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "agent_v2_evaluation_duration_seconds",
            "Seconds from acceptance to outcome, by mode.",
            ["mode"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.devices_total = Gauge(
            "agent_v2_devices",
            "Devices in the pool.",
            registry=self.registry,
        )
        self.devices_in_use = Gauge(
            "agent_v2_device_leases_in_use",
            "Devices leased to an evaluation.",
            registry=self.registry,
        )
        self.http_requests = Counter(
            "agent_v2_http_requests",
            "HTTP requests answered, by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_connections = Gauge(
            "agent_v2_http_connections",
            "HTTP connections open.",
            registry=self.registry,
        )
        self.http_connections_shed = Counter(
            "agent_v2_http_connections_shed",
            "Connections closed at max_connections: 'evicted' (the longest "
            "idle, to make room) or 'refused' (a newcomer, all busy).",
            ["reason"],
            registry=self.registry,
        )
        self._finished_children: dict[tuple[str, str, str], tuple[Counter, Histogram]]
        self._finished_children = {}
        self.http_duration = Histogram(
            "agent_v2_http_request_duration_seconds",
            "Seconds spent answering HTTP requests, by route.",
            ["route"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )

    def watch(
        self,
        *,
        queued: Callable[[], float],
        running: Callable[[], float],
        devices_total: Callable[[], float],
        devices_in_use: Callable[[], float],
        connections: Callable[[], float],
    ) -> None:
        """Read the gauges from these callables at scrape time."""
        self.http_connections.set_function(connections)
        self.queued.set_function(queued)
        self.running.set_function(running)
        self.devices_total.set_function(devices_total)
        self.devices_in_use.set_function(devices_in_use)

    def observe_shed(self, reason: str) -> None:
        """Count one connection closed at the connection cap."""
        self.http_connections_shed.labels(reason=reason).inc()

    def observe_finished(
        self, *, status: str, error: str | None, mode: str, seconds: float
    ) -> None:
        """Count one finished evaluation."""
        # NOTE: the children are looked up once per label set; every
        # evaluation finishing would otherwise pay for labels() twice. The
        # sets are few: statuses and error codes are fixed lists.
        key = (status, error or "", mode)
        children = self._finished_children.get(key)
        if children is None:
            children = (
                self.finished.labels(status=status, error=key[1]),
                self.duration.labels(mode=mode),
            )
            self._finished_children[key] = children
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        """Return the content type of :meth:`render`'s output."""
        return CONTENT_TYPE_LATEST

    def middleware(self) -> Middleware:
        """Return a middleware that counts and times every request."""

        @web.middleware
        async def count_requests(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                route = _route_name(request)
                self.http_requests.labels(
                    method=request.method, route=route, status=str(status)
                ).inc()
                self.http_duration.labels(route=route).observe(
                    time.perf_counter() - started
                )

        return count_requests


def _route_name(request: web.Request) -> str:
    """Return the route's template (``/v1/evaluations/{id}``), never the raw path."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical
