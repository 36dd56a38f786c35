"""CloudStatus, the one definition of the status the cloud manager reports.

The manager builds these values; the HTTP layer serialises them (:meth:`CloudStatus.as_dict`)
and documents them in its OpenAPI schema from the same classes, so the wire shape is written
down exactly once. Plain frozen dataclasses: this layer does not depend on the HTTP layer or on
pydantic (pydantic reads dataclasses as they are when it builds the schema).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CloudStats", "CloudStatus"]


@dataclass(frozen=True)
class CloudStats:
    """Counters of the current cloud connection (present only while connected).

    The signalling counters (offers, ICE candidates, api requests) count from the last
    successful connect; the frame counters count over the whole life of the server.
    """

    uptime_seconds: float
    webrtc_offers_sent: int
    webrtc_offers_successful: int
    webrtc_ice_candidates_sent: int
    api_requests_sent: int
    api_requests_successful: int
    frames_sent_to_cloud: int
    frames_received_from_cloud: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "uptime_seconds": self.uptime_seconds,
            "webrtc_offers_sent": self.webrtc_offers_sent,
            "webrtc_offers_successful": self.webrtc_offers_successful,
            "webrtc_ice_candidates_sent": self.webrtc_ice_candidates_sent,
            "api_requests_sent": self.api_requests_sent,
            "api_requests_successful": self.api_requests_successful,
            "frames_sent_to_cloud": self.frames_sent_to_cloud,
            "frames_received_from_cloud": self.frames_received_from_cloud,
        }


@dataclass(frozen=True)
class CloudStatus:
    """The state of the cloud link and of the cloud media session, as one snapshot.

    ``error`` is the connect error, else the media error, so a client that shows only
    ``error`` still sees a media loss. ``app_id``, ``connection_id`` and ``stats`` are set
    only while connected. ``webrtc_reconnect_attempt`` / ``webrtc_reconnect_max_attempts``
    (beyond Scope) say where a recovery stands: "reconnecting (2/3)".
    """

    connected: bool
    connecting: bool
    error: str | None
    connect_stage: str | None
    webrtc_connected: bool
    webrtc_error: str | None
    webrtc_reconnecting: bool
    app_id: str | None
    connection_id: str | None
    credentials_configured: bool
    last_close_code: int | None
    last_close_reason: str | None
    stats: CloudStats | None
    webrtc_reconnect_attempt: int
    """Reconnect attempts of the current outage, the one under way included (0: none yet).
    Kept after a recovery until the session has stayed up for the policy's stable period,
    when the budget refills and it returns to 0."""
    webrtc_reconnect_max_attempts: int
    """The attempt budget of an outage (``reconnect.max_attempts``)."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON object the HTTP API sends (field order as declared)."""
        return {
            "connected": self.connected,
            "connecting": self.connecting,
            "error": self.error,
            "connect_stage": self.connect_stage,
            "webrtc_connected": self.webrtc_connected,
            "webrtc_error": self.webrtc_error,
            "webrtc_reconnecting": self.webrtc_reconnecting,
            "app_id": self.app_id,
            "connection_id": self.connection_id,
            "credentials_configured": self.credentials_configured,
            "last_close_code": self.last_close_code,
            "last_close_reason": self.last_close_reason,
            "stats": self.stats.as_dict() if self.stats is not None else None,
            "webrtc_reconnect_attempt": self.webrtc_reconnect_attempt,
            "webrtc_reconnect_max_attempts": self.webrtc_reconnect_max_attempts,
        }
