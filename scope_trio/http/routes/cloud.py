"""Routes of the cloud link: connect, disconnect, status, stats, the status event stream and
the debug disconnect."""

from __future__ import annotations

from quart import Response

from scope_trio.cloud.manager import NotConnectedError
from scope_trio.http.asgi import ApiError, deadline, parse_body
from scope_trio.http.models import (
    CloudStatus,
    CloudStatusWithStats,
    ConnectRequest,
    ErrorResponse,
)
from scope_trio.http.openapi import Route
from scope_trio.http.routes.base import RouteGroup
from scope_trio.http.sse import status_events, stream_response
from scope_trio.ops import logs

__all__ = ["CloudRoutes"]

_ERR = ErrorResponse


class CloudRoutes(RouteGroup):
    ROUTES = (
        Route(
            "POST",
            "/api/v1/cloud/connect",
            "connect",
            "Start connecting to the cloud in the background; returns at once (connecting)",
            {200: CloudStatus, 400: _ERR},
            ConnectRequest,
            request_required=False,
        ),
        Route(
            "POST",
            "/api/v1/cloud/disconnect",
            "disconnect",
            "Disconnect from the cloud (returns after a complete teardown)",
            {200: CloudStatus},
        ),
        Route("GET", "/api/v1/cloud/status", "status", "Cloud status", {200: CloudStatus}),
        Route(
            "GET",
            "/api/v1/cloud/stats",
            "stats",
            "Cloud status plus WebRTC session stats",
            {200: CloudStatusWithStats},
        ),
        Route(
            "GET",
            "/api/v1/cloud/events",
            "events",
            "Server-Sent Events: `data: <CloudStatus JSON>` now and on every change",
            {200: "text/event-stream"},
        ),
        Route(
            "POST",
            "/api/v1/cloud/debug/disconnect-webrtc",
            "debug_disconnect",
            "Debug: force-close the cloud peer connection (needs SCOPE_DEBUG_ENDPOINTS)",
            {200: CloudStatus, 400: _ERR, 404: _ERR},
        ),
    )

    async def connect(self) -> Response:
        body, _ = await parse_body(ConnectRequest, optional=True)
        api_key = body.api_key.get_secret_value() if body.api_key is not None else None
        self.ctx.app.redact.add(api_key)
        logs.add_secret(api_key)
        try:
            with deadline("connect"):
                status = await self.ctx.manager.connect(
                    app_id=body.app_id, api_key=api_key, user_id=body.user_id
                )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return self.ctx.json(status)

    async def disconnect(self) -> Response:
        with deadline("disconnect"):
            # A complete teardown: browser sessions in relay mode end with their cloud.
            await self.ctx.relay.close_all()
            status = await self.ctx.manager.disconnect()
        return self.ctx.json(status)

    async def status(self) -> Response:
        return self.ctx.json(self.ctx.manager.status())

    async def stats(self) -> Response:
        status = self.ctx.manager.status()
        status["webrtc_stats"] = {
            "sessions": self.ctx.relay.sessions(),
            "cloud_session": self.ctx.manager.supervisor.status.as_dict(),
        }
        return self.ctx.json(status)

    async def events(self) -> Response:
        app = self.ctx.app
        return stream_response(
            status_events(self.ctx.manager, app.stopping, app.redact, self.ctx.sse_keepalive)
        )

    async def debug_disconnect(self) -> Response:
        if not self.ctx.app.debug_endpoints:
            raise ApiError(404, "Not found")
        try:
            with deadline("debug disconnect"):
                await self.ctx.manager.simulate_media_loss()
        except NotConnectedError:
            raise ApiError(400, "WebRTC not connected") from None
        return self.ctx.json(self.ctx.manager.status())
