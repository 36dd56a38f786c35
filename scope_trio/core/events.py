"""What the supervisor tells its subscribers, as typed values (the model: stamina's hooks).

:meth:`~scope_trio.core.supervisor.SessionSupervisor.subscribe` registers a callback that
gets every event synchronously, in order, at the instant the supervisor decides it (``at`` is
``trio.current_time()`` then). Metrics and logs count these instead of re-deriving them from
the status or parsing its text. A callback must be quick and must not call the supervisor;
one that raises is logged and skipped, never allowed to disturb the supervisor.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from scope_trio.core.session import Loss


class GiveUpReason(enum.Enum):
    """Why an outage ended without a session; the value is the metrics label."""

    BUDGET_SPENT = "budget_spent"
    RESTART_INTENSITY = "restart_intensity"
    INTERNAL_ERROR = "internal_error"
    """A bug in the supervisor's run, contained: everything is closed, the server serves on."""


Outcome = Literal["succeeded", "failed", "aborted"]


@dataclass(frozen=True)
class AttemptStarted:
    """A reconnect attempt began (a resume after a re-link is one too)."""

    at: float
    attempt: int
    max_attempts: int


@dataclass(frozen=True)
class AttemptEnded:
    """A reconnect attempt ended: it connected, failed, or something superseded it."""

    at: float
    attempt: int
    outcome: Outcome


@dataclass(frozen=True)
class Lost:
    """A connected session was lost (``connected_at``: when it had connected)."""

    at: float
    loss: Loss
    connected_at: float


@dataclass(frozen=True)
class Recovered:
    """A session connected again after a loss; ``outage`` seconds since the loss."""

    at: float
    outage: float


@dataclass(frozen=True)
class GaveUp:
    """The outage ended in the final ``webrtc_error`` ``message``."""

    at: float
    reason: GiveUpReason
    message: str


@dataclass(frozen=True)
class StartFailed:
    """The first connect of a ``start`` failed (no reconnect follows)."""

    at: float
    reason: str


@dataclass(frozen=True)
class Abandoned:
    """A stop (or replacing start) stopped waiting for a session that would not close.

    The session is still reaped in the background; ``waited`` is how long was waited.
    """

    at: float
    waited: float


SupervisorEvent = (
    AttemptStarted | AttemptEnded | Lost | Recovered | GaveUp | StartFailed | Abandoned
)
Subscriber = Callable[[SupervisorEvent], object]
