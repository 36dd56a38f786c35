"""Relay mode, the browser side: Browser ⇄ (WebRTC) ⇄ scope-trio ⇄ (WebRTC) ⇄ cloud.

The browser offers to us; we answer with ONE outgoing video track that carries the cloud's
processed frames, feed the browser's incoming video to the cloud media session, and forward
JSON text from the browser's data channel(s) as parameter updates (docs/cloud-protocol.md).
The cloud media session belongs to :class:`scope_trio.cloud.manager.CloudManager`;
this module owns only the browser side.

Its place in the supervision tree is drawn in ``docs/architecture.md``: ``Relay.open()``
owns the nursery of the browser sessions; each session runs in its own cancel scope and
nursery (connection watch, track and data-channel pumps, the last-frame hold, and the wait
for the cloud media session it began).

Guarantees:

* Across cloud losses and reconnects the browser peer connection is never renegotiated: the
  manager calls the same ``on_frame`` for every cloud session it builds, and that pushes into
  the same browser track.
* While no cloud frame arrives (an outage, a reconnect backoff) the browser track keeps
  delivering the last good frame at ``fps``, so the browser's pipeline never stalls and never
  shows black once it has seen a real frame.
* One browser session at a time, as in Scope: a new offer replaces the previous session,
  which is closed completely (peer connection, tasks) before the new one starts its cloud
  session; the new one's start supersedes the old cloud session.
* A session ends on :meth:`Relay.close`, :meth:`Relay.close_all`, a browser disconnect
  (``connectionState`` ``closed``/``failed``) or cancellation of the owner's nursery; every
  way out closes its peer connection (shielded, bounded) and, if it is the current session,
  stops the cloud media session. A bug in one session ends that session (logged), never the
  owner's nursery.

aiortc is only touched through :mod:`scope_trio.rtc`; this module is plain trio and must
run inside an open trio-asyncio loop (:func:`scope_trio.rtc.open_loop`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from av import VideoFrame

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, MediaHandle, NotConnectedError
from scope_trio.cloud.media import VideoInput
from scope_trio.core.params import ParameterError, Parameters, owned, parse_json_object
from scope_trio.core.service import open_service
from scope_trio.core.supervisor import SupervisorError
from scope_trio.ops import logs

__all__ = ["Relay"]

logger = logging.getLogger(__name__)

CLEANUP_TIMEOUT = 30.0
"""Last-resort bound on one session's cleanup: its peer connection close is bounded by
``close_timeout`` and the manager's ``stop_media`` by the supervisor's own shielded bound."""


@dataclass(eq=False)
class _BrowserSession:
    """One browser peer connection and everything it owns. Changed only by :class:`Relay`."""

    id: str
    pc: rtc.PeerConnection
    track: rtc.TrioVideoSource
    """The one outgoing track: the cloud's processed frames, held through outages."""
    params: Parameters
    """``initialParameters``, checked and copied once at the offer; the cloud media session
    takes them over when it begins (the supervisor keeps every later update)."""
    user_id: str | None
    created_at: float
    video_input: VideoInput = field(default_factory=VideoInput)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    """Set once the session is completely closed and gone from :attr:`Relay._sessions`."""
    open: bool = True
    end_reason: str | None = None
    connected_at: float | None = None
    media: MediaHandle | None = None
    """This session's hold on the cloud media session, once it began."""
    cloud_error: str | None = None
    last_frame: VideoFrame | None = None
    last_cloud_frame_at: float = -math.inf
    last_push_at: float = -math.inf
    frames_from_browser: int = 0
    frames_from_cloud: int = 0
    held_frames: int = 0
    black_frames: int = 0
    parameter_messages: int = 0
    parameter_errors: int = 0

    def end(self, reason: str) -> None:
        """Record why the session ends (the first reason wins) and cancel its tasks."""
        if self.end_reason is None:
            self.end_reason = reason
        self.scope.cancel()

    def on_cloud_frame(self, frame: VideoFrame) -> None:
        """The manager's ``on_frame``: called for every cloud session it builds for us."""
        if not self.open:
            return
        now = trio.current_time()
        self.last_frame = frame
        self.last_cloud_frame_at = self.last_push_at = now
        self.frames_from_cloud += 1
        self.track.push(frame)

    def on_browser_frame(self, frame: VideoFrame) -> None:
        self.frames_from_browser += 1
        self.video_input.push(frame)

    def counters(self) -> Counter[str]:
        """What :meth:`Relay.counters` sums over sessions."""
        return Counter(
            sessions=1,
            frames_from_browser=self.frames_from_browser,
            frames_from_cloud=self.frames_from_cloud,
            held_frames=self.held_frames,
            black_frames=self.black_frames,
        )

    def snapshot(self, current: bool) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "session_id": self.id,
            "current": current,
            "state": self.pc.state,
            "open": self.open,
            "end_reason": self.end_reason,
            "user_id": self.user_id,
            "uptime_seconds": round(now - self.created_at, 3),
            "connected_seconds": (
                None if self.connected_at is None else round(now - self.connected_at, 3)
            ),
            "cloud_error": self.cloud_error,
            "frames_from_browser": self.frames_from_browser,
            "frames_from_cloud": self.frames_from_cloud,
            "frames_to_browser": self.track.frames_sent,
            "held_frames": self.held_frames,
            "black_frames": self.black_frames,
            "parameter_messages": self.parameter_messages,
            "parameter_errors": self.parameter_errors,
        }


