"""What every route group shares: the :class:`Context` and the :class:`RouteGroup` base."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from quart import Response

from scope_trio.cloud.manager import CloudManager
from scope_trio.http.asgi import ApiError, ScopeApp
from scope_trio.http.openapi import Route
from scope_trio.ops.logring import LogRing
from scope_trio.ops.metrics import ServerMetrics

__all__ = ["BrowserRelay", "Context", "RouteGroup", "needs_cloud", "not_supported"]


class BrowserRelay(Protocol):
    """What the routes need from :class:`scope_trio.relay.relay.Relay` (browser sessions)."""

    async def offer(
        self,
        sdp: str,
        sdp_type: str,
        initial_parameters: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
    ) -> dict[str, str]:
        """Answer a browser offer: ``{"sdp", "type": "answer", "sessionId"}``.

        Raises NotConnectedError without a cloud link, ValueError for a malformed SDP.
        """
        ...

    async def add_candidates(
        self, session_id: str, candidates: Sequence[Mapping[str, Any]]
    ) -> None:
        """Raises KeyError for an unknown session, ValueError for a bad candidate."""
        ...

    async def close(self, session_id: str) -> None:
        """Raises KeyError for an unknown session."""
        ...

    async def close_all(self) -> None: ...

    def sessions(self) -> dict[str, dict[str, Any]]: ...


@dataclass
class Context:
    """The state the handlers share. The app owns no other state."""

    app: ScopeApp
    manager: CloudManager
    relay: BrowserRelay
    sse_keepalive: float
    metrics: ServerMetrics | None = None
    log_ring: LogRing = field(default_factory=LogRing)
    frontend_dir: Path | None = None
    """A built Scope frontend to serve at ``/`` (else the status page is there)."""
    keys: dict[str, str] = field(default_factory=dict)
    """API keys stored over ``PUT /api/v1/keys/{service}``, for this run only."""
    started_at: float = field(default_factory=time.time)
    openapi_doc: dict[str, Any] = field(default_factory=dict)

    def json(self, payload: Any, status: int = 200) -> Response:
        return self.app.json_response(payload, status)


class RouteGroup:
    """Handlers of one concern; ``ROUTES`` names them (see :mod:`scope_trio.http.routes`)."""

    ROUTES: ClassVar[tuple[Route, ...]] = ()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx


def needs_cloud(what: str) -> ApiError:
    """The 400 of a route that only the cloud can serve, asked while not connected."""
    return ApiError(
        400,
        f"{what} needs the cloud: scope-trio has no local GPU and runs pipelines only in the "
        "cloud. Turn on remote inference (POST /api/v1/cloud/connect) first.",
    )


def not_supported(what: str, why: str) -> ApiError:
    """The 400 of a route of Scope's API that this server does not serve, and why."""
    return ApiError(400, f"{what} is not supported by scope-trio: {why}")
