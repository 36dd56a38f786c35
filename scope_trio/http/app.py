"""The HTTP API as a Quart-Trio app: :func:`create_app` assembles it.

The app is a thin translation layer: it validates request bodies with pydantic, calls the
:class:`~scope_trio.cloud.manager.CloudManager` or the browser relay, and turns their results
and exceptions into Scope's status codes and ``{"detail": ...}`` bodies. The package is split
by concern:

======================  ==================================================================
``app``                 :func:`create_app`: the route groups, the hooks, the OpenAPI document
``asgi``                the app class, the connection wrapper, body limits, CORS, errors,
                        the redactor, deadlines
``models``              request and response models (CloudStatus comes from the cloud layer)
``openapi``             routes as data (with how each is forwarded), the OpenAPI document
``proxy``               forwarding a route to the cloud and mapping the cloud's answer
``sse``                 the event streams
``routes/*``            the handlers: cloud link, WebRTC, pipelines, library (LoRAs,
                        assets, plugins, recordings), local (hardware, OSC, input sources,
                        keys, logs), operations (health, pages, the frontend)
``static/``             the status page
======================  ==================================================================

Decisions where Scope's API is silent or where we differ (each is tested):

* Every request-body problem is **400** with ``detail`` naming the field
  (``"sdp: Field required"``; several problems joined by ``"; "``): invalid JSON, a body that
  is not an object, a missing or mistyped field. Scope's FastAPI answered 422 for schema
  errors; one status for all body errors is simpler for clients, and a malformed SDP must
  never be a 500. The Content-Type is not checked (a JSON body is parsed whatever it says),
  so clients that forget the header still work.
* A body larger than ``max_body_bytes`` is **413** (checked on ``Content-Length`` before
  routing, and while reading a chunked body).
* Unknown path: 404 ``{"detail": "Not Found"}``; wrong method: 405 ``{"detail": "Method Not
  Allowed"}`` (FastAPI's words). The debug route, when disabled, says ``"Not found"`` as Scope.
* Any await that could hang has a deadline (:data:`~scope_trio.http.asgi.ROUTE_TIMEOUT`);
  running out is **504**.
* The relay raising :class:`~scope_trio.cloud.link.CloudLinkError` or
  :class:`~scope_trio.core.supervisor.SupervisorError` while starting the cloud session is **502**.
* ``GET /api/v1/webrtc/ice-servers`` without a cloud link answers ``{"iceServers": []}``: the
  browser talks to this server, normally over loopback, and the machine may be offline.
* The routes Scope forwards to the cloud are forwarded while connected
  (:mod:`scope_trio.http.proxy`, driven by each route's ``forward``); not connected, every
  route answers what is true on a server with no GPU, and what cannot work says why in a
  400. ``docs/api.md`` lists every route in both states.
* Beyond Scope: ``GET /api/v1/cloud/events`` (Server-Sent Events of CloudStatus),
  ``GET /api/v1/config`` (what the status page needs to know), ``GET /openapi.json``,
  ``GET /metrics`` (Prometheus, :mod:`scope_trio.ops.metrics`) and the status page at ``/``.

The api key never leaves: :class:`~scope_trio.cloud.manager.CloudSettings` and pydantic's
``SecretStr`` keep it out of reprs, and every JSON body and event the app writes passes
through :class:`~scope_trio.http.asgi.Redactor`, which replaces any key it has seen with ``***``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from quart import Response

from scope_trio.cloud.manager import CloudManager
from scope_trio.http.asgi import (
    BODY_DRAIN_TIMEOUT,
    FAST_REQUESTS,
    MAX_POSTED_SECRETS,
    MIB,
    ROUTE_TIMEOUT,
    Cors,
    Plumbing,
    Redactor,
    ScopeApp,
)
from scope_trio.http.openapi import Route
from scope_trio.http.openapi import openapi_document as _openapi_document
from scope_trio.http.proxy import forwarding_view
from scope_trio.http.routes.base import BrowserRelay, Context, RouteGroup
from scope_trio.http.routes.cloud import CloudRoutes
from scope_trio.http.routes.library import LibraryRoutes
from scope_trio.http.routes.local import LocalRoutes
from scope_trio.http.routes.ops import OpsRoutes
from scope_trio.http.routes.pipeline import PipelineRoutes
from scope_trio.http.routes.webrtc import PIPELINE_NOT_LOADED, WebRTCRoutes
from scope_trio.ops.logring import LogRing
from scope_trio.ops.metrics import ServerMetrics

__all__ = [
    "BODY_DRAIN_TIMEOUT",
    "FAST_REQUESTS",
    "MAX_POSTED_SECRETS",
    "MIB",
    "PIPELINE_NOT_LOADED",
    "ROUTES",
    "ROUTE_TIMEOUT",
    "BrowserRelay",
    "Redactor",
    "ScopeApp",
    "create_app",
    "openapi_document",
]

SSE_KEEPALIVE = 15.0

GROUPS: tuple[type[RouteGroup], ...] = (
    OpsRoutes,
    CloudRoutes,
    WebRTCRoutes,
    PipelineRoutes,
    LibraryRoutes,
    LocalRoutes,
)
ROUTES: tuple[Route, ...] = tuple(route for group in GROUPS for route in group.ROUTES)
"""Every route the app registers (and documents), in registration order."""


def openapi_document(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (by default: of this app)."""
    return _openapi_document(routes)


