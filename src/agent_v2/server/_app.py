"""The app factory: one aiohttp application per ServerSettings, no globals."""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import AsyncIterator

from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler, Middleware

from agent_v2.protocol import ErrorCode
from agent_v2.server._errors import (
    Forbidden,
    Unauthorized,
    error_middleware,
    error_response,
)
from agent_v2.server._http import BODY_TIMEOUT
from agent_v2.server._openapi import build_openapi
from agent_v2.server._routes import OPENAPI, ROUTES, STATE
from agent_v2.server._scheduler import GradeFunction
from agent_v2.server._settings import ServerSettings
from agent_v2.server._state import ServerState

__all__ = ["create_app"]


def create_app(
    settings: ServerSettings, *, grade: GradeFunction | None = None
) -> web.Application:
    """Return the evaluation server's app; its lifespan opens what it needs.

    ``grade`` replaces the grading pipeline (scripts that measure the server
    alone pass a trivial one); by default the real pipeline grades.
    """
    state = ServerState(settings, grade=grade)
    middlewares = [
        state.connections.middleware(),
        state.metrics.middleware(),
        error_middleware,
        _refuse_web_pages(check_host=settings.token is None),
    ]
    if settings.token is not None:
        middlewares.append(_require_token(settings.token))

    app = web.Application(
        client_max_size=settings.max_body_size, middlewares=middlewares
    )
    app[STATE] = state
    app[BODY_TIMEOUT] = settings.body_timeout
    app[OPENAPI] = json.dumps(
        build_openapi(
            ROUTES,
            token_required=settings.token is not None,
            max_body_size=settings.max_body_size,
        )
    ).encode()
    for route in ROUTES:
        app.router.add_route(
            route.method,
            _pattern(route.path),
            route.handler,
            expect_handler=_expect_continue,
        )

    app.cleanup_ctx.append(_lifespan)
    app.on_shutdown.append(_begin_shutdown)
    return app


def _pattern(path: str) -> str:
    """Return the router pattern of a documented path.

    NOTE: aiohttp's bare ``{id}`` refuses '{' and '}', so an id holding them
    would get "no such path"; ``[^/]+`` lets the handler name the bad id.
    """
    return re.sub(r"\{(\w+)\}", r"{\1:[^/]+}", path)


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    """Open the server's resources at startup and close them at cleanup."""
    state = app[STATE]
    await state.open()
    yield
    await state.close()


async def _begin_shutdown(app: web.Application) -> None:
    """Refuse new work and release long polls before handlers are awaited."""
    app[STATE].scheduler.begin_shutdown()


async def _expect_continue(request: web.Request) -> web.Response | None:
    """Answer ``Expect: 100-continue``; refuse any other Expect with a JSON 417.

    NOTE: aiohttp runs this before any middleware. Its own handler answered an
    unknown Expect holding bytes that are not UTF-8 with a 500, since it
    could not encode them back into its error text.
    """
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no Expect; ignore it, as aiohttp does
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started
        return None
    return error_response(
        417,
        ErrorCode.INVALID_REQUEST,
        f"unknown Expect header {expect!a}; only 100-continue is supported",
        field="Expect",
    )


def _refuse_web_pages(*, check_host: bool) -> Middleware:
    """Return a middleware that refuses requests a web page could make.

    A page open in a browser on the server's machine can send requests to
    loopback. Browsers mark them with ``Origin``, which no API client sends,
    so those are refused. A page can also rename loopback under its own
    domain (DNS rebinding) and then send requests without ``Origin``; it
    cannot choose the ``Host`` header, though, so without a token to stop it,
    a Host that is a name other than ``localhost`` is refused too. IP
    addresses in Host cannot be rebound and pass.
    """

    @web.middleware
    async def refuse_web_pages(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None:
            raise Forbidden(
                f"requests from web pages are refused (Origin {origin!r}); "
                "call the API from a program",
                field="Origin",
            )
        if check_host and not _is_loopback_name(request.headers.get("Host", "")):
            raise Forbidden(
                f"Host {request.host!r} is a name other than localhost, which a "
                "web page could have pointed here; use 127.0.0.1 or localhost, "
                "or serve with --token",
                field="Host",
            )
        return await handler(request)

    return refuse_web_pages


def _is_loopback_name(host: str) -> bool:
    """Return True when a Host header names an IP address or ``localhost``."""
    if not host:
        return True  # HTTP/1.0 without Host: no browser sends that
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit() or (name.count(":") and name[0] != "["):
        name = host  # no port, or an IPv6 address without brackets
    name = name.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _require_token(token: str) -> Middleware:
    """Return a middleware that lets only requests with the bearer token through."""
    expected = token.encode()
    public = {route.path for route in ROUTES if route.public}

    @web.middleware
    async def require_token(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.path not in public:
            given = _bearer_token(request.headers.get("Authorization", ""))
            # NOTE: constant-time comparison, so timing does not leak the token.
            if not hmac.compare_digest(given, expected):
                raise Unauthorized(
                    "missing or wrong token: send 'Authorization: Bearer <token>'",
                    field="Authorization",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return require_token


def _bearer_token(authorization: str) -> bytes:
    """Return the credentials of a ``Bearer`` Authorization header, else b""."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 9110)
        return b""
    return credentials.strip().encode(errors="surrogateescape")
