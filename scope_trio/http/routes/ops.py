"""Operational routes: health, the status page and its settings, OpenAPI, metrics, and the
frontend.

With a built Scope frontend (``create_app(..., frontend_dir=...)``), ``/`` and every GET that
no other route takes serve it as Scope does: the file at that path if there is one, else
``index.html`` with no-cache headers. The status page is always at ``/status``, and also at
``/`` when no frontend is given.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

from quart import Response, send_file

from scope_trio import __version__
from scope_trio.http.asgi import ApiError
from scope_trio.http.models import ErrorResponse, HealthResponse, ServerInfo
from scope_trio.http.openapi import Forward, Route
from scope_trio.http.routes.base import Context, RouteGroup
from scope_trio.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

__all__ = ["NO_CACHE", "OpsRoutes", "frontend_index", "git_commit"]

NO_CACHE = {
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "Expires": "0",
}
"""The headers of a frontend's ``index.html``: never cached, so a new build is seen at once
(its other files carry content hashes in their names)."""


async def frontend_index(frontend_dir: Path) -> Response:
    index = frontend_dir / "index.html"
    if not index.is_file():
        raise ApiError(404, "Frontend not built: no index.html in the frontend directory")
    response = await send_file(index)
    response.headers.update(NO_CACHE)
    return response


def git_commit() -> str:
    """The commit of the source tree this package runs from, or ``"unknown"``."""
    package_dir = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2:
        return "unknown"
    top, commit = lines
    # Only if this package is part of that checkout (not some unrelated parent repository).
    if not package_dir.is_relative_to(Path(top).resolve()):
        return "unknown"
    return commit


class OpsRoutes(RouteGroup):
    ROUTES = (
        Route(
            "GET",
            "/health",
            "health",
            "Health check (the cloud server's while connected; this server's if it fails)",
            {200: HealthResponse},
            forward=Forward(30.0, fallback_local=True),
        ),
        Route("GET", "/api/v1/config", "config", "Server settings for the UI", {200: ServerInfo}),
        Route("GET", "/openapi.json", "openapi", "This document", {200: "application/json"}),
        Route(
            "GET",
            "/metrics",
            "metrics",
            "Prometheus metrics (text format 0.0.4); 404 when the server keeps none",
            {200: "text/plain", 404: ErrorResponse},
        ),
        Route(
            "GET",
            "/",
            "index",
            "Scope's frontend if one is served, else the status page",
            {200: "text/html"},
        ),
        Route("GET", "/status", "status_page", "The status page", {200: "text/html"}),
    )

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.git_commit = git_commit()

    async def health(self) -> Response:
        return self.ctx.json(
            {
                "status": "healthy",
                "timestamp": datetime.now(timezone.utc).isoformat(),
                "server_start_time": self.ctx.started_at,
                "version": __version__,
                "git_commit": self.git_commit,
            }
        )

    async def index(self) -> Response:
        if self.ctx.frontend_dir is not None:
            return await frontend_index(self.ctx.frontend_dir)
        return await self.status_page()

    async def status_page(self) -> Response:
        response = await self.ctx.app.send_static_file("index.html")
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def frontend(self, path: str) -> Response:
        """Scope's catch-all: a file of the frontend, else its ``index.html`` (client-side
        routing). Unknown API paths stay 404s rather than turning into a page."""
        frontend_dir = self.ctx.frontend_dir
        if frontend_dir is None or path.startswith(("api/", "static/")):
            raise ApiError(404, "Not Found")
        try:
            candidate = (frontend_dir / path).resolve()
            is_file = candidate.is_relative_to(frontend_dir.resolve()) and candidate.is_file()
        except (OSError, ValueError):
            is_file = False
        if is_file:
            return await send_file(candidate)
        return await frontend_index(frontend_dir)

    async def openapi(self) -> Response:
        return self.ctx.json(self.ctx.openapi_doc)

    async def metrics(self) -> Response:
        if self.ctx.metrics is None:
            raise ApiError(404, "Not found")
        text = self.ctx.app.redact((await self.ctx.metrics.render()).decode())
        return Response(text, content_type=METRICS_CONTENT_TYPE)

    async def config(self) -> Response:
        return self.ctx.json(
            {"version": __version__, "debug_endpoints": self.ctx.app.debug_endpoints}
        )
