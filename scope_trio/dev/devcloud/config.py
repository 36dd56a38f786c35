"""How a dev cloud runs (:class:`DevCloudConfig`), its signaling URL and its fixed limits."""

from __future__ import annotations

from dataclasses import dataclass

from scope_trio.dev.devcloud.pipelines import PIPELINES

__all__ = [
    "CLOSE_ACCESS_DENIED",
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "SESSION_CLOSE_TIMEOUT",
    "DevCloudConfig",
    "ws_url",
]

CLOSE_ACCESS_DENIED = 4003
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
SESSION_CLOSE_TIMEOUT = 5.0
"""Bound on closing one peer connection (shielded), so a shutdown always finishes."""


@dataclass(frozen=True)
class DevCloudConfig:
    """How to run the devcloud. ``port=0`` binds an ephemeral port (see the started URL)."""

    host: str = "127.0.0.1"
    port: int = 0
    pipeline: str = "passthrough"
    """Pipeline loaded at start; ``POST /api/v1/pipeline/load`` switches it."""
    api_key: str | None = None
    """When set, ``/ws`` requires the header ``Authorization: Key <api_key>``."""
    require_user_id: bool = False
    """Like the real runner: ignore every message until ``set_user_id`` succeeded."""
    denied_user_ids: frozenset[str] = frozenset()
    """``set_user_id`` with one of these gets ``ACCESS_DENIED`` and close 4003."""
    load_seconds: float = 0.0
    """How long a pipeline load stays ``loading`` before it is ``loaded``."""
    graceful_timeout: float = 2.0
    """Hypercorn's bound on draining connections at shutdown."""
    connect_deadline: float = 30.0
    """A peer connection not connected this long after its answer is closed. aioice's
    answering side waits for a nomination without a deadline of its own: an offerer that
    gave up mid-ICE (a stop while connecting) would otherwise leave a session "checking"
    until its WebSocket ends."""
    vram_gb: float = 24.0
    """The GPU memory ``/api/v1/hardware/info`` reports, in GiB."""
    max_recording_bytes: int = 700 * 1024
    """Largest recording a download answers (413 above it): base64 makes it a third
    larger, and the local server reads signaling messages of at most 1 MiB."""
    hostile: bool = False
    """Surround every message sent after ``ready`` with garbage (see :mod:`.faults`)."""

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline {self.pipeline!r}; known: {', '.join(PIPELINES)}")


def ws_url(base_url: str) -> str:
    """The signaling URL for a devcloud base URL (``http://host:port`` → ``ws://host:port/ws``)."""
    return base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/ws"
