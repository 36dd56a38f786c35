"""What every route group shares: the :class:`Context` and the :class:`RouteGroup` base."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from quart import Response

from scope_trio.cloud.manager import CloudManager
from scope_trio.http.asgi import ScopeApp
from scope_trio.http.openapi import Route
from scope_trio.ops.metrics import ServerMetrics

__all__ = ["BrowserRelay", "Context", "RouteGroup"]


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
    started_at: float = field(default_factory=time.time)
    openapi_doc: dict[str, Any] = field(default_factory=dict)

    def json(self, payload: Any, status: int = 200) -> Response:
        return self.app.json_response(payload, status)


class RouteGroup:
    """Handlers of one concern; ``ROUTES`` names them (see :mod:`scope_trio.http.routes`)."""

    ROUTES: ClassVar[tuple[Route, ...]] = ()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
