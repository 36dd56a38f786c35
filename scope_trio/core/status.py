"""What clients see of the supervisor: its phase, one immutable status snapshot, and the
``webrtc_error`` texts (verbatim what Scope's clients show, so they never change by accident).

The supervisor derives every :class:`SupervisorStatus` from its private control state and
never reads one back to decide anything (see :mod:`scope_trio.core.supervisor`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

LOST_PREFIX = "Remote inference connection lost"


def lost_message(reason: str) -> str:
    """``webrtc_error`` while recovering from a loss (docs/scope-compatibility.md)."""
    return f"{LOST_PREFIX}: {reason}"


def budget_spent_message(attempts: int) -> str:
    """``webrtc_error`` once the attempt budget is spent Scope's text, word for word (docs/scope-compatibility.md)."""
    return (
        f"{LOST_PREFIX}. Reconnection failed after {attempts} attempts. "
        "Please toggle cloud mode off and on to reconnect."
    )


def intensity_message(restarts: int, window: float) -> str:
    """``webrtc_error`` once too many restarts happened within the intensity window."""
    return (
        f"{LOST_PREFIX}. Reconnection stopped after {restarts} restarts within "
        f"{window:g} s. Please toggle cloud mode off and on to reconnect."
    )


def start_failed_message(reason: str) -> str:
    """``webrtc_error`` when the very first connect fails (Scope left it empty)."""
    return f"Remote inference connection failed: {reason}"


class Phase(enum.Enum):
    """Where the supervisor is. Every public flag is derived from this, never stored."""

    IDLE = "idle"
    CONNECTING = "connecting"
    """A ``start`` (or ``resume``) is making its first connect."""
    CONNECTED = "connected"
    BACKOFF = "backoff"
    """A session was lost; waiting before the next attempt."""
    RECONNECTING = "reconnecting"
    """A reconnect attempt is under way."""
    FAILED = "failed"
    """The first connect failed, or the reconnect budget is spent. Only ``start`` leaves it."""
    LINK_DOWN = "link_down"
    """The signaling link is gone; the parameters are kept for :meth:`SessionSupervisor.resume`."""


@dataclass(frozen=True)
class SupervisorStatus:
    """One immutable snapshot of the supervisor. Replaced whole, so reads are never torn."""

    phase: Phase = Phase.IDLE
    webrtc_error: str | None = None
    attempt: int = 0
    """Reconnect attempts used from the current budget."""
    max_attempts: int = 3
    last_loss_reason: str | None = None
    sessions_started: int = 0
    """Sessions that connected, over the supervisor's life (first starts and reconnects)."""
    sessions_lost: int = 0
    sessions_abandoned: int = 0
    """Sessions a stop (or a replacing start) stopped waiting for; each is reaped later."""
    version: int = 0
    """Increases with every change: a watcher sees from it which changes it skipped."""
    changed_at: float = 0.0
    """``trio.current_time()`` of this change, so a watcher measures durations exactly."""

    @property
    def webrtc_connected(self) -> bool:
        return self.phase is Phase.CONNECTED

    @property
    def webrtc_reconnecting(self) -> bool:
        return self.phase in (Phase.BACKOFF, Phase.RECONNECTING)

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "webrtc_connected": self.webrtc_connected,
            "webrtc_reconnecting": self.webrtc_reconnecting,
            "webrtc_error": self.webrtc_error,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "last_loss_reason": self.last_loss_reason,
            "sessions_started": self.sessions_started,
            "sessions_lost": self.sessions_lost,
            "sessions_abandoned": self.sessions_abandoned,
        }