class Relay:
    """The browser sessions of relay mode (see the module docstring).

    Open it with ``async with Relay.open(manager) as relay``: :meth:`open` owns the nursery
    every browser session runs in and closes them all (shielded, bounded) when the block
    ends. Call it from trio tasks of that run, inside the open trio-asyncio loop.
    """

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, manager: CloudManager, *, close_timeout: float = 15.0, **options: Any
    ) -> AsyncIterator[Relay]:
        """The relay for the block; when the block ends, every browser session is closed."""
        async with open_service(
            lambda nursery: cls(manager, nursery, **options),
            Relay.close_all,
            close_timeout=close_timeout,
            what="the browser sessions",
        ) as relay:
            yield relay

    def __init__(
        self,
        manager: CloudManager,
        nursery: trio.Nursery,
        *,
        fps: float = 30.0,
        negotiate_timeout: float = 10.0,
        connect_timeout: float = 30.0,
        close_timeout: float = 5.0,
        start_timeout: float = 60.0,
    ) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        self._manager = manager
        self._nursery = nursery
        self.fps = fps
        self._negotiate_timeout = negotiate_timeout
        self._connect_timeout = connect_timeout
        """A browser that has not connected this long after the answer is given up."""
        self._close_timeout = close_timeout
        self._start_timeout = start_timeout
        """Backstop over ``start_media`` (the supervisor's attempt deadline comes first)."""
        self._sessions: dict[str, _BrowserSession] = {}
        self._current: _BrowserSession | None = None
        """The session whose cloud media session the manager runs; None while none does."""
        self._lock = trio.Lock()  # serialises retire-then-install of sessions
        self._closed_totals: Counter[str] = Counter()  # counters of sessions gone

    # ------------------------------------------------------------------ public API

    async def offer(
        self,
        sdp: str,
        sdp_type: str,
        initial_parameters: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
    ) -> dict[str, str]:
        """Answer a browser offer; returns ``{"sdp", "type": "answer", "sessionId"}``.

        Returns as soon as the answer exists: the cloud media session starts in the
        background (its failure shows in the manager's status as ``webrtc_error``). Any
        previous browser session is closed completely before this one is installed.
        Raises :class:`NotConnectedError` without a cloud link, ``ValueError`` for a
        malformed offer or parameters (nothing is left open then), and
        ``trio.TooSlowError`` if aiortc does not negotiate within ``negotiate_timeout``.
        ``user_id`` is recorded in :meth:`sessions`; the cloud gets the one given to
        :meth:`CloudManager.connect`.
        """
        if self._manager.link is None:
            raise NotConnectedError("not connected to the cloud")
        if sdp_type != "offer":
            raise ValueError(f"expected an SDP offer, got type {sdp_type!r}")
        if not isinstance(sdp, str):
            raise ValueError("'sdp' must be a string")  # noqa: TRY004 - the API's client error
        params = owned(initial_parameters or {}, "initialParameters")

        pc = rtc.PeerConnection([], close_timeout=self._close_timeout)  # collects events now
        stats = self._manager.media_stats
        track = rtc.TrioVideoSource(  # _hold_frames feeds it; backlogs one retransmission late
            fps=self.fps,
            idle_timeout=None,
            max_lateness=lambda: rtc.lateness_bound(stats.retransmission_delay),
        )
        session: _BrowserSession | None = None
        took_cloud = False  # we retired the session whose cloud media session was running
        try:
            with trio.fail_after(self._negotiate_timeout):
                answer = await pc.answer(sdp, sdp_type, send_tracks=[track])
            if not pc.sends(track):
                raise ValueError("the offer has no video section to answer with")
            session = _BrowserSession(
                id=str(uuid.uuid4()),
                pc=pc,
                track=track,
                params=params,
                user_id=user_id,
                created_at=trio.current_time(),
            )
            async with self._lock:
                for old in list(self._sessions.values()):
                    if self._current is old:
                        self._current = None  # replaced: the new start supersedes its cloud
                        took_cloud = True
                    await self._retire(old, "replaced by a new offer")
                self._sessions[session.id] = session
                self._current = session
                self._nursery.start_soon(self._run_session, session)
        except BaseException:
            if session is None or session.id not in self._sessions:
                track.stop()
                await pc.close()
                if took_cloud:  # cancelled half-way: the replaced cloud session has no owner
                    await self._manager.stop_media()  # shielded and bounded by the supervisor
            raise
        logger.info(
            "browser session %s answered", session.id, extra=logs.ids(session_id=session.id)
        )
        return {"sdp": answer.sdp, "type": answer.type, "sessionId": session.id}

    async def add_candidates(
        self, session_id: str, candidates: Sequence[Mapping[str, Any]]
    ) -> None:
        """Add trickled browser ICE candidates to a session.

        All candidates are validated before any is added. Raises ``KeyError`` for an
        unknown or closing session and ``ValueError`` for a malformed or rejected
        candidate (or one aiortc does not take within ``negotiate_timeout``).
        """
        session = self._live(session_id)
        given: object = candidates  # from JSON: the annotation is a hope, not a fact
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise ValueError("'candidates' must be a list")  # noqa: TRY004 - the API's client error
        parsed = [rtc.parse_ice_candidate(candidate) for candidate in candidates]
        for candidate in parsed:
            with trio.move_on_after(self._negotiate_timeout) as waited:
                try:
                    await session.pc.add_candidate(candidate)
                except rtc.InvalidCandidateError:
                    raise
                except Exception as exc:  # aiortc internals: still the candidate's fault
                    raise ValueError(f"ICE candidate rejected: {exc}") from exc
            if waited.cancelled_caught:
                raise ValueError(f"ICE candidate not accepted within {self._negotiate_timeout:g} s")

    async def close(self, session_id: str) -> None:
        """Close one browser session and, if it is the current one, the cloud media session.

        Returns once both are closed (bounded). Raises ``KeyError`` for an unknown session.
        """
        session = self._sessions.get(session_id)
        if session is None:
            raise KeyError(session_id)
        await self._retire(session, "closed by request")

    async def close_all(self) -> None:
        """Close every browser session (shutdown). Shielded and bounded: it completes even
        when its caller is being cancelled, then the caller's cancellation is raised."""
        with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
            for session in list(self._sessions.values()):
                session.end("relay shut down")
            for session in list(self._sessions.values()):
                await session.done.wait()
        await trio.lowlevel.checkpoint_if_cancelled()

    def sessions(self) -> dict[str, dict[str, Any]]:
        """Per-session counters and state (``webrtc_stats`` of ``/api/v1/cloud/stats``)."""
        return {
            session_id: session.snapshot(session is self._current)
            for session_id, session in self._sessions.items()
        }

    def counters(self) -> dict[str, int]:
        """Counters summed over every browser session so far, closed ones included
        (``sessions``: how many there were), and ``open``: how many are open now."""
        totals = self._closed_totals.copy()
        for session in self._sessions.values():
            totals.update(session.counters())
        return {**totals, "open": len(self._sessions)}

    # ------------------------------------------------------------------ internals

    def _live(self, session_id: str) -> _BrowserSession:
        session = self._sessions.get(session_id)
        if session is None or not session.open:
            raise KeyError(session_id)
        return session

    async def _retire(self, session: _BrowserSession, reason: str) -> None:
        """End ``session`` and wait (bounded) until it is completely closed."""
        session.end(reason)
        with trio.move_on_after(CLEANUP_TIMEOUT) as waited:
            await session.done.wait()
        if waited.cancelled_caught:
            logger.error(
                "browser session %s did not close within %.0f s",
                session.id,
                CLEANUP_TIMEOUT,
                extra=logs.ids(session_id=session.id),
            )

    async def _run_session(self, session: _BrowserSession) -> None:
        logs.bind_session(session.id)  # every task of this session logs for it
        try:
            with session.scope:
                # Before any data-channel message is read: from here on every update goes to
                # the supervisor, the one place that keeps updates made before connecting.
                self._begin_cloud(session)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_connection, session)
                    nursery.start_soon(self._pump_tracks, session, nursery)
                    nursery.start_soon(self._pump_channels, session, nursery)
                    nursery.start_soon(self._hold_frames, session)
                    nursery.start_soon(self._start_cloud, session)
        except Exception:
            # One browser session's bug must not take the server's nursery down.
            logger.exception("browser session %s failed; closing it", session.id)
            session.end_reason = session.end_reason or "internal error"
        finally:
            await self._cleanup(session)

    async def _cleanup(self, session: _BrowserSession) -> None:
        """Close what the session owns, shielded and bounded; always sets ``done``."""
        session.open = False
        try:
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                session.track.stop()
                await session.pc.close()
                if self._current is session:  # a replaced session leaves the cloud to its successor
                    self._current = None
                    if session.media is not None:
                        await session.media.stop()  # only if it is still the owner
        finally:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
                self._closed_totals.update(session.counters())
            session.done.set()
            logger.info("browser session %s closed (%s)", session.id, session.end_reason or "ended")

    async def _watch_connection(self, session: _BrowserSession) -> None:
        """End the session when the browser disconnects or never connects."""
        pc = session.pc
        state: str | None = None
        with trio.move_on_after(self._connect_timeout):  # bounds the connect only
            state = await pc.wait_state("connected", "closed", "failed")
        if state is None:
            session.end(f"browser did not connect within {self._connect_timeout:g} s")
            return
        if state == "connected":
            session.connected_at = trio.current_time()
            logger.info("browser session %s connected", session.id)
            state = await pc.wait_state("closed", "failed")  # as long as it streams
        session.end(f"browser peer connection {state}")

    async def _pump_tracks(self, session: _BrowserSession, nursery: trio.Nursery) -> None:
        """Browser video feeds the cloud session; other tracks are drained and dropped."""
        async for track in session.pc.tracks:
            if track.kind == "video":
                nursery.start_soon(track.receive_video, session.on_browser_frame)
            else:
                nursery.start_soon(track.drain)

    async def _pump_channels(self, session: _BrowserSession, nursery: trio.Nursery) -> None:
        async for remote in session.pc.channels:
            nursery.start_soon(self._forward_parameters, session, remote)

    async def _forward_parameters(self, session: _BrowserSession, remote: rtc.DataChannel) -> None:
        """JSON objects from the browser become parameter updates; anything else is logged
        and ignored, so a bad message never ends anything."""
        label = remote.label
        async for message in remote.messages:
            session.parameter_messages += 1
            try:
                update = parse_json_object(message, "message")
            except ParameterError as exc:  # deep nesting included: it would end the session
                session.parameter_errors += 1
                logger.warning("data channel %r: %s: %.80r", label, exc, message)
                continue
            if session.media is not None:
                session.media.update_parameters(update)  # ignored once superseded

    async def _hold_frames(self, session: _BrowserSession) -> None:
        """Keep the browser track fed at ``fps`` when no cloud frame comes.

        Black frames until the first cloud frame; after it, the last good frame, starting
        two frame intervals after the last real one (so ordinary jitter is not padded).
        """
        interval = 1.0 / self.fps
        grace = 2 * interval
        black = rtc.black_frame()
        while True:
            due = max(session.last_cloud_frame_at + grace, session.last_push_at + interval)
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            session.last_push_at = trio.current_time()
            if session.last_frame is None:
                session.black_frames += 1
                session.track.push(black)
            else:
                session.held_frames += 1
                session.track.push(session.last_frame)

    def _begin_cloud(self, session: _BrowserSession) -> None:
        """Take the cloud media session over for ``session`` (synchronously); a failure is
        recorded and logged, and the session streams held or black frames without it."""
        if self._current is not session:
            return  # already replaced
        try:
            session.media = self._manager.begin_media(
                session.params, video_input=session.video_input, on_frame=session.on_cloud_frame
            )
        except NotConnectedError as exc:
            session.cloud_error = str(exc)
            logger.warning(
                "cloud media session for browser session %s did not start: %s",
                session.id,
                session.cloud_error,
            )

    async def _start_cloud(self, session: _BrowserSession) -> None:
        """Wait for this session's cloud media session to connect; failures are logged and
        recorded (the manager's status carries them as ``webrtc_error``), never raised."""
        if session.media is None:
            return
        try:
            with trio.move_on_after(self._start_timeout) as waited:
                await session.media.connected()
        except SupervisorError as exc:
            session.cloud_error = str(exc) or type(exc).__name__
            logger.warning(
                "cloud media session for browser session %s did not start: %s",
                session.id,
                session.cloud_error,
            )
            return
        if waited.cancelled_caught:
            session.cloud_error = f"not connected within {self._start_timeout:g} s"
            logger.warning("cloud media session for browser session %s timed out", session.id)
            return
        logger.info("cloud media session for browser session %s connected", session.id)
