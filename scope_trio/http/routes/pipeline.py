"""Pipeline routes, forwarded to the cloud as ``api`` requests."""

from __future__ import annotations

import logging
from typing import Any

from quart import Response

from scope_trio.cloud.link import CloudLinkError
from scope_trio.cloud.manager import NotConnectedError
from scope_trio.http.asgi import ApiError, deadline, parse_body
from scope_trio.http.models import ErrorResponse, PipelineLoadRequest, PipelineStatus
from scope_trio.http.openapi import Route
from scope_trio.http.routes.base import RouteGroup

__all__ = ["NOT_CONNECTED_PIPELINE", "PipelineRoutes"]

logger = logging.getLogger(__name__)

NOT_CONNECTED_PIPELINE = "Not connected to cloud. Connect to cloud before using the pipeline API."
_ERR = ErrorResponse


class PipelineRoutes(RouteGroup):
    ROUTES = (
        Route(
            "POST",
            "/api/v1/pipeline/load",
            "pipeline_load",
            "Load a pipeline (proxied to the cloud; its status and body are passed through)",
            {200: "application/json", 400: _ERR, 502: _ERR, 503: _ERR},
            PipelineLoadRequest,
        ),
        Route(
            "GET",
            "/api/v1/pipeline/status",
            "pipeline_status",
            "Pipeline status (proxied to the cloud)",
            {200: PipelineStatus, 502: _ERR, 503: _ERR},
        ),
    )

    async def pipeline_load(self) -> Response:
        _, raw = await parse_body(PipelineLoadRequest)
        return await self._proxy("POST", "/api/v1/pipeline/load", raw)

    async def pipeline_status(self) -> Response:
        return await self._proxy("GET", "/api/v1/pipeline/status")

    async def _proxy(self, method: str, path: str, body: Any = None) -> Response:
        try:
            with deadline("the cloud request"):
                status, reply = await self.ctx.manager.api(method, path, body)
        except NotConnectedError:
            raise ApiError(503, NOT_CONNECTED_PIPELINE) from None
        except CloudLinkError as exc:
            raise ApiError(502, f"Cloud request failed: {exc}") from None
        if status is None:
            shown = repr(reply.get("status"))[:80]
            logger.warning("the cloud answered %s %s with no valid status: %s", method, path, shown)
            raise ApiError(502, f"Cloud request failed: the reply has no valid status: {shown}")
        data = reply.get("data") if "data" in reply else reply.get("error")
        if status >= 400 and not isinstance(data, dict):
            data = {"detail": str(data) if data is not None else f"Cloud returned {status}"}
        return self.ctx.json(data, status)
