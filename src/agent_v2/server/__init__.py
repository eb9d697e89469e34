"""The evaluation server: app factory, settings and ways to run it."""

from __future__ import annotations

from agent_v2.server._app import create_app
from agent_v2.server._backends import make_backend
from agent_v2.server._devices import DevicePool, parse_devices
from agent_v2.server._scheduler import GradeFunction
from agent_v2.server._serve import run_server, serve
from agent_v2.server._settings import ServerSettings
from agent_v2.server._store import EvaluationRecord, EvaluationStore

__all__ = [
    "DevicePool",
    "EvaluationRecord",
    "EvaluationStore",
    "GradeFunction",
    "ServerSettings",
    "create_app",
    "make_backend",
    "parse_devices",
    "run_server",
    "serve",
]