def create_app(
    manager: CloudManager,
    relay: BrowserRelay,
    *,
    debug_endpoints: bool,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = MIB,
    sse_keepalive: float = SSE_KEEPALIVE,
    metrics: ServerMetrics | None = None,
    frontend_dir: Path | None = None,
    log_ring: LogRing | None = None,
) -> ScopeApp:
    """The HTTP API over ``manager`` and ``relay`` (see the module docstring).

    ``cors_origins``: origins allowed cross-origin (``"*"``: any); empty disables CORS.
    ``metrics`` is served at ``GET /metrics`` (404 without); its owner runs its observer.
    ``frontend_dir``: a built Scope frontend, served at ``/`` and for every GET no route
    takes (the status page moves to ``/status``).
    ``log_ring`` serves ``/api/v1/logs/*``; its owner attaches it to the logging tree. Without
    one, the app keeps its own ring, attached to the root logger while the app is served.
    Call :meth:`ScopeApp.begin_shutdown` before stopping the server, to end event streams.
    """
    app = ScopeApp(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.stopping = trio.Event()
    app.fast_requests = trio.CapacityLimiter(FAST_REQUESTS)
    app.redact = Redactor()
    app.redact.add(manager.settings.api_key)
    app.debug_endpoints = debug_endpoints
    app.health_forwarded = lambda: manager.link_state.connected
    ring = log_ring if log_ring is not None else _own_ring(app)
    ctx = Context(
        app,
        manager,
        relay,
        sse_keepalive=sse_keepalive,
        metrics=metrics,
        log_ring=ring,
        frontend_dir=frontend_dir,
    )
    ctx.openapi_doc = openapi_document()
    Plumbing(app, max_body_bytes=max_body_bytes).install()
    Cors(frozenset(cors_origins)).install(app)
    for group_class in GROUPS:
        group = group_class(ctx)
        for route in group.ROUTES:
            app.add_url_rule(
                route.rule,
                endpoint=f"{group_class.__name__}.{route.handler}",
                view_func=_view(app, manager, group, route),
                methods=[route.method],
            )
        if isinstance(group, OpsRoutes) and frontend_dir is not None:
            # Scope's catch-all; registered only with a frontend, so without one an unknown
            # path stays a 404 (and a wrong method on it is not a 405).
            app.add_url_rule(
                "/<path:path>", endpoint="frontend", view_func=group.frontend, methods=["GET"]
            )
    return app


def _view(
    app: ScopeApp, manager: CloudManager, group: RouteGroup, route: Route
) -> Callable[..., Awaitable[Response]]:
    handler: Callable[..., Awaitable[Response]] = getattr(group, route.handler)
    spec = route.forward
    if spec is None:
        return handler
    return forwarding_view(
        app,
        manager,
        route.method,
        spec,
        handler,
        request_model=route.request,
        request_required=route.request_required,
        prepare=getattr(group, spec.prepare) if spec.prepare else None,
        finish=getattr(group, spec.finish) if spec.finish else None,
    )


def _own_ring(app: ScopeApp) -> LogRing:
    """A ring of the app's own, on the root logger from start-up to shutdown of serving."""
    ring = LogRing()

    @app.before_serving
    async def attach() -> None:
        logging.getLogger().addHandler(ring)

    @app.after_serving
    async def detach() -> None:
        logging.getLogger().removeHandler(ring)

    return ring
