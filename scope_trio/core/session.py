"""The narrow protocol between the reconnect supervisor and one cloud media session.

The supervisor never sees aiortc: it asks a :data:`SessionFactory` for a fresh
:class:`MediaSession` for every connect attempt, runs it in a nursery it owns, and
learns about the session's life only through :meth:`MediaSession.run`:

* ``run`` gets a :class:`SessionAttempt`. It takes its initial parameters from
  ``attempt.parameters()`` at the moment it builds its offer (so an update made while it
  was getting ready goes in the offer), calls ``task_status.started()`` once the session
  really carries media, and then keeps running until the session is lost. The moment it
  sees the loss it calls ``attempt.lost(loss)`` with a typed :class:`Loss` (so the status
  says so at once, before any slow close; it may do so in the same step as ``started()``),
  then closes what it opened and *returns* the same loss.
* Raising before ``started()`` means the connect failed; the exception's text is the reason.
* Cancellation means the supervisor is done with the session. Whatever ``run`` does on
  the way out, it must close everything it opened, shielded and under its own deadline,
  so that the next attempt never overlaps a half-closed session.

The real implementation is :class:`scope_trio.cloud.media.CloudMediaSession`; the deterministic
fake used by the race tests is :class:`scope_trio.dev.fakes.FakeCloud`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio


class SessionClosedError(Exception):
    """Raised by :meth:`MediaSession.send_parameters` when the session cannot deliver any more."""


class LossKind(enum.Enum):
    """Why a connected session ended; the value is the metrics label."""

    PEER_CONNECTION_CLOSED = "peer_connection_closed"
    PEER_CONNECTION_FAILED = "peer_connection_failed"
    PATH_SILENCE = "path_silence"
    """No packet at all from the cloud for a while: the path went silent."""
    NO_VIDEO = "no_video"
    """No first frame in time, or none for the stall timeout."""
    TRACK_ENDED = "track_ended"
    UPLINK_DEAD = "uplink_dead"
    """The cloud's receiver reports show it receives nothing we send while it still talks to
    us: the server→cloud direction is dead."""
    LINK_LOST = "link_lost"
    """The signaling link went down under a connected session."""
    SESSION_CRASHED = "session_crashed"
    """The session raised after it connected (a bug, contained)."""
    OTHER = "other"


@dataclass(frozen=True)
class Loss:
    """A typed loss: the kind decides (metrics, logs), the detail is what users read."""

    kind: LossKind
    detail: str

    def __str__(self) -> str:
        return self.detail


class SessionAttempt(Protocol):
    """What the supervisor hands one session for one connect attempt."""

    def parameters(self) -> dict[str, Any]:
        """The initial parameters as they are now (a private copy): call it when building
        the offer. Whatever it returned is what the session is known to have started with."""
        ...

    def lost(self, loss: Loss) -> None:
        """Report the loss the moment it is seen (the first report wins)."""
        ...


class MediaSession(Protocol):
    """One cloud media session: one peer connection, from connect to loss or close."""

    async def run(
        self,
        attempt: SessionAttempt,
        *,
        task_status: trio.TaskStatus[None],
    ) -> Loss:
        """Connect with ``attempt.parameters()`` in the offer, report readiness, run until lost.

        Calls ``attempt.lost(loss)`` as soon as a loss is seen, and returns the same loss once
        closed. Raises if it could not connect. Closes everything it opened before
        returning, raising or being cancelled; ``lost`` is not called for a cancel.
        """
        ...

    def send_parameters(self, update: Mapping[str, Any]) -> None:
        """Deliver a parameter update to the cloud now (ordered, reliable).

        Raises :class:`SessionClosedError` when the session is not connected any more.
        """
        ...


SessionFactory = Callable[[], MediaSession]
"""Makes a fresh, unconnected session for each connect attempt."""
