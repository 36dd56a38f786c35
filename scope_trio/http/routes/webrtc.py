"""Routes of the browser's WebRTC session: ICE servers, the offer, trickled candidates, close.

The browser always peers with this server (relay mode); the relay feeds its video to the
cloud media session and sends the cloud's frames back.
"""

from __future__ import annotations

import logging

from quart import Response

from scope_trio.cloud.link import CloudLinkError
from scope_trio.cloud.manager import NotConnectedError
from scope_trio.core.supervisor import SupervisorError
from scope_trio.http.asgi import ApiError, deadline, parse_body
from scope_trio.http.models import (
    CandidatesRequest,
    ErrorResponse,
    IceServersResponse,
    OfferAnswer,
    OfferRequest,
)
from scope_trio.http.openapi import Route
from scope_trio.http.routes.base import RouteGroup

__all__ = ["ICE_SERVERS_TIMEOUT", "PIPELINE_NOT_LOADED", "WebRTCRoutes"]

logger = logging.getLogger(__name__)

ICE_SERVERS_TIMEOUT = 10.0
PIPELINE_NOT_LOADED = "Pipeline not loaded. Please load pipeline first."
_ERR = ErrorResponse


class WebRTCRoutes(RouteGroup):
    ROUTES = (
        Route(
            "GET",
            "/api/v1/webrtc/ice-servers",
            "ice_servers",
            "ICE servers for the browser: the cloud's while connected",
            {200: IceServersResponse},
        ),
        Route(
            "POST",
            "/api/v1/webrtc/offer",
            "offer",
            "Answer a browser WebRTC offer (relayed to the cloud)",
            {200: OfferAnswer, 400: _ERR, 502: _ERR},
            OfferRequest,
        ),
        Route(
            "PATCH",
            "/api/v1/webrtc/offer/{session_id}",
            "add_candidates",
            "Add trickled ICE candidates to a browser session",
            {204: "No Content", 400: _ERR, 404: _ERR},
            CandidatesRequest,
        ),
        Route(
            "DELETE",
            "/api/v1/webrtc/offer/{session_id}",
            "close_session",
            "Close a browser session (and its cloud session)",
            {204: "No Content", 404: _ERR},
        ),
    )

    async def ice_servers(self) -> Response:
        """The cloud's ICE servers while connected; the local list (none) otherwise, and
        also when asking the cloud fails: like Scope, this route never fails."""
        link = self.ctx.manager.link
        if link is None:
            return self.ctx.json({"iceServers": []})
        try:
            reply = await link.request("get_ice_servers", timeout=ICE_SERVERS_TIMEOUT)
        except CloudLinkError as exc:
            logger.warning("asking the cloud for ICE servers failed (%s); using none", exc)
            return self.ctx.json({"iceServers": []})
        data = reply.get("data")
        servers = data.get("iceServers") if isinstance(data, dict) else None
        if not isinstance(servers, list):
            logger.warning("the cloud sent no iceServers list; using none")
            servers = []
        return self.ctx.json({"iceServers": servers})

    async def offer(self) -> Response:
        body, _ = await parse_body(OfferRequest)
        params = None
        if body.initialParameters is not None:
            params = body.initialParameters.model_dump(exclude_unset=True)
        try:
            with deadline("the offer"):
                answer = await self.ctx.relay.offer(
                    body.sdp, body.type, params, user_id=body.user_id
                )
        except NotConnectedError:
            raise ApiError(400, PIPELINE_NOT_LOADED) from None
        except ValueError as exc:
            raise ApiError(400, f"Invalid offer: {exc}") from None
        except CloudLinkError as exc:
            raise ApiError(502, f"Cloud request failed: {exc}") from None
        except SupervisorError as exc:
            raise ApiError(502, f"Cloud session failed: {exc}") from None
        return self.ctx.json(answer)

    async def add_candidates(self, session_id: str) -> Response:
        body, _ = await parse_body(CandidatesRequest)
        candidates = [c.model_dump() for c in body.candidates]
        try:
            with deadline("adding ICE candidates"):
                await self.ctx.relay.add_candidates(session_id, candidates)
        except KeyError:
            raise ApiError(404, f"Session {session_id} not found") from None
        except ValueError as exc:
            raise ApiError(404, f"Invalid ICE candidate: {exc}") from None
        return Response("", status=204)

    async def close_session(self, session_id: str) -> Response:
        try:
            with deadline("closing the session"):
                await self.ctx.relay.close(session_id)
        except KeyError:
            raise ApiError(404, f"Session {session_id} not found") from None
        return Response("", status=204)
