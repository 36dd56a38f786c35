"""Operational routes: health, the status page and its settings, OpenAPI, metrics."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

from quart import Response

from scope_trio import __version__
from scope_trio.http.asgi import ApiError
from scope_trio.http.models import ErrorResponse, HealthResponse, ServerInfo
from scope_trio.http.openapi import Route
from scope_trio.http.routes.base import Context, RouteGroup
from scope_trio.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

__all__ = ["OpsRoutes", "git_commit"]


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
        Route("GET", "/health", "health", "Health check", {200: HealthResponse}),
        Route("GET", "/api/v1/config", "config", "Server settings for the UI", {200: ServerInfo}),
        Route("GET", "/openapi.json", "openapi", "This document", {200: "application/json"}),
        Route(
            "GET",
            "/metrics",
            "metrics",
            "Prometheus metrics (text format 0.0.4); 404 when the server keeps none",
            {200: "text/plain", 404: ErrorResponse},
        ),
        Route("GET", "/", "index", "The status page", {200: "text/html"}),
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
        response = await self.ctx.app.send_static_file("index.html")
        response.headers["Cache-Control"] = "no-cache"
        return response

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
